"""The registered model's pyfunc: named columns in, Dolly's answers out, the same on every path.

The model is saved with MLflow's transformers flavor unchanged (`mlflow.transformers.load_model`
gives the usual pipeline); only its `python_function` loader points here. The loader loads MLflow's
transformers pyfunc (for its pipeline: weights, tokenizer, device) and answers with
dolly.generation, the code evaluation measures with. The contract, in-process
(`mlflow.pyfunc.load_model`), in Spark (`spark_udf`) and served (`mlflow models serve`):

- Records have an `instruction` (string) and an optional `input` (`context`, as dolly-15k names
  it, is its alias), taken *by name* from a DataFrame, records (a list of dicts), a dict of
  columns or a Spark struct; other columns are ignored. A bare string, a list of strings or one
  unnamed column are instructions. A record with a non-blank input gets Dolly's with-input prompt
  (dolly.prompts, byte-identical to training's).
- Null, NaN, pandas' NA and blank (whitespace only) instructions get "" without running the
  model; a null or blank input means "no input".
- A prompt too long for the context is shortened (dolly.generation.shorten_prompt_ids).
- What it cannot answer is refused with one line (HTTP 400 when served) naming the row or the
  param: a non-string instruction or input, an empty batch, a param it does not know (MLflow
  itself would warn and drop it) or outside its range, a `max_new_tokens` that leaves no room in
  the context, and, when served, more than `serve_max_rows` records or `serve_max_chars`
  characters in one request.

MLflow would check and convert the input against the signature before the model sees it (and
turn a null into the text "None"); for models loaded by this module, `_install_input_checks`
puts this module's checks in its place. dolly.serving_http does the same for the HTTP server.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable

from dolly import prompts

METADATA_KEY = "dolly_serving"
INSTRUCTION = "instruction"
INPUT = "input"
INPUT_ALIASES = ("input", "context")  # dolly-15k calls a record's input its context
_PACKAGE_DIR = Path(__file__).resolve().parent
# Overrides the logged serve_batch_wait_ms where the model is loaded (0 = no batching across
# calls): `mlflow models serve` has no other way to pass a setting to the model.
BATCH_WAIT_ENV = "DOLLY_SERVE_BATCH_WAIT_MS"
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("dolly_deadline",
                                                                         default=None)


@contextlib.contextmanager
def request_deadline(seconds: float | None):
    """Within this block, `predict` stops work `seconds` from now (None: no deadline): rows not
    started by then are dropped and running ones stop at the next token; the call raises
    MlflowException DEADLINE_EXCEEDED (HTTP 504). dolly.serving_http sets it to the scoring
    server's request timeout."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The deadline (`time.monotonic()` seconds) `predict` works to here, or None."""
    return _DEADLINE.get()


def set_deadline(at: float | None) -> None:
    """Set the deadline of the current context (dolly.serving_http stamps each request)."""
    _DEADLINE.set(at)


