"""`mlflow models serve` for Dolly's model: requests parsed without MLflow's conversions, short
error bodies, and a 415 (not a 500) for a request without a Content-Type.

MLflow's scoring server (mlflow/pyfunc/scoring_server/__init__.py, `invocations`) would, for this
model: convert JSON values to text against the signature before the model sees them (null ->
"None", 1 -> "1"); prefix an error's message with the whole request ("Failed to predict data
'...'"), so a refused 10 MB request gets a 10 MB error body; put a Python traceback with the
server's file paths into the body of an unexpected error; and fail with an AttributeError (HTTP
500) on a request without a Content-Type header (`content_type.split` on None). The server calls
`invocations` by its module name on every request, so the model's loader (dolly.serving) swaps in
`dolly_invocations` when the model is loaded: for models loaded by dolly.serving only, JSON is
parsed here and handed to the model as sent, and every error becomes a short body
`{"error_code": ..., "message": <one line, at most 300 characters>}`; the full detail goes to the
server log. Other content types (CSV, Parquet) go to MLflow's own parser; their errors are
shortened the same way.

Every request carries a deadline, the server's own timeout (`MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`,
`mlflow models serve -t`; 60 s by default): when it has answered 504, the model drops the
request's rows from its queue or stops generating them (dolly.serving.request_deadline). With
batching across requests on, the event loop's thread pool is enlarged so that no request waits
for a free thread (asyncio's default, min(32, cores + 4), is 6 threads on 2 cores): its clock
would run while it waits, and it could not join the batch being gathered.
"""
from __future__ import annotations

import json
import logging
import os
import re

_logger = logging.getLogger(__name__)

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
ACCEPTED_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")
_MAX_MESSAGE = 300
_THREADS = 256  # threads that wait for the model's batches cost memory only
_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[\w.+-]+[/\\])+[\w.+-]*")


def short_message(message: str) -> str:
    """One line, at most 300 characters, file paths replaced by <path>: what an error body says."""
    line = " ".join(_PATH.sub("<path>", str(message)).split())
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE - 3] + "..."


def _error(status: int, code: str, message: str):
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    body = json.dumps({"error_code": code, "message": short_message(message)})
    return InvocationsResponse(response=body, status=status, mimetype="application/json")


def _is_dolly(model) -> bool:
    flavors = getattr(getattr(model, "metadata", None), "flavors", None) or {}
    return (flavors.get("python_function") or {}).get("loader_module") == "dolly.serving"


def parse_json_request(body: bytes | str):
    """(data, params) of a JSON request body, values as sent: `inputs`/`instances` as the JSON
    value, `dataframe_records` as a list of records, `dataframe_split` as a DataFrame of Python
    objects. Raises MlflowException (400) with a one-line message."""
    import pandas as pd

    from dolly.serving import bad_input

    try:
        payload = json.loads(body)
    except json.JSONDecodeError as e:
        raise bad_input(f"the body is not valid JSON: {e.msg} (line {e.lineno}, column "
                        f"{e.colno})") from None
    except UnicodeDecodeError:
        raise bad_input("the body is not valid UTF-8") from None
    given = [k for k in FORMATS if isinstance(payload, dict) and k in payload]
    if len(given) != 1:
        raise bad_input(f"the body must be a JSON object with exactly one of {list(FORMATS)} "
                        "(and optionally params)")
    if extra := sorted(str(k) for k in payload if k not in (*FORMATS, "params")):
        raise bad_input(f"unknown fields {extra[:5]}: the body takes one of {list(FORMATS)} "
                        "and params")
    data = payload[given[0]]
    if given[0] == "dataframe_split":
        if not isinstance(data, dict) or "data" not in data or set(data) - {"columns", "data",
                                                                              "index"}:
            raise bad_input("dataframe_split must be an object with data and optionally columns "
                            "and index")
        try:
            data = pd.DataFrame(data["data"], columns=data.get("columns"), dtype=object)
        except (ValueError, TypeError) as e:
            raise bad_input(f"dataframe_split is not a table: {e}") from None
    elif given[0] == "dataframe_records" and not isinstance(data, list):
        raise bad_input("dataframe_records must be a list of records")
    return data, payload.get("params")


def dolly_invocations(original):
    """MLflow's `invocations(data, content_type, model, input_schema)`, contained for Dolly's
    model as the module docstring says; other models get `original` unchanged."""

    def invocations(data, content_type, model, input_schema):
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import InvocationsResponse

        from dolly import serving

        if not _is_dolly(model):
            return original(data, content_type, model, input_schema)
        try:
            mime = (content_type or "").split(";")[0].strip().lower()
            if not mime:
                return _error(415, "BAD_REQUEST", "no Content-Type header: send "
                              f"{', '.join(ACCEPTED_TYPES)}")
            if mime != "application/json":
                response = original(data, content_type, model, input_schema)
                if response.status >= 400:
                    return _error(response.status, "BAD_REQUEST", response.response)
                return response
            records, params = parse_json_request(data)
            with serving.request_deadline(request_timeout()):
                predictions = model.predict(records, params=params)
            return InvocationsResponse(response=json.dumps({"predictions": list(predictions)}),
                                       status=200, mimetype="application/json")
        except MlflowException as e:
            _logger.warning("refused a request (%s): %s", e.error_code, str(e.message)[:10_000])
            return _error(e.get_http_status_code(), e.error_code, e.message)
        except Exception:
            _logger.exception("internal error while answering a request")
            return _error(500, "INTERNAL_ERROR",
                          "internal error while answering the request; see the server log")

    invocations.dolly = True
    return invocations


def request_timeout() -> float:
    """The scoring server's request timeout in seconds (what it waits before answering 504)."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    try:
        return float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    except (TypeError, ValueError):  # the server itself would not have started
        return 60.0


def contain_scoring_server(batching: bool = False) -> None:
    """Swap MLflow's scoring-server `invocations` for `dolly_invocations` (once per process).
    Called by dolly.serving's loader; harmless outside a server (nothing calls it there). With
    `batching`, inside the server (uvicorn loads the model in its running event loop) the loop
    gets a thread pool large enough that every request reaches the model at once."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.pyfunc import scoring_server

    if not getattr(scoring_server.invocations, "dolly", False):
        scoring_server.invocations = dolly_invocations(scoring_server.invocations)
    if batching and os.environ.get(scoring_server._SERVER_MODEL_PATH):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not loaded by the server's event loop
            return
        loop.set_default_executor(ThreadPoolExecutor(_THREADS, thread_name_prefix="dolly-request"))
