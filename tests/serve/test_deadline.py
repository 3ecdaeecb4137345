"""dolly.serve.deadline: a request's deadline reaches predict, which drops the request's rows
before they start or stops generating them at the next token once it passes."""
import pytest
from mlflow.exceptions import MlflowException

from helpers import FakeClock, SeenPrompts, same_model
from dolly.serve.deadline import request_deadline


def test_a_request_past_its_deadline_is_dropped_without_calling_the_model(wrapped):
    for model in (same_model(wrapped, 0), same_model(wrapped, 5)):
        with SeenPrompts(model.pipeline.model) as seen, request_deadline(0):
            with pytest.raises(MlflowException, match="deadline passed") as e:
                model.predict(["Greet Mo."], {"max_new_tokens": 4})
        assert e.value.get_http_status_code() == 504
        assert seen.prompts == []


def test_a_running_generation_stops_at_the_deadline(wrapped, monkeypatch):
    import time

    # Deadlines are time.monotonic() seconds: request_deadline sets one, dolly.generation checks
    # it at each token and the batcher before a call's rows start. Here that clock moves only
    # when the model works on a token, so the deadline passes mid-generation however fast or
    # slow the machine is.
    clock = FakeClock()
    monkeypatch.setattr(time, "monotonic", clock)
    model = same_model(wrapped, 5)
    model.batcher.clock = clock
    steps = []

    def slow(module, args):  # 50 ms a token: 30 tokens would take 1.5 s
        steps.append(1)
        clock.advance(0.05)

    hook = model.pipeline.model.register_forward_pre_hook(slow)
    try:
        with request_deadline(0.3), pytest.raises(MlflowException, match="deadline"):
            model.predict(["Greet Mo."], {"max_new_tokens": 30, "do_sample": False,
                                          "temperature": 0})
    finally:
        hook.remove()
    assert 1 <= len(steps) < 30  # stopped early, at a token boundary
    # the model is free again: the next call is answered
    assert len(model.predict(["Greet Mo."], {"max_new_tokens": 2})) == 1