def deadline_passed():
    """The error of a call whose deadline passed (HTTP 504, as MLflow's server answers)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

    return MlflowException("the request's deadline passed before its answers were ready",
                           error_code=DEADLINE_EXCEEDED)


# --- saving: the transformers flavor, with this module as the pyfunc loader ---------------------

def save_model(path, mlflow_model=None, serving_limits: dict[str, int] | None = None,
               license_text: str | None = None, **kwargs):
    """`mlflow.transformers.save_model`, then point the pyfunc flavor at this module.

    Used as the `flavor` of `mlflow.models.Model.log`. The dolly package goes with the model
    (code_paths), so the loader imports wherever the model is served. `license_text` replaces
    the LICENSE.txt MLflow writes for a model folder (a link to a Hub page named after the
    folder, which does not exist).
    """
    import mlflow
    from mlflow.models import Model

    if mlflow_model is None:
        mlflow_model = Model()
    code_paths = [*(kwargs.pop("code_paths", None) or []), str(_PACKAGE_DIR)]
    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, code_paths=code_paths,
                                   **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.metadata = {**(mlflow_model.metadata or {}),
                             METADATA_KEY: dict(serving_limits or {})}
    mlflow_model.save(os.path.join(path, "MLmodel"))
    if license_text is not None:
        Path(path, "LICENSE.txt").write_text(license_text, encoding="utf-8")


def _load_pyfunc(path, model_config: dict[str, Any] | None = None):
    """What `mlflow.pyfunc.load_model` calls: MLflow's transformers pyfunc, wrapped."""
    from mlflow.models import Model
    from mlflow.transformers import _load_pyfunc as load_transformers_pyfunc

    from dolly import serving_http

    meta = Model.load(os.path.join(path, "MLmodel")).metadata or {}
    _install_input_checks()
    limits = meta.get(METADATA_KEY)
    load = functools.partial(load_transformers_pyfunc, path, model_config)
    # With batching across requests every generation runs in the batcher's one worker thread.
    # Loading the weights runs torch's parallel copies, and in the loading thread those start an
    # OpenMP thread pool that outlives the load; libgomp counts its threads, and once it counts
    # more than the machine has cores, every pool's idle threads sleep instead of spinning
    # (GOMP_SPINCOUNT's "throttled" count), so each small op of the worker then waits for a
    # wake-up. Measured on 2 cores: a batch of 8 rows x 16 tokens took 210 ms in the worker after
    # loading in the server's main thread, 155 ms after loading in a thread that has ended.
    batching = batch_wait_ms((limits or {}).get("serve_batch_wait_ms")) > 0
    inner = _in_ended_thread(load) if batching else load()
    pyfunc = DollyPyfunc(inner, limits)
    serving_http.contain_scoring_server(pyfunc.batcher is not None)
    return pyfunc


def _in_ended_thread(fn: Callable[[], Any]) -> Any:
    """`fn()` run in a thread of its own that has ended when this returns (with the caller's
    context variables); its result, or its exception raised here."""
    from concurrent.futures import ThreadPoolExecutor

    # Leaving the block shuts the executor down and joins its one thread.
    with ThreadPoolExecutor(1, thread_name_prefix="dolly-load") as executor:
        return executor.submit(contextvars.copy_context().run, fn).result()


def batch_wait_ms(logged: int | None) -> int:
    """How long (ms) the model gathers concurrent calls into one batch: $DOLLY_SERVE_BATCH_WAIT_MS
    where set, else the logged serve_batch_wait_ms, else 10; 0 = each call generates alone.
    Raises MlflowException naming the variable if it is not an integer >= 0."""
    raw = os.environ.get(BATCH_WAIT_ENV, "").strip()
    if not raw:
        return 10 if logged is None else int(logged)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise bad_input(f"{BATCH_WAIT_ENV} must be an integer >= 0 (milliseconds), got {raw!r}")
    return value


# --- what a request holds: records by column name --------------------------------------------

def json_kind(value) -> str:
    """What a non-string value is, in JSON's words (as batch_score's `error` column says it):
    'a number', 'a boolean', 'a list', 'an object', else 'a <Python type>'."""
    import numbers

    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, numbers.Number):  # numpy's numbers register as Numbers
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def bad_input(message: str):
    """The error a caller sees for input the model cannot answer (HTTP 400 when serving): one
    line, at most 300 characters, so that a huge request is never echoed back."""
    from mlflow.exceptions import MlflowException

    line = " ".join(str(message).split())
    return MlflowException.invalid_parameter_value(line[:297] + "..." if len(line) > 300 else line)


def is_missing(x) -> bool:
    """None, NaN (a null cell of pandas or Spark) or pandas' NA: a value that is not there."""
    import pandas as pd

    return x is None or x is pd.NA or (isinstance(x, float) and x != x)


