"""A request's deadline, carried by a context variable from the server's request thread (or an
in-process caller) to the model's predict, which stops working on the request once it passes.

`mlflow models serve` answers 504 when a request outlives its timeout, but its worker thread
keeps running; dolly.serve.mlflow_patches stamps each request with that timeout, and
DollyPyfunc.predict drops the request's rows from the batch queue or stops generating them at the
next token (dolly.generation.DeadlineStop). Deadlines are `time.monotonic()` seconds.
"""
from __future__ import annotations

import contextlib
import contextvars
import time

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("dolly_deadline",
                                                                         default=None)


@contextlib.contextmanager
def request_deadline(seconds: float | None):
    """Within this block, `predict` stops work `seconds` from now (None: no deadline): rows not
    started by then are dropped and running ones stop at the next token; the call raises
    MlflowException DEADLINE_EXCEEDED (HTTP 504). dolly.serve.mlflow_patches sets it to the
    scoring server's request timeout."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The deadline (`time.monotonic()` seconds) `predict` works to here, or None."""
    return _DEADLINE.get()


def set_deadline(at: float | None) -> None:
    """Set the deadline of the current context (dolly.serve.mlflow_patches stamps each
    request)."""
    _DEADLINE.set(at)


def deadline_passed():
    """The error of a call whose deadline passed (HTTP 504, as MLflow's server answers)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

    return MlflowException("the request's deadline passed before its answers were ready",
                           error_code=DEADLINE_EXCEEDED)
