"""dolly.serving: the records the registered model's pyfunc takes, its checks, and its prompts."""
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from conftest import SMALLEST
from dolly import generation, prompts, serving
from dolly.serving import DollyPyfunc, as_frame, check_params

NA = [None, float("nan"), np.nan, pd.NA]


@pytest.mark.parametrize("data, expected", [
    ("Greet Mo.", [("Greet Mo.", "")]),
    (["a", "b"], [("a", ""), ("b", "")]),
    ([["a"], ["b"]], [("a", ""), ("b", "")]),  # rows of one column, as JSON "instances" give them
    (pd.Series(["a", "b"]), [("a", ""), ("b", "")]),
    (np.array([["a"], ["b"]]), [("a", ""), ("b", "")]),
    (pd.DataFrame({"text": ["a", "b"]}), [("a", ""), ("b", "")]),  # one unnamed column
    # dolly-15k's column order: the instruction and its context are taken by name
    (pd.DataFrame({"category": ["closed_qa"], "context": ["Mo is 3."], "instruction": ["Age?"],
                   "response": ["3"]}), [("Age?", "Mo is 3.")]),
    ([{"input": "ma ko", "instruction": "Count."}, {"instruction": "Greet Mo."}],
     [("Count.", "ma ko"), ("Greet Mo.", "")]),
    ({"instruction": ["a", "b"], "context": ["x", None]}, [("a", "x"), ("b", "")]),
    ({"instruction": "a", "input": "x"}, [("a", "x")]),
    ({"instructions": ["a", "b"]}, [("a", ""), ("b", "")]),  # one field of instructions
    (pd.DataFrame({"instruction": ["a", *NA, " \t"], "input": [None, "x", *NA[1:], "\t"]}),
     [("a", ""), ("", "x"), ("", ""), ("", ""), ("", ""), (" \t", "\t")]),
])
def test_records_are_taken_by_name(data, expected):
    frame = as_frame(data)
    assert list(zip(frame["instruction"], frame["input"])) == expected


@pytest.mark.parametrize("data, message", [
    (["a", 3], "row 1: instruction is a number, expected a string"),
    (pd.DataFrame({"instruction": ["a", 2.5]}), "row 1: instruction is a number, expected a string"),
    ([{"instruction": True}], "row 0: instruction is a boolean, expected a string"),
    ([{"instruction": ["Greet Mo."]}], "row 0: instruction is a list, expected a string"),
    ({"instruction": [{"text": "a"}]}, "row 0: instruction is an object, expected a string"),
    ([{"instruction": "a", "context": 5}], "row 0: input is a number, expected a string"),
    ([{"input": "x"}], "record 0 has no 'instruction' field (fields: input)"),
    (pd.DataFrame({"category": ["c"], "response": ["r"]}),
     "no 'instruction' column among the 2 columns (category, response)"),
    (pd.DataFrame({"context": ["c"]}), "no 'instruction' column among the 1 columns (context)"),
    (pd.DataFrame({"instruction": ["a"], "input": ["x"], "context": ["y"]}),
     "both 'input' and 'context' columns"),
    (pd.DataFrame(index=[0, 1]), "the input has no columns"),
    (np.array([["a", "x"], ["b", "y"]]), "an array of shape (2, 2): send named columns"),
    (3.5, "expected records or instructions, got a float"),
])
def test_bad_records_are_refused_with_one_line(data, message):
    with pytest.raises(MlflowException) as e:
        as_frame(data)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.get_http_status_code() == 400


@pytest.mark.parametrize("params, message", [
    ({"temperature": -1}, "temperature must be a number >= 0 (0 = greedy), got -1"),
    ({"top_p": 1.5}, "top_p must be a number from 0 to 1, got 1.5"),
    ({"top_p": -0.1}, "top_p must be a number from 0 to 1, got -0.1"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0 = off), got -1"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0 (0 = off), got 2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": "many"}, 'max_new_tokens must be an integer >= 1, got "many"'),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got true"),
    ({"do_sample": "yes"}, 'do_sample must be true or false, got "yes"'),
    ({"max_new_token": 5}, "unknown params ['max_new_token']: this model takes"),
    ([1], "params must be an object of name: value, got a list"),
])
def test_bad_params_are_refused_naming_the_param_and_range(params, message):
    with pytest.raises(MlflowException) as e:
        check_params(params)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.get_http_status_code() == 400


def test_null_params_mean_the_default():
    assert check_params({"do_sample": None, "top_p": None, "top_k": 3}) == {"top_k": 3}
    assert check_params(None) == {}


def test_a_refusal_never_echoes_a_huge_request():
    with pytest.raises(MlflowException) as e:
        check_params({"max_new_tokens": "x" * 1_000_000})
    assert len(e.value.message) < 300