def _columns_of(frame) -> tuple[list, list | None]:
    """(instructions, inputs or None) from a DataFrame, by column name."""
    names = [str(c) for c in frame.columns]
    if INSTRUCTION in names:
        ins = frame[frame.columns[names.index(INSTRUCTION)]].tolist()
    elif len(names) == 1 and names[0] not in INPUT_ALIASES:  # one column: instructions
        ins = frame.iloc[:, 0].tolist()
    else:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise bad_input(f"no '{INSTRUCTION}' column among the {len(names)} columns ({shown}); "
                        f"name the columns '{INSTRUCTION}' and optionally '{INPUT}'")
    given = [n for n in INPUT_ALIASES if n in names]
    if len(given) > 1:
        raise bad_input(f"both '{given[0]}' and '{given[1]}' columns: '{INPUT_ALIASES[1]}' is "
                        f"another name for '{INPUT}'; send one of them")
    inputs = frame[frame.columns[names.index(given[0])]].tolist() if given else None
    return ins, inputs


def _record(row: dict, i: int) -> tuple[Any, Any]:
    keys = [str(k) for k in row]
    if INSTRUCTION not in keys:
        raise bad_input(f"record {i} has no '{INSTRUCTION}' field (fields: "
                        f"{', '.join(keys[:8]) or 'none'})")
    given = [n for n in INPUT_ALIASES if n in keys]
    if len(given) > 1:
        raise bad_input(f"record {i} has both '{given[0]}' and '{given[1]}': send one of them")
    return row[INSTRUCTION], (row[given[0]] if given else None)


def records_of(data) -> tuple[list, list]:
    """(instructions, inputs) of a pyfunc input, values as given (checked by `as_frame`).

    Named columns from a DataFrame (also what `spark_udf` passes, struct or columns), a dict of
    columns, or a list of records (dicts); a string, a list of strings, a Series, a 1-D array or
    a single column: instructions without input. Raises MlflowException (400) on other shapes.
    """
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        return [data], [None]
    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 0:
            raise bad_input(f"the input has no columns: send an '{INSTRUCTION}' column")
        ins, inputs = _columns_of(data)
        return ins, inputs if inputs is not None else [None] * len(ins)
    if isinstance(data, pd.Series):
        return data.tolist(), [None] * len(data)
    if isinstance(data, np.ndarray):
        if data.ndim == 2 and data.shape[1] == 1:
            data = data[:, 0]
        if data.ndim > 1:
            raise bad_input(f"an array of shape {data.shape}: send named columns "
                            f"('{INSTRUCTION}', '{INPUT}') or one column of instructions")
        values = data.tolist() if data.ndim else [data.item()]
        return values, [None] * len(values)
    if isinstance(data, dict):
        only = str(next(iter(data))) if len(data) == 1 else None
        if INSTRUCTION not in data and only is not None and only not in INPUT_ALIASES:
            # {"anything": [instructions]}
            return records_of(pd.Series(_as_list(next(iter(data.values())))))
        try:
            frame = pd.DataFrame({k: _as_list(v) for k, v in data.items()}, dtype=object)
        except ValueError:
            raise bad_input("the columns of the input differ in length") from None
        return records_of(frame)
    if isinstance(data, (list, tuple)):
        ins, inputs = [], []
        for i, row in enumerate(data):
            if isinstance(row, dict):
                a, b = _record(row, i)
            else:
                a, b = (row[0] if isinstance(row, (list, tuple)) and len(row) == 1 else row), None
            ins.append(a)
            inputs.append(b)
        return ins, inputs
    raise bad_input(f"expected records or instructions, got a {type(data).__name__}")


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else [v]


def as_frame(data):
    """The checked records of a pyfunc input: a DataFrame with string columns `instruction` and
    `input` ("" where missing or null), one row per record, in order.

    Raises MlflowException (400) naming the first row whose instruction or input is present but
    not a string (a number, a boolean, a list, ...).
    """
    import pandas as pd

    if isinstance(data, pd.DataFrame) and list(data.columns) == [INSTRUCTION, INPUT] \
            and data.attrs.get(METADATA_KEY):
        return data  # already checked
    ins, inputs = records_of(data)
    for name, values in ((INSTRUCTION, ins), (INPUT, inputs)):
        for i, v in enumerate(values):
            if is_missing(v):
                values[i] = ""
            elif not isinstance(v, str):
                raise bad_input(f"row {i}: {name} is {json_kind(v)}, expected a string "
                                f"(or null for {'no input' if name == INPUT else 'no answer'})")
    frame = pd.DataFrame({INSTRUCTION: [str(v) for v in ins], INPUT: [str(v) for v in inputs]},
                         dtype=object)
    frame.attrs[METADATA_KEY] = True
    return frame


