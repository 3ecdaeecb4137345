"""The registered model's pyfunc: MLflow's transformers pyfunc, made safe for serving and Spark.

The model is saved with MLflow's transformers flavor unchanged (`mlflow.transformers.load_model`
gives the usual pipeline); only its `python_function` loader points here. The loader wraps
MLflow's own transformers pyfunc and, before it generates:

- shortens an instruction too long for the context so that the prompt plus the answer fit,
  keeping the template and the *end* of the instruction (as dolly.generation does in evaluation);
- answers empty, whitespace-only and null instructions with "" without running the model;
- rejects, with a one-line message (HTTP 400 from `mlflow models serve`), what it cannot answer:
  non-string instructions, an empty batch, a `max_new_tokens` that leaves no room in the context,
  params the model does not know (MLflow itself only warns and drops them, so a typo such as
  `max_new_token` would silently generate 256 tokens), and, when serving, a request over
  `serve_max_rows` instructions or `serve_max_chars` characters.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dolly import prompts

METADATA_KEY = "dolly_serving"
# A BPE token is rarely longer than a few characters; cutting text to this many characters per
# token kept keeps tokenizing a megabyte-long instruction cheap. The token-level cut is exact.
_CHARS_PER_TOKEN_BOUND = 64
_PACKAGE_DIR = Path(__file__).resolve().parent


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

    meta = Model.load(os.path.join(path, "MLmodel")).metadata or {}
    _reject_unknown_params()
    return DollyPyfunc(load_transformers_pyfunc(path, model_config), meta.get(METADATA_KEY))


# --- predicting ---------------------------------------------------------------------------------

def bad_input(message: str):
    """The error a caller sees for input the model cannot answer (HTTP 400 when serving)."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def instructions_of(data) -> list:
    """The instructions in a pyfunc input: a string, a list, an array, a Series, or a DataFrame
    (its first column) or dict (its only value); items are left as given (checked later)."""
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        return [data]
    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 0:
            raise bad_input("the input has no columns: send instructions in the first column")
        return data.iloc[:, 0].tolist()
    if isinstance(data, pd.Series):
        return data.tolist()
    if isinstance(data, np.ndarray):
        return (data if data.ndim <= 1 else data[:, 0]).tolist() if data.ndim else [data.item()]
    if isinstance(data, dict):
        if len(data) != 1:
            raise bad_input(f"expected one field of instructions, got {sorted(map(str, data))}")
        return instructions_of(next(iter(data.values())))
    if isinstance(data, (list, tuple)):
        return [row[0] if isinstance(row, (list, tuple)) and len(row) == 1 else row
                for row in data]
    raise bad_input(f"expected instructions as strings, got {type(data).__name__}")


def _reject_unknown_params() -> None:
    """Make MLflow's pyfunc input check reject unknown params, for models loaded by this module.

    MLflow drops params outside the signature with a warning before the model sees them, and has
    no option to refuse them, so this wraps its (private) check; models of other flavors are not
    affected. If a future MLflow renames the check, unknown params are dropped again, as MLflow
    does, and tests/e2e/test_model_server.py fails.
    """
    import mlflow.pyfunc as pyfunc

    check = getattr(pyfunc, "_validate_prediction_input", None)
    if check is None or getattr(check, "dolly_strict", False):
        return

    def strict_check(data, params, input_schema, params_schema, flavor=None):
        if flavor == __name__ and isinstance(params, dict) and params_schema is not None:
            known = {p.name for p in params_schema.params}
            if unknown := sorted(str(k) for k in params if str(k) not in known):
                raise bad_input(f"unknown params {unknown}: this model takes {sorted(known)}")
        return check(data, params, input_schema, params_schema, flavor)

    strict_check.dolly_strict = True
    pyfunc._validate_prediction_input = strict_check


def _is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and x != x)  # NaN: a null cell from pandas/Spark


