"""Comparing like with like: which records a model was evaluated on, which weights it has, and
evaluating a saved or registered model on a given evaluation set.

The promotion gate (dolly.registry.register) only compares scores measured on the same
evaluation set (`eval_set_digest`), and never registers weights that are already a version
(`weights_digest`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from dolly.errors import DollyError

WEIGHTS_TAG = "weights_sha256"
EVAL_SET_TAG = "eval_set"


def eval_set_digest(data_hash: str, test: pd.DataFrame) -> str:
    """16 hex digits naming an evaluation set: the prepared data's hash plus the exact records
    evaluated (their training texts, in order). Equal digests = scores on the same records."""
    h = hashlib.sha256(data_hash.encode())
    h.update(pd.util.hash_pandas_object(test["text"].reset_index(drop=True), index=False)
             .values.tobytes())
    return h.hexdigest()[:16]


def weights_digest(folder: str | Path) -> str:
    """sha256 over a saved model's weight files (*.safetensors, names and bytes, sorted).

    Raises DollyError when the folder holds no safetensors file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise DollyError(f"{folder}: no *.safetensors weights to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def logged_model_id(model_uri: str) -> str | None:
    """'m-<id>' of a `models:/m-<id>` URI (an MLflow 3 LoggedModel), else None."""
    rest = model_uri.removeprefix("models:/")
    return rest if model_uri.startswith("models:/m-") and "/" not in rest else None


def load_saved_model(model_uri: str, cfg, dev, dtype, local: Path | None = None):
    """(model on `dev`, tokenizer, local folder) of a logged or registered transformers model
    (models:/..., runs:/... or a saved folder; `local`: its already downloaded folder).
    Raises DollyError when it cannot be loaded."""
    from transformers import AutoModelForCausalLM

    from dolly import evaluation, tracking
    from dolly.tokenizer import load_tokenizer

    local = local or tracking.local_path(model_uri, "model")
    weights, tok_dir = evaluation.model_folder(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(weights), dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code).to(dev)
    except OSError as e:
        raise DollyError(f"cannot load the model of '{model_uri}': {str(e).splitlines()[0]}") \
            from None
    return model, load_tokenizer(str(tok_dir)), local


def evaluation_set(eval_run, cfg) -> tuple[pd.DataFrame, Path]:
    """(the records an evaluate run evaluated, the local prepared/ folder they come from),
    rebuilt from its `prepared` tag and `eval_limit` param and checked against its `eval_set`
    digest. Raises DollyError when they cannot be."""
    from dolly import data, evaluation, tracking

    tags, params = eval_run.data.tags, eval_run.data.params
    if not tags.get("prepared") or not tags.get(EVAL_SET_TAG):
        raise DollyError("it records no prepared data or evaluation set")
    prepared = tracking.local_path(tags["prepared"], "prepared data")
    _, test, summary = data.load_prepared(prepared)
    test = evaluation.select(test, int(float(params.get("eval_limit", cfg.eval_limit))))
    if eval_set_digest(summary.get("data_hash", ""), test) != tags[EVAL_SET_TAG]:
        raise DollyError("its prepared data no longer gives the records it evaluated")
    return test, prepared


def evaluate_on(model_uri: str, test: pd.DataFrame, cfg, prepared: Path) -> dict | None:
    """Every evaluation metric (dolly.evaluation.METRICS) of the model at `model_uri` on the
    prepared records `test` (from the local folder `prepared`), with the config's generation
    settings; None when the model's tokenizer is not the one `test` was prepared with (its
    token ids would mean other text)."""
    from dolly import evaluation
    from dolly.tokenizer import load_tokenizer

    dev = evaluation.device()
    model, tok, _ = load_saved_model(model_uri, cfg, dev, evaluation.dtype_for(dev))
    try:
        prepared_tok = load_tokenizer(str(Path(prepared) / "tokenizer"))
        if tok.get_vocab() != prepared_tok.get_vocab():
            return None
        return evaluation.evaluate_model(model, tok, test, max_new_tokens=cfg.eval_max_new_tokens,
                                         batch_size=cfg.eval_batch_size).metrics
    finally:
        del model
