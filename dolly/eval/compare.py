"""Comparing a champion with a candidate on the candidate's records: rebuilding the evaluation set
an evaluate run used, and evaluating a registered model on it.

The promotion gate (dolly.registry.gate) compares scores only when they were measured on the same
evaluation set (dolly.digests.eval_set_digest); when the champion was evaluated on another one,
the register step re-scores it here on the candidate's set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from dolly.config import Config
from dolly.data import load_prepared
from dolly.digests import EVAL_SET_TAG, eval_set_digest
from dolly.errors import DollyError
from dolly.eval.evaluate import (device, dtype_for, evaluate_model, load_saved_model,
                                 prepared_format, select)
from dolly.prompts import get_format
from dolly.tokenizer import load_tokenizer
from dolly.tracking import local_path


def evaluation_set(eval_run, cfg: Config) -> tuple[pd.DataFrame, Path]:
    """(the records an evaluate run evaluated, the local prepared/ folder they come from),
    rebuilt from its `prepared` tag and `eval_limit` param and checked against its `eval_set`
    digest. Raises DollyError when they cannot be."""
    tags, params = eval_run.data.tags, eval_run.data.params
    if not tags.get("prepared") or not tags.get(EVAL_SET_TAG):
        raise DollyError("it records no prepared data or evaluation set")
    prepared = local_path(tags["prepared"], "prepared data")
    _, test, summary = load_prepared(prepared)
    test = select(test, int(float(params.get("eval_limit", cfg.eval_limit))))
    if eval_set_digest(summary.get("data_hash", ""), test) != tags[EVAL_SET_TAG]:
        raise DollyError("its prepared data no longer gives the records it evaluated")
    return test, prepared


def evaluate_on(model_uri: str, test: pd.DataFrame, cfg: Config, prepared: Path) -> dict | None:
    """Every evaluation metric (dolly.eval.evaluate.METRICS) of the model at `model_uri` on the
    prepared records `test` (from the local folder `prepared`), with the config's generation
    settings; None when the model's tokenizer is not the one `test` was prepared with (its
    token ids would mean other text)."""
    dev = device()
    model, tok, _ = load_saved_model(model_uri, cfg, dev, dtype_for(dev))
    try:
        prepared_tok = load_tokenizer(str(Path(prepared) / "tokenizer"))
        if tok.get_vocab() != prepared_tok.get_vocab():
            return None
        return evaluate_model(model, tok, test, max_new_tokens=cfg.eval_max_new_tokens,
                              batch_size=cfg.eval_batch_size,
                              fmt=get_format(prepared_format(prepared), tok)).metrics
    finally:
        del model


def _say(line: str) -> None:
    print(line, flush=True)


def rescore_champion(eval_run, cfg: Config,
                     log: Callable[[str], None] = _say) -> Callable[[str], float | None]:
    """A function version -> the champion's cfg.primary_metric on the evaluation set of
    `eval_run` (None when that set cannot be rebuilt or the tokenizers differ): what
    dolly.registry.register calls when the champion was evaluated on another set."""
    def score(version: str) -> float | None:
        try:
            test, prepared = evaluation_set(eval_run, cfg)
        except DollyError as e:
            log(f"register: cannot rebuild the evaluation set of run {eval_run.info.run_id}: {e}")
            return None
        log(f"register: champion v{version} was evaluated on another set: evaluating it on "
            f"this one ({len(test)} records)")
        metrics = evaluate_on(f"models:/{cfg.model_name}/{version}", test, cfg, prepared)
        return None if metrics is None else metrics.get(cfg.primary_metric)

    return score