class DollyPyfunc:
    """MLflow's transformers pyfunc for Dolly's model, with the checks and shortening above."""

    def __init__(self, inner, limits: dict[str, int] | None = None):
        from dolly.generation import context_length

        self._inner = inner
        self._tokenizer = inner.pipeline.tokenizer
        self.context = context_length(inner.pipeline.model, self._tokenizer)
        template = inner.prompt_template or "{prompt}"
        head, _, tail = template.partition("{prompt}")
        self._template = template
        self._frame = len(self._ids(head)) + len(self._ids(tail))
        limits = limits or {}
        self.max_rows = int(limits.get("serve_max_rows") or 0)
        self.max_chars = int(limits.get("serve_max_chars") or 0)

    @property
    def pipeline(self):
        """The transformers pipeline, as MLflow's own wrapper exposes it."""
        return self._inner.pipeline

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit(self, instruction: str, budget: int) -> tuple[str, bool]:
        """(instruction, shortened?): the end of `instruction` such that the whole prompt is at
        most `budget` tokens; the template around it is always kept whole."""
        # 2 tokens of slack: where the template meets the instruction BPE may merge differently
        keep = budget - self._frame - 2
        if keep < 1:
            raise bad_input(f"no room for an instruction: the prompt template alone takes "
                            f"{self._frame} of the {budget} tokens left after the answer")
        text = instruction
        if len(text) > keep * _CHARS_PER_TOKEN_BOUND:
            text = text[-keep * _CHARS_PER_TOKEN_BOUND:]
        ids = self._ids(text)
        if len(ids) <= keep and text is instruction:
            return instruction, False
        # Decoding a cut can merge differently when re-encoded: re-check and trim until it fits.
        for _ in range(8):
            if len(ids) <= keep:
                break
            ids = ids[-keep:]
            text = self._tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            ids = self._ids(text)
            keep -= 1 if len(ids) > keep else 0
        return text, True

    def _check(self, rows: list, params: dict) -> int:
        if not rows:
            raise bad_input("no instructions: send at least one")
        serving = os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"
        if serving and self.max_rows and len(rows) > self.max_rows:
            raise bad_input(f"request too large: {len(rows)} instructions, the server takes at "
                            f"most {self.max_rows} per request; split it")
        chars = 0
        for i, row in enumerate(rows):
            if not (_is_missing(row) or isinstance(row, str)):
                raise bad_input(f"instruction {i} is a {type(row).__name__}, expected a string")
            chars += len(row) if isinstance(row, str) else 0
        if serving and self.max_chars and chars > self.max_chars:
            raise bad_input(f"request too large: {chars} characters of instructions, the server "
                            f"takes at most {self.max_chars} per request")
        max_new = params.get("max_new_tokens", prompts.GENERATION_DEFAULTS["max_new_tokens"])
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise bad_input(f"max_new_tokens must be a positive integer, got {max_new!r}")
        if max_new + self._frame + 1 > self.context:
            raise bad_input(f"max_new_tokens {max_new} leaves no room for a prompt in the "
                            f"model's context of {self.context} tokens")
        return max_new

    def predict(self, data, params: dict[str, Any] | None = None) -> list[str]:
        """One response per instruction, in order; "" for empty, blank or null instructions."""
        from dolly.generation import answer_room

        params = dict(params or {})
        rows = instructions_of(data)
        max_new = self._check(rows, params)
        answers = [""] * len(rows)
        todo = [i for i, r in enumerate(rows) if isinstance(r, str) and r.strip()]
        if not todo:
            return answers
        budget = self.context - answer_room(max_new, self.context)
        fitted = [self.fit(rows[i], budget)[0] for i in todo]
        longest = max(len(self._ids(self._template.format(prompt=t))) for t in fitted)
        # A prompt shortened to leave a quarter of the context gets the rest, not more.
        params["max_new_tokens"] = min(max_new, self.context - longest)
        out = self._inner.predict(fitted, params)
        if isinstance(out, str):
            out = [out]
        for i, answer in zip(todo, out):
            answers[i] = answer
        return answers
