"""dolly.serve.mlflow_patches: the scoring server's request handling for this model: JSON parsed
as sent, one-line errors, each request stamped with its deadline."""
import pytest

from dolly.serve import mlflow_patches
from dolly.serve.contract import as_frame, check_params
from dolly.serve.deadline import current_deadline


@pytest.mark.parametrize("batching, thread", [(True, "dolly-request"), (False, "asyncio")])
def test_the_server_stamps_each_request_with_its_timeout_as_deadline(monkeypatch, batching,
                                                                     thread):
    import asyncio
    import threading
    import time

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")
    server_asyncio = mlflow_patches._server_asyncio(batching)
    t0 = time.monotonic()
    deadline, name = asyncio.run(server_asyncio.to_thread(
        lambda: (current_deadline(), threading.current_thread().name)))
    assert t0 + 7 <= deadline < t0 + 8
    # with batching, a pool of its own: no request waits for one of asyncio's 6 threads
    assert name.startswith(thread)
    assert current_deadline() is None  # the caller's context is untouched
    assert server_asyncio.wait_for is asyncio.wait_for  # the rest is asyncio itself


class _Meta:
    flavors = {"python_function": {"loader_module": "dolly.serve.pyfunc"}}


class _Model:
    """Stands for the PyFuncModel the server holds (its predict: DollyPyfunc's checks only)."""

    metadata = _Meta()

    def predict(self, data, params=None):
        frame = as_frame(data)
        check_params(params)
        return [f"{i}|{n}" for i, n in zip(frame["instruction"], frame["input"])]


def _invoke(body, content_type="application/json"):
    import json

    from dolly.serve.mlflow_patches import dolly_invocations

    def mlflow_invocations(data, content_type, model, input_schema):
        raise AssertionError("JSON for this model is parsed by dolly.serve.mlflow_patches")

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
    from dolly.serve.mlflow_patches import short_message

    assert short_message("failed in /usr/lib/python3.11/site-packages/x.py\n  line 3") == \
        "failed in <path> line 3"
    assert len(short_message("x" * 10_000)) == 300
    status, body = _invoke(b'{"inputs": ["' + b"a" * 100 + b'"')
    assert status == 400 and body["message"].startswith("the body is not valid JSON:")