# --- generation params --------------------------------------------------------------------------

# name: (type check, range check, the allowed range in words)
_PARAMS = {
    "max_new_tokens": (lambda v: isinstance(v, int), lambda v: v >= 1, "an integer >= 1"),
    "temperature": (lambda v: isinstance(v, (int, float)), lambda v: 0 <= v < float("inf"),
                    "a number >= 0 (0 = greedy)"),
    "top_p": (lambda v: isinstance(v, (int, float)), lambda v: 0 <= v <= 1,
              "a number from 0 to 1"),
    "top_k": (lambda v: isinstance(v, int), lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "do_sample": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
}


def check_params(params, known=None) -> dict:
    """The generation params of a request, checked: unknown names, types and ranges give one
    line naming the param and its allowed range (MlflowException, 400); null means the default
    (left out). `known`: the names the model's signature declares (default: all of _PARAMS)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_input(f"params must be an object of name: value, got a {type(params).__name__}")
    known = set(known if known is not None else _PARAMS)
    if unknown := sorted(str(k) for k in params if str(k) not in known):
        raise bad_input(f"unknown params {unknown}: this model takes {sorted(known)}")
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        is_type, in_range, allowed = _PARAMS.get(name, (lambda v: True, lambda v: True, ""))
        if not is_type(value) or (isinstance(value, bool) and name != "do_sample") \
                or not in_range(value):
            raise bad_input(f"{name} must be {allowed}, got {_short(value)}")
        out[name] = value
    return out


def _short(value) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _install_input_checks() -> None:
    """For models loaded by this module, put `as_frame` and `check_params` in place of MLflow's
    own input check (its private `_validate_prediction_input`): MLflow would convert a null
    instruction to "None" and numbers to text, drop a `context` column as unknown, and only warn
    about an unknown param (so a typo such as `max_new_token` would silently generate 256
    tokens). Models of other flavors are not affected. If a future MLflow renames the check,
    MLflow's checks apply again, DollyPyfunc.predict still checks, and tests/test_serving.py
    fails."""
    import mlflow.pyfunc as pyfunc

    check = getattr(pyfunc, "_validate_prediction_input", None)
    if check is None or getattr(check, "dolly_checks", False):
        return

    def dolly_check(data, params, input_schema, params_schema, flavor=None):
        if flavor != __name__:
            return check(data, params, input_schema, params_schema, flavor)
        known = [p.name for p in params_schema.params] if params_schema is not None else None
        return check(as_frame(data), check_params(params, known), None, params_schema, flavor)

    dolly_check.dolly_checks = True
    pyfunc._validate_prediction_input = dolly_check


# --- predicting ---------------------------------------------------------------------------------

class DollyPyfunc:
    """The pyfunc of Dolly's registered model: checks, then dolly.generation on the pipeline's
    model and tokenizer (loaded by MLflow's transformers flavor)."""

    def __init__(self, inner, limits: dict[str, int] | None = None):
        from dolly.generation import context_length

        self._inner = inner
        self._tokenizer = inner.pipeline.tokenizer
        self.context = context_length(inner.pipeline.model, self._tokenizer)
        self._frame = len(self._ids(prompts.format_prompt("")))  # the no-input template
        limits = limits or {}
        self.max_rows = int(limits.get("serve_max_rows") or 0)
        self.max_chars = int(limits.get("serve_max_chars") or 0)
        self.batch_size = int((getattr(inner, "model_config", None) or {}).get("batch_size") or 8)
        wait_ms = batch_wait_ms(limits.get("serve_batch_wait_ms"))
        self.batcher = None
        if wait_ms > 0:
            from dolly.request_batching import RequestBatcher

            self.batcher = RequestBatcher(self._generate, self.batch_size, wait_ms / 1000)

    @property
    def pipeline(self):
        """The transformers pipeline, as MLflow's own wrapper exposes it."""
        return self._inner.pipeline

    def get_raw_model(self):
        """The transformers pipeline (what `PyFuncModel.get_raw_model()` returns)."""
        return self._inner.pipeline

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check(self, frame, params: dict) -> dict:
        """Request-level checks; returns the generation settings to use."""
        n = len(frame)
        if not n:
            raise bad_input("no instructions: send at least one")
        serving = os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"
        if serving and self.max_rows and n > self.max_rows:
            raise bad_input(f"request too large: {n} records, the server takes at most "
                            f"{self.max_rows} per request; split it")
        chars = int(frame[INSTRUCTION].str.len().sum() + frame[INPUT].str.len().sum())
        if serving and self.max_chars and chars > self.max_chars:
            raise bad_input(f"request too large: {chars} characters of instructions and inputs, "
                            f"the server takes at most {self.max_chars} per request")
        settings = {**prompts.GENERATION_DEFAULTS, **check_params(params)}
        max_new = settings["max_new_tokens"]
        if max_new + self._frame + 1 > self.context:
            raise bad_input(f"max_new_tokens must be at most {self.context - self._frame - 1} "
                            f"for this model (context {self.context} tokens, prompt template "
                            f"{self._frame}), got {max_new}")
        if settings["temperature"] == 0:
            settings["do_sample"] = False  # temperature 0: greedy, as most LLM APIs read it
        return settings

    def _prompt_lengths(self, rows: list[tuple[str, str]]) -> list[int]:
        """Tokens of each row's instruction and input (what orders rows into batches; the
        template adds the same few to each). A text longer than the context is measured on its
        last context x 64 characters, as dolly.generation shortens it."""
        cap = self.context * 64
        texts = [f"{a}\n{b}"[-cap:] for a, b in rows]
        return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _generate(self, rows: list[tuple[str, str]], settings: dict,
                  deadlines: list[float | None]) -> list:
        """dolly.generation.generate for (instruction, input) rows: their Generations, in order."""
        from dolly import generation

        return generation.generate(
            self._inner.pipeline.model, self._tokenizer, [r[0] for r in rows],
            [r[1] for r in rows], max_new_tokens=settings["max_new_tokens"],
            batch_size=self.batch_size, do_sample=settings["do_sample"],
            temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
            top_k=settings["top_k"], deadlines=deadlines).generations

    def predict(self, data, params: dict[str, Any] | None = None) -> list[str]:
        """One response per record, in order; "" for null, empty or blank instructions.

        Rows are generated shortest prompt first in batches of the logged batch_size, and, when
        batching across calls is on (serve_batch_wait_ms > 0), together with the rows of
        concurrent calls that use the same generation settings. Raises MlflowException: 400 for
        input it cannot answer, DEADLINE_EXCEEDED (504) when `request_deadline` passes first.
        """
        from dolly.generation import expired
        from dolly.request_batching import DeadlinePassed

        frame = as_frame(data)
        settings = self._check(frame, params or {})
        answers = [""] * len(frame)
        todo = [i for i, text in enumerate(frame[INSTRUCTION]) if text.strip()]
        if not todo:
            return answers
        rows = [(frame[INSTRUCTION].iat[i], frame[INPUT].iat[i]) for i in todo]
        deadline = _DEADLINE.get()
        if expired([deadline])[0]:
            raise deadline_passed()
        if self.batcher is None:
            generations = self._generate(rows, settings, [deadline] * len(rows))
        else:
            try:
                generations = self.batcher.submit(
                    rows, settings, tuple(sorted(settings.items())),
                    lengths=self._prompt_lengths(rows), deadline=deadline)
            except DeadlinePassed:
                raise deadline_passed() from None
        if any(g.expired for g in generations):
            raise deadline_passed()
        for i, g in zip(todo, generations):
            answers[i] = g.response
        return answers
