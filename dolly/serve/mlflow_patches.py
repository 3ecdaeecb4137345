"""Every patch of MLflow internals, in one file: the version-fragile surface of this project.

Each patch applies to models loaded by dolly.serve.pyfunc only (their pyfunc `loader_module` is
DOLLY_LOADER); every other model keeps MLflow's behaviour. Checked against MLflow 3.17.2
(requirements.txt pins it); tests/serve and tests/e2e/test_model_server.py fail when an upgrade
changes what is patched.

1. `install_input_checks`: MLflow's pyfunc input check (`mlflow.pyfunc._validate_prediction_input`)
   is replaced by the request contract's (dolly.serve.contract) for these models.
2. `contain_scoring_server`: `mlflow models serve` for these models: requests parsed without
   MLflow's conversions, short error bodies, a 415 (not a 500) for a request without a
   Content-Type, each request stamped with its deadline, and enough threads for batching.

MLflow's scoring server (mlflow/pyfunc/scoring_server/__init__.py, `invocations`) would, for this
model: convert JSON values to text against the signature before the model sees them (null ->
"None", 1 -> "1"); prefix an error's message with the whole request ("Failed to predict data
'...'"), so a refused 10 MB request gets a 10 MB error body; put a Python traceback with the
server's file paths into the body of an unexpected error; and fail with an AttributeError (HTTP
500) on a request without a Content-Type header (`content_type.split` on None). The server calls
`invocations` by its module name on every request, so the model's loader (dolly.serve.pyfunc) swaps
in `dolly_invocations` when the model is loaded: for models loaded by it only, JSON and CSV are
parsed here and handed to the model as sent, and every error becomes a short body
`{"error_code": ..., "message": <one line, at most 300 characters>}`; the full detail goes to the
server log. Any body that is not a well-formed request is a 400, never a 500: MLflow's JSON
parse would answer 500 to nesting deeper than Python's recursion limit or an integer of more than
4,300 digits, take the last of a key given twice, and pass a lone surrogate ("\\ud800") on to
the tokenizer (a TypeError); its CSV parse (pandas' defaults) would turn the cell `0042` into the
number 42.0 and `NA` into a missing value (mlflow/mlflow#5525), where the same record sent as JSON
strings is text. Parquet goes to MLflow's own parser; its errors are shortened the same way.

The server hands each request to a thread with `asyncio.to_thread`; the loader also gives the
server module its own `to_thread` (`_server_asyncio`), which (1) stamps the request with its
deadline, the server's own timeout (`MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`, `mlflow models serve
-t`; 60 s by default) counted from when the body has arrived, so that once the server has
answered 504 the model drops the request's rows from its queue or stops generating them
(dolly.serve.deadline); and (2) with batching across requests on, runs requests in a
pool large enough that none waits for a thread (asyncio's default pool, min(32, cores + 4), is 6
threads on 2 cores): a waiting request could not join the batch being gathered.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re

from dolly.serve import json_body, openai_api
from dolly.serve.contract import (INPUT, INSTRUCTION, as_frame, bad_input, check_params,
                                  json_kind, printable)
from dolly.serve.deadline import current_deadline, request_deadline, set_deadline
from dolly.serve.json_body import _short_text, request_text

_logger = logging.getLogger(__name__)
# The pyfunc loader of Dolly's models (dolly.serve.pyfunc's module name, what its MLmodel records).
DOLLY_LOADER = "dolly.serve.pyfunc"

FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")
ACCEPTED_TYPES = ("application/json", "text/csv", "application/vnd.apache.parquet")
_MAX_MESSAGE = 300
_THREADS = 256  # threads that wait for the model's batches cost memory only
_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[\w.+-]+[/\\])+[\w.+-]*")


# --- 1. the pyfunc's input check ------------------------------------------------------------

def install_input_checks() -> None:
    """For models loaded by dolly.serve.pyfunc, put `as_frame` and `check_params` in place of MLflow's
    own input check (its private `_validate_prediction_input`): MLflow would convert a null
    instruction to "None" and numbers to text, drop a `context` column as unknown, only warn
    about an unknown param (so a typo such as `max_new_token` would silently generate 256
    tokens), and fill in the params the caller left out, so that the model could not tell a
    default from a param the caller set. Models of other flavors are not affected. If a future
    MLflow renames the check, MLflow's checks apply again, DollyPyfunc.predict still checks, and
    tests/serve fail."""
    import mlflow.pyfunc as pyfunc

    check = getattr(pyfunc, "_validate_prediction_input", None)
    if check is None or getattr(check, "dolly_checks", False):
        return

    def dolly_check(data, params, input_schema, params_schema, flavor=None):
        if flavor != DOLLY_LOADER:
            return check(data, params, input_schema, params_schema, flavor)
        known = [p.name for p in params_schema.params] if params_schema is not None else None
        if openai_api.is_request(data):  # checked by the model (dolly.serve.openai_api)
            return data, check_params(params, known)
        # the params as the caller set them: MLflow's check would fill in the signature's
        # defaults, and the model (which fills in the same ones) could not tell them apart
        return as_frame(data), check_params(params, known)

    dolly_check.dolly_checks = True
    pyfunc._validate_prediction_input = dolly_check


# --- 2. the HTTP scoring server ---------------------------------------------------------------

def short_message(message: str) -> str:
    """One line, at most 300 characters, file paths replaced by <path>: what an error body says."""
    line = " ".join(_PATH.sub("<path>", printable(str(message))).split())
    return line if len(line) <= _MAX_MESSAGE else line[:_MAX_MESSAGE - 3] + "..."


def _error(status: int, code: str, message: str):
    from mlflow.pyfunc.scoring_server import InvocationsResponse

    body = json.dumps({"error_code": code, "message": short_message(message)})
    return InvocationsResponse(response=body, status=status, mimetype="application/json")


def _is_dolly(model) -> bool:
    flavors = getattr(getattr(model, "metadata", None), "flavors", None) or {}
    return (flavors.get("python_function") or {}).get("loader_module") == DOLLY_LOADER


def _split_frame(split):
    """The DataFrame of a `dataframe_split` (pandas' orient="split"): rows as lists, one value
    per column, as sent."""
    import pandas as pd

    if not isinstance(split, dict) or "data" not in split or set(split) - {"columns", "data",
                                                                            "index"}:
        raise bad_input("dataframe_split must be an object with data and optionally columns and "
                        "index")
    columns, rows = split.get("columns"), split["data"]
    if columns is not None and (not isinstance(columns, list)
                                or not all(isinstance(c, str) for c in columns)):
        raise bad_input("dataframe_split columns must be a list of column names (strings)")
    if not isinstance(rows, list):
        raise bad_input(f"dataframe_split data must be a list of rows, got {json_kind(rows)}")
    width = len(columns) if columns is not None else len(rows[0]) if rows and isinstance(
        rows[0], list) else None
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise bad_input(f"dataframe_split data must be a list of rows (arrays): row {i} is "
                            f"{json_kind(row)}")
        if len(row) != width:
            raise bad_input(f"dataframe_split row {i} has {len(row)} values for {width} columns")
    index = split.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(rows)):
        raise bad_input(f"dataframe_split index must be a list of {len(rows)} labels, one per row")
    return pd.DataFrame(rows, columns=columns, dtype=object)


def parse_json_request(body: bytes | str):
    """(data, params) of a JSON request body, values as sent: `inputs`/`instances` as the JSON
    value, `dataframe_records` as a list of records, `dataframe_split` as a DataFrame of Python
    objects. Raises MlflowException (400) with a one-line message for anything else: text that
    is not UTF-8 or not JSON, or any other fault `json_body.loads` refuses (nesting, huge
    numbers, lone surrogates, a key given twice), or a body of another shape. NaN, Infinity and -Infinity are taken (NaN is
    a missing value, as in pandas)."""
    payload = json_body.loads(body)
    if openai_api.is_request(payload):  # a chat or completions request: the model checks it
        return payload, None
    given = [k for k in FORMATS if isinstance(payload, dict) and k in payload]
    if len(given) != 1:
        raise bad_input(f"the body must be a JSON object with exactly one of {list(FORMATS)} "
                        "(and optionally params)")
    if extra := sorted(str(k) for k in payload if k not in (*FORMATS, "params")):
        raise bad_input(f"unknown fields {[_short_text(k) for k in extra[:5]]}: the body takes "
                        f"one of {list(FORMATS)} and params")
    data = payload[given[0]]
    if given[0] == "dataframe_split":
        data = _split_frame(data)
    elif given[0] == "dataframe_records":
        if not isinstance(data, list):
            raise bad_input("dataframe_records must be a list of records")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise bad_input(f"dataframe_records must be a list of records (objects): record "
                                f"{i} is {json_kind(record)}")
    return data, payload.get("params")


def parse_csv_request(body: bytes | str):
    """The DataFrame of a CSV request body: the first line names the columns, every cell is text
    as written (`0042`, `NA`, `null`, `True`, `1e5` stay strings; an empty cell is ""), as the
    same records sent as JSON strings. Raises MlflowException (400) with a one-line message."""
    import io

    import pandas as pd

    text = request_text(body)
    try:
        cells = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False,
                            na_filter=False)
    except pd.errors.EmptyDataError:
        raise bad_input("the CSV body is empty: send a header line naming the columns "
                        f"('{INSTRUCTION}', optionally '{INPUT}'), then one line per record") \
            from None
    except (pd.errors.ParserError, ValueError) as e:
        raise bad_input(f"the body is not valid CSV: {e}") from None
    header = cells.iloc[0].tolist()
    return pd.DataFrame(cells.iloc[1:].to_numpy(), columns=header, dtype=object)


def dolly_invocations(original):
    """MLflow's `invocations(data, content_type, model, input_schema)`, contained for Dolly's
    model as the module docstring says; other models get `original` unchanged."""

    def invocations(data, content_type, model, input_schema):
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import InvocationsResponse

        if not _is_dolly(model):
            return original(data, content_type, model, input_schema)
        try:
            mime, *options = [part.strip() for part in (content_type or "").split(";")]
            mime = mime.lower()
            if not mime:
                return _error(415, "BAD_REQUEST", "no Content-Type header: send "
                              f"{', '.join(ACCEPTED_TYPES)}")
            if mime not in ("application/json", "text/csv"):  # Parquet, or a 415
                response = original(data, content_type, model, input_schema)
                if response.status >= 400:
                    return _error(response.status, "BAD_REQUEST", response.response)
                return response
            if unsupported := _content_type_options(options):
                return _error(415, "BAD_REQUEST", unsupported)
            if mime == "text/csv":
                records, params = parse_csv_request(data), None
            else:
                records, params = parse_json_request(data)
            stamped = current_deadline() is not None  # by _server_asyncio
            with (contextlib.nullcontext() if stamped else request_deadline(request_timeout())):
                predictions = model.predict(records, params=params)
            # an OpenAI request is answered with its completion object, as MLflow's server
            # answers llm/v1 models; any other with {"predictions": [...]}
            out = (predictions[0] if openai_api.is_request(records)
                   else {"predictions": list(predictions)})
            return InvocationsResponse(response=json.dumps(out), status=200,
                                       mimetype="application/json")
        except MlflowException as e:
            _logger.warning("refused a request (%s): %s", e.error_code,
                            printable(str(e.message)[:10_000]))
            return _error(e.get_http_status_code(), e.error_code, e.message)
        except Exception:
            _logger.exception("internal error while answering a request")
            return _error(500, "INTERNAL_ERROR",
                          "internal error while answering the request; see the server log")

    invocations.dolly = True
    return invocations


def _content_type_options(options: list[str]) -> str | None:
    """Why the Content-Type's parameters (`charset=utf-8`) cannot be served, or None: the body is
    read as UTF-8, as MLflow's server reads it, and no other parameter is known."""
    for option in filter(None, options):
        name, _, value = option.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"').lower()
        if name != "charset":
            return (f"unknown Content-Type parameter {_short_text(printable(name))!r}: send "
                    "charset=utf-8 or none")
        if value not in ("utf-8", "utf8"):
            return f"charset {_short_text(printable(value))}: the server reads UTF-8 only"
    return None


def request_timeout() -> float:
    """The scoring server's request timeout in seconds (what it waits before answering 504)."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    try:
        return float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    except (TypeError, ValueError):  # the server itself would not have started
        return 60.0


def _server_asyncio(batching: bool):
    """The `asyncio` the scoring server module sees: asyncio itself, except that `to_thread`
    stamps each request's deadline and, with `batching`, runs it in a large pool (see the module
    docstring)."""
    import asyncio
    import contextvars
    import functools
    import time
    import types
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="dolly-request") if batching else None

    async def to_thread(func, /, *args, **kwargs):
        context = contextvars.copy_context()
        context.run(set_deadline, time.monotonic() + request_timeout())
        call = functools.partial(context.run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    namespace = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio)
                                         if not k.startswith("__")})
    namespace.to_thread = to_thread
    namespace.dolly = True
    return namespace


def _loading_in_server() -> bool:
    """True while `mlflow models serve`'s app module (mlflow.pyfunc.scoring_server.app, what its
    uvicorn command imports) is loading the model, before it builds its app."""
    import sys

    module = sys.modules.get("mlflow.pyfunc.scoring_server.app")
    return module is not None and not hasattr(module, "app")


def add_openai_routes_to_server_app(pyfunc) -> None:
    """Have the scoring server's app, built right after its model is loaded
    (`app = scoring_server.init(load_model(...))` in mlflow.pyfunc.scoring_server.app), carry the
    OpenAI routes (dolly.serve.openai_api.add_routes) beside `/invocations`: `init` creates the
    app with `fastapi.FastAPI()`, so the next FastAPI app created in this process gets the routes,
    and the one after that is FastAPI's own again."""
    import fastapi

    original = fastapi.FastAPI
    if getattr(original, "dolly", False):
        return

    class ServerApp(original):
        dolly = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fastapi.FastAPI = original  # this one app only
            openai_api.add_routes(self, pyfunc, request_timeout)

    fastapi.FastAPI = ServerApp


def contain_scoring_server(batching: bool = False, pyfunc=None) -> None:
    """Swap MLflow's scoring-server `invocations` for `dolly_invocations` and its `asyncio` for
    `_server_asyncio(batching)` (once per process), and, while `mlflow models serve` loads
    `pyfunc`, add the OpenAI routes to its app (`add_openai_routes_to_server_app`). Called by
    dolly.serve.pyfunc's loader; harmless outside a server (nothing calls them there)."""
    from mlflow.pyfunc import scoring_server

    if pyfunc is not None and _loading_in_server():
        add_openai_routes_to_server_app(pyfunc)

    if not getattr(scoring_server.invocations, "dolly", False):
        scoring_server.invocations = dolly_invocations(scoring_server.invocations)
    if not getattr(scoring_server.asyncio, "dolly", False):
        scoring_server.asyncio = _server_asyncio(batching)