@pytest.fixture(scope="module")
def wrapped():
    """MLflow's own transformers pyfunc over a real tiny pipeline (64-token context), wrapped."""
    import transformers
    from mlflow.transformers import _TransformersWrapper

    from dolly.config import load_config
    from dolly.modeling import build_tiny
    from dolly.tokenizer import build_tokenizer

    cfg = load_config(None, SMALLEST)
    tok = build_tokenizer(cfg, [])
    tok.padding_side = "left"
    torch.manual_seed(0)
    pipe = transformers.pipeline("text-generation", model=build_tiny(cfg, tok), tokenizer=tok)
    inner = _TransformersWrapper(pipe, {}, {"return_full_text": False, "batch_size": 2},
                                 prompts.PROMPT_TEMPLATE)
    return DollyPyfunc(inner, {})


@pytest.fixture(scope="module")
def lively(wrapped):
    """`wrapped` with its weights scaled 6x: a random model whose answers differ from prompt to
    prompt (the unscaled one answers nearly every prompt alike), so a mix-up would show."""
    import copy

    import transformers

    model = copy.deepcopy(wrapped.pipeline.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    pipe = transformers.pipeline("text-generation", model=model,
                                 tokenizer=wrapped.pipeline.tokenizer)
    return same_model(type("W", (), {"pipeline": pipe})(), 0)


def same_model(wrapped, wait_ms, batch_size=8):
    """Another DollyPyfunc over `wrapped`'s pipeline: batching across calls waiting `wait_ms`
    (0 = off), batches of `batch_size` rows."""
    from mlflow.transformers import _TransformersWrapper

    inner = _TransformersWrapper(wrapped.pipeline, {}, {"return_full_text": False,
                                                        "batch_size": batch_size},
                                 prompts.PROMPT_TEMPLATE)
    return DollyPyfunc(inner, {"serve_batch_wait_ms": wait_ms})


class SeenPrompts:
    """Records the prompts (left padding removed) the model is asked to continue."""

    def __init__(self, model):
        self.model, self.prompts, self._generate = model, [], model.generate

    def __enter__(self):
        def spy(input_ids=None, attention_mask=None, **kw):
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                self.prompts.append([t for t, m in zip(ids, mask) if m])
            return self._generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self.model.generate = spy
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the instance attribute: the class's method again


def test_a_record_with_input_is_asked_in_the_training_format(wrapped):
    tok = wrapped.pipeline.tokenizer
    frame = pd.DataFrame({"category": ["c", "c"], "context": ["ma ko li", " \t"],
                          "instruction": ["Count the words.", "Greet Mo."]})
    with SeenPrompts(wrapped.pipeline.model) as seen:
        out = wrapped.predict(frame, {"max_new_tokens": 2, "do_sample": False})
    assert len(out) == 2
    # what training tokenized for such records, up to and including the response key
    train = [tok(prompts.format_record(i, c, "x"), add_special_tokens=False)["input_ids"]
             for i, c in [("Count the words.", "ma ko li"), ("Greet Mo.", None)]]
    want = [ids[:ids.index(tok.convert_tokens_to_ids(prompts.RESPONSE_KEY_NL)) + 1]
            for ids in train]
    assert sorted(seen.prompts) == sorted(want)
    assert tok.decode(want[0]) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nCount the words.\n\n### Input:\nma ko li\n\n### Response:\n")


def test_too_long_records_are_shortened_by_the_function_evaluation_uses(wrapped):
    tok = wrapped.pipeline.tokenizer
    long_ins = "start " + "filler " * 2000 + "the question at the end?"
    long_inp = "begin " + "lapo " * 2000 + "last words"
    with SeenPrompts(wrapped.pipeline.model) as seen:
        wrapped.predict([{"instruction": long_ins}, {"instruction": "Q?", "input": long_inp}],
                        {"max_new_tokens": 4, "do_sample": False})
    budget = wrapped.context - generation.answer_room(4, wrapped.context)  # 64 - 4
    want = [generation.shorten_prompt_ids(tok, long_ins, None, budget)[0],
            generation.shorten_prompt_ids(tok, "Q?", long_inp, budget)[0]]
    assert sorted(seen.prompts) == sorted(want)
    assert all(len(p) <= 60 for p in seen.prompts)
    text = tok.decode(want[1])
    assert text.startswith(prompts.INTRO_WITH_INPUT) and "\n### Instruction:\nQ?\n\n" in text
    assert text.endswith("lapo last words\n\n### Response:\n")


def test_predict_answers_every_row_in_order(wrapped):
    rows = ["Greet Mo.", "", "Repeat the word bada.", None, "Count: ma ko li", " \t\n",
            "Name a colour."]
    greedy = {"max_new_tokens": 3, "do_sample": False}
    out = wrapped.predict(rows, greedy)
    one_by_one = [wrapped.predict([r], greedy)[0] for r in rows]
    assert out == one_by_one
    assert out[1] == out[3] == out[5] == ""
    assert len({out[0], out[2], out[4], out[6]}) > 1  # distinct answers: order is observable


def test_temperature_zero_is_greedy(wrapped):
    rows = ["Greet Mo.", "Repeat the word bada."]
    assert wrapped.predict(rows, {"max_new_tokens": 3, "temperature": 0}) == \
        wrapped.predict(rows, {"max_new_tokens": 3, "do_sample": False})


CALLS = [["Greet Mo."], ["Repeat the word bada.", "Count: ma ko li"], ["Name a colour."],
         [{"instruction": "Count the words.", "input": "ma ko li"}], ["Say hello to Kalo."],
         ["What is the first word of the input?"]]


def test_concurrent_callers_share_batches_and_get_their_own_answers(lively):
    wrapped = lively
    import threading

    greedy = {"max_new_tokens": 4, "do_sample": False}
    alone = same_model(wrapped, 0)
    assert alone.batcher is None
    want = [alone.predict(rows, greedy) for rows in CALLS]  # one call at a time, no batching
    # a long wait, so that every caller reaches the batch however slow the machine is
    batched = same_model(wrapped, 1000)
    gate, got = threading.Barrier(len(CALLS)), [None] * len(CALLS)

    def call(k):
        gate.wait()
        got[k] = batched.predict(CALLS[k], greedy)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(CALLS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    assert len({a for answers in want for a in answers}) > 3  # mixed up answers would show
    assert max(batched.batcher.batches) > 2  # rows of several calls went in one batch


def test_sorted_and_unsorted_batches_give_the_same_answers_in_the_same_order(lively):
    wrapped = lively
    rows = ["Greet Mo.", "Count the words in the input: ma ko li bada fe", "Hi",
            "Repeat the word bada.", "Say the word kalo back to me, then stop."]
    greedy = {"max_new_tokens": 4, "do_sample": False}
    model = same_model(wrapped, 5, batch_size=2)
    out = model.predict(rows, greedy)
    shuffled = [4, 2, 0, 3, 1]
    assert model.predict([rows[i] for i in shuffled], greedy) == [out[i] for i in shuffled]
    assert out == [same_model(wrapped, 0, batch_size=1).predict([r], greedy)[0] for r in rows]
    assert len(set(out)) == len(rows)  # distinct answers: any reordering would show
    # batches of two, shortest prompt first: "Hi" with "Greet Mo.", then the next two
    with SeenPrompts(model.pipeline.model) as seen:
        model.predict(rows, greedy)
    tok = model.pipeline.tokenizer
    texts = [tok.decode(p).split("### Instruction:\n")[1].split("\n")[0] for p in seen.prompts]
    assert texts == ["Hi", "Greet Mo.", "Repeat the word bada.",
                     "Say the word kalo back to me, then stop.",
                     "Count the words in the input: ma ko li bada fe"]


def test_a_request_past_its_deadline_is_dropped_without_calling_the_model(wrapped):
    for model in (same_model(wrapped, 0), same_model(wrapped, 5)):
        with SeenPrompts(model.pipeline.model) as seen, serving.request_deadline(0):
            with pytest.raises(MlflowException, match="deadline passed") as e:
                model.predict(["Greet Mo."], {"max_new_tokens": 4})
        assert e.value.get_http_status_code() == 504
        assert seen.prompts == []


def test_a_running_generation_stops_at_the_deadline(wrapped):
    import time

    model = same_model(wrapped, 5)
    steps = []

    def slow(module, args):  # 50 ms a token: 30 tokens would take 1.5 s
        steps.append(1)
        time.sleep(0.05)

    hook = model.pipeline.model.register_forward_pre_hook(slow)
    try:
        with serving.request_deadline(0.3), pytest.raises(MlflowException, match="deadline"):
            model.predict(["Greet Mo."], {"max_new_tokens": 30, "do_sample": False,
                                          "temperature": 0})
    finally:
        hook.remove()
    assert 1 <= len(steps) < 30  # stopped early, at a token boundary
    # the model is free again: the next call is answered
    assert len(model.predict(["Greet Mo."], {"max_new_tokens": 2})) == 1


@pytest.mark.parametrize("batching, thread", [(True, "dolly-request"), (False, "asyncio")])
def test_the_server_stamps_each_request_with_its_timeout_as_deadline(monkeypatch, batching,
                                                                     thread):
    import asyncio
    import threading
    import time

    from dolly import serving_http

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")
    server_asyncio = serving_http._server_asyncio(batching)
    t0 = time.monotonic()
    deadline, name = asyncio.run(server_asyncio.to_thread(
        lambda: (serving.current_deadline(), threading.current_thread().name)))
    assert t0 + 7 <= deadline < t0 + 8
    # with batching, a pool of its own: no request waits for one of asyncio's 6 threads
    assert name.startswith(thread)
    assert serving.current_deadline() is None  # the caller's context is untouched
    assert server_asyncio.wait_for is asyncio.wait_for  # the rest is asyncio itself


def test_the_batching_wait_is_read_from_the_environment(wrapped, monkeypatch):
    monkeypatch.setenv(serving.BATCH_WAIT_ENV, "0")
    assert same_model(wrapped, 10).batcher is None
    monkeypatch.setenv(serving.BATCH_WAIT_ENV, "25")
    assert same_model(wrapped, 0).batcher.wait_s == 0.025
    monkeypatch.setenv(serving.BATCH_WAIT_ENV, "soon")
    with pytest.raises(MlflowException, match="DOLLY_SERVE_BATCH_WAIT_MS must be an integer"):
        same_model(wrapped, 10)


@pytest.mark.parametrize("data, params, message", [
    ([], {}, "no instructions: send at least one"),
    (["a", 3], {}, "row 1: instruction is a number"),
    (["a"], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    (["a"], {"max_new_tokens": 60}, "max_new_tokens must be at most"),
    (["a"], {"top_p": 2}, "top_p must be a number from 0 to 1, got 2"),
])
def test_predict_rejects_what_it_cannot_answer(wrapped, data, params, message):
    with pytest.raises(MlflowException, match=message) as e:
        wrapped.predict(data, params)
    assert e.value.get_http_status_code() == 400


# --- dolly.serving_http: the scoring server's request handling for this model -----------------

class _Meta:
    flavors = {"python_function": {"loader_module": "dolly.serving"}}


class _Model:
    """Stands for the PyFuncModel the server holds (its predict: DollyPyfunc's checks only)."""

    metadata = _Meta()

    def predict(self, data, params=None):
        frame = as_frame(data)
        check_params(params)
        return [f"{i}|{n}" for i, n in zip(frame["instruction"], frame["input"])]


def _invoke(body, content_type="application/json"):
    import json

    from dolly.serving_http import dolly_invocations

    def mlflow_invocations(data, content_type, model, input_schema):
        raise AssertionError("JSON for this model is parsed by dolly.serving_http")

    resp = dolly_invocations(mlflow_invocations)(body, content_type, _Model(), None)
    return resp.status, json.loads(resp.response)


def test_json_values_reach_the_model_as_sent():
    assert _invoke(b'{"inputs": [null, "a"]}') == (200, {"predictions": ["|", "a|"]})
    assert _invoke(b'{"dataframe_split": {"columns": ["context", "instruction"], '
                   b'"data": [["x", "a"]]}}') == (200, {"predictions": ["a|x"]})
    status, body = _invoke(b'{"inputs": [1, 2]}')
    assert (status, body["message"]) == (
        400, "row 0: instruction is a number, expected a string (or null for no answer)")


def test_a_missing_content_type_is_a_415_not_a_500():
    assert _invoke(b'{"inputs": ["a"]}', None) == (415, {
        "error_code": "BAD_REQUEST", "message": "no Content-Type header: send application/json, "
        "text/csv, application/vnd.apache.parquet"})


def test_error_messages_are_one_short_line_without_paths():
    from dolly.serving_http import short_message

    assert short_message("failed in /usr/lib/python3.11/site-packages/x.py\n  line 3") == \
        "failed in <path> line 3"
    assert len(short_message("x" * 10_000)) == 300
    status, body = _invoke(b'{"inputs": ["' + b"a" * 100 + b'"')
    assert status == 400 and body["message"].startswith("the body is not valid JSON:")


def test_json_kind_names_values_as_json_does():
    from dolly.serving import json_kind

    assert [json_kind(v) for v in (1, 2.5, True, np.int64(3), np.bool_(True), [1], {"a": 1})] == [
        "a number", "a number", "a boolean", "a number", "a boolean", "a list", "an object"]


def test_the_model_is_loaded_in_a_thread_that_has_ended_and_its_errors_reach_the_caller():
    """With batching on, _load_pyfunc loads through serving._in_ended_thread, so the server's
    own thread starts no OpenMP pool that would slow the batcher's worker (see _load_pyfunc)."""
    import contextvars
    import threading

    var = contextvars.ContextVar("dolly_test_var", default="unset")
    var.set("caller's")
    seen = {}

    def load():
        seen["thread"] = threading.current_thread()
        seen["var"] = var.get()
        return "model"

    assert serving._in_ended_thread(load) == "model"
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["var"] == "caller's"

    def broken():
        raise OSError("no such model")

    with pytest.raises(OSError, match="no such model"):
        serving._in_ended_thread(broken)
