"""How the tuned model is packaged for MLflow (transformers flavor) and moved through the registry.

The logged model answers like Dolly: the pyfunc (dolly.serving) takes records by column name
(`instruction`, optional `input`), wraps each in Dolly's prompt, stops at `### End`, and returns
only the response. Generation defaults come from dolly.prompts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dolly import prompts
from dolly.config import Config

# What the model needs at serving time, pinned to what trained it (a logged torch model's
# inferred requirements would drag in torchvision; see the notes).
_SERVING_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate",
                     "pandas", "numpy")


def pip_requirements() -> list[str]:
    reqs = []
    for name in _SERVING_PACKAGES:
        try:
            version = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def signature():
    """Input: named columns `instruction` (string, required) and `input` (string, optional;
    dolly.serving also takes `context` for it); output: one response string per record; params:
    Dolly's generation defaults (dolly.prompts.GENERATION_DEFAULTS)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    from dolly import serving

    params = infer_signature(["x"], params=dict(prompts.GENERATION_DEFAULTS)).params
    inputs = Schema([ColSpec("string", serving.INSTRUCTION),
                     ColSpec("string", serving.INPUT, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]), params=params)


def log_model(model_dir: str | Path, cfg: Config, name: str = "model") -> str:
    """Log the saved model folder (weights + tokenizer) to the active run; returns its model URI.

    A transformers-flavor model whose pyfunc is dolly.serving's wrapper of MLflow's (it shortens
    too-long instructions and checks requests). The folder is logged as is, without loading the
    weights: the low-memory way for a 6B model.
    """
    from mlflow.models import Model

    from dolly import serving

    info = Model.log(
        artifact_path=None,  # MLflow 3: `name` names a logged model
        name=name,
        flavor=serving,
        transformers_model=str(model_dir),
        task="text-generation",
        prompt_template=prompts.PROMPT_TEMPLATE,
        # batch_size: without it the pipeline generates one row at a time (measured: 1.3x
        # Dolly's loop unbatched, 3.7x at 8); MLflow only accepts it at logging time.
        model_config={"return_full_text": False, "batch_size": cfg.eval_batch_size},
        signature=signature(),
        pip_requirements=pip_requirements(),
        # As mlflow.transformers.log_model does for a folder: checking a serving example would
        # load the whole model into memory.
        validate_serving_input=False,
        serving_limits={"serve_max_rows": cfg.serve_max_rows,
                        "serve_max_chars": cfg.serve_max_chars},
        metadata={"base_model": cfg.base_model, "dataset": cfg.dataset,
                  "prompt_format": "dolly-v1", "end_key": prompts.END_KEY},
    )
    return info.model_uri


# --- registry: register, model card, licence, promotion gate ------------------------------------

_LICENCE_UNKNOWN = "unknown: check the licence of the training data"
PROJECT_DATA = "project-generated data (built-in synthetic tasks, no third-party licence)"


def data_licence(dataset: str) -> str:
    """The licence the training data puts on the tuned weights (Dolly v1: CC BY-NC 4.0)."""
    d = dataset.strip().lower()
    if d == "builtin":
        return PROJECT_DATA
    if "alpaca" in d:
        return "CC BY-NC 4.0"  # Stanford Alpaca's data (OpenAI-generated): non-commercial
    if "dolly-15k" in d or "databricks-dolly" in d:
        return "CC BY-SA 3.0"
    return f"{_LICENCE_UNKNOWN} ({dataset})"


def merge_licences(existing: str | None, new: str) -> str:
    """The registered model's licence tag: every licence one of its versions carries."""
    parts = [p.strip() for p in (existing or "").split(";") if p.strip()]
    if new not in parts:
        parts.append(new)
    return "; ".join(sorted(parts))


_CARD_METRICS = ("exact_match", "rouge_l", "perplexity", "eval_loss", "stop_rate", "empty_rate")


def model_card(*, name: str, version: str, base_model: str, dataset: str, data_hash: str,
               licence: str, metrics: dict[str, float], train_run: str, eval_run: str,
               primary_metric: str) -> str:
    """A short Markdown model card for the version description."""
    rows = []
    for m in _CARD_METRICS:
        b, t = metrics.get(f"base/{m}"), metrics.get(f"tuned/{m}")
        if b is None and t is None:
            continue
        fmt = (lambda v: "n/a" if v is None else f"{v:.4g}")
        rows.append(f"| {m}{' (gate)' if m == primary_metric else ''} | {fmt(b)} | {fmt(t)} |")
    n = metrics.get("eval_records")
    return "\n".join([
        f"# {name} v{version}",
        "",
        f"Instruction-following model fine-tuned from **{base_model}** in Dolly v1's prompt format "
        "(Alpaca-style instruction template, stops at `### End`). The pyfunc takes records with "
        "an `instruction` and an optional `input` (or `context`) by column name (a string or a "
        "list of strings are instructions) and returns only the responses; generation params "
        "default to Dolly's (do_sample, top_p 0.92, top_k 0, max_new_tokens 256).",
        "",
        f"- Base model: {base_model}",
        f"- Training data: {dataset} (data hash {data_hash[:12] or 'unknown'})",
        f"- Licence: {licence}",
        f"- Train run: {train_run}; evaluation run: {eval_run}",
        "",
        f"Held-out evaluation ({int(n) if n else '?'} records, greedy decoding):",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        *rows,
        "",
        "Limitations: answers are only as good as the training data; not for factual or "
        "safety-critical use.",
    ])


@dataclass
class GateResult:
    """What register decided: the version, whether it holds the alias, and why."""

    name: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None  # the alias's version after the decision


def gate_decision(primary: str, tuned: float | None, base: float | None,
                  champion: tuple[str, float | None] | None) -> tuple[bool, str]:
    """(promote?, reason): tuned must beat its base and not be worse than the champion."""
    if tuned is None or base is None:
        return False, f"evaluation lacks tuned/{primary} or base/{primary}"
    if not tuned > base:
        return False, f"tuned {primary} {tuned:.4g} does not beat base {base:.4g}"
    if champion is None:
        return True, f"tuned {primary} {tuned:.4g} beats base {base:.4g}; no champion yet"
    version, score = champion
    if score is None:
        return True, (f"tuned {primary} {tuned:.4g} beats base {base:.4g}; champion v{version} "
                      f"has no recorded {primary}")
    if tuned < score:
        return False, f"tuned {primary} {tuned:.4g} is worse than champion v{version} ({score:.4g})"
    return True, (f"tuned {primary} {tuned:.4g} beats base {base:.4g} and is not worse than "
                  f"champion v{version} ({score:.4g})")


def _score(tags: dict[str, str], primary: str) -> float | None:
    try:
        return float(tags[f"tuned/{primary}"])
    except (KeyError, ValueError):
        return None


def champion(client, name: str, alias: str, primary: str) -> tuple[str, float | None] | None:
    """(version, its tuned primary metric) the alias points at, or None when it is unset."""
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        try:
            mv = client.get_model_version_by_alias(name, alias)
            return str(mv.version), _score(mv.tags or {}, primary)
        except MlflowException as e:
            if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST") and \
                    "not found" in str(e):
                return None
            if attempt == 4:  # e.g. a sqlite store busy with a concurrent writer
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


def _key(version: str, score: float | None) -> tuple[float, int]:
    return (float("-inf") if score is None else score, int(version))


def promote(client, name: str, alias: str, version: str, score: float, primary: str,
            settle_s: float = 0.5, attempts: int = 6) -> tuple[bool, str | None]:
    """Point `alias` at `version`, safely against a concurrent register of the same model.

    The registry has no compare-and-set, so: read the alias, give way to a better holder, else
    set it, wait a moment and read it back twice. Both sides of a race use the same total order,
    (score, version number), so they agree on one champion: the loser stops, the winner sets the
    alias again if a worse version overwrote it. Returns (holds the alias, the alias's version).
    """
    from mlflow.exceptions import MlflowException

    mine = _key(version, score)
    current = None
    for _ in range(attempts):
        current = champion(client, name, alias, primary)
        if current is not None and current[0] != version and _key(*current) > mine:
            return False, current[0]
        if current is None or current[0] != version:
            try:
                client.set_registered_model_alias(name, alias, version)
            except MlflowException:
                # A concurrent writer created the alias at the same moment (sqlite: a UNIQUE
                # constraint) or held the database: read again and decide again.
                time.sleep(settle_s)
                continue
        confirmed = True
        for _ in range(2):  # a concurrent writer that read before our write lands within this
            time.sleep(settle_s)
            current = champion(client, name, alias, primary)
            if current is None or current[0] != version:
                confirmed = False
                break
        if confirmed:
            return True, version
    return False, current[0] if current else None


def register(model_uri: str, cfg: Config, *, eval_metrics: dict[str, float], eval_run: str,
             data_hash: str, train_run: str | None, base_model: str, dataset: str) -> GateResult:
    """Register `model_uri` (no copy) as a new version of cfg.model_name and apply the gate."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    primary = cfg.primary_metric
    licence = data_licence(dataset)
    tags = {f"{k}": f"{v:.6g}" for k, v in eval_metrics.items()
            if k.startswith(("base/", "tuned/")) or k == "eval_records"}
    tags.update({"data_hash": data_hash, "train_run_id": train_run or "", "eval_run_id": eval_run,
                 "base_model": base_model, "dataset": dataset, "license": licence,
                 "primary_metric": primary, "model_uri": model_uri})
    mv = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    version = str(mv.version)
    train_run = train_run or mv.run_id or ""
    card = model_card(name=cfg.model_name, version=version, base_model=base_model,
                      dataset=dataset, data_hash=data_hash, licence=licence,
                      metrics=eval_metrics, train_run=train_run, eval_run=eval_run,
                      primary_metric=primary)
    client.update_model_version(cfg.model_name, version, description=card)
    try:
        existing = client.get_registered_model(cfg.model_name).tags.get("license")
    except MlflowException:
        existing = None
    client.set_registered_model_tag(cfg.model_name, "license", merge_licences(existing, licence))

    tuned, base = eval_metrics.get(f"tuned/{primary}"), eval_metrics.get(f"base/{primary}")
    current = champion(client, cfg.model_name, cfg.champion_alias, primary)
    ok, reason = gate_decision(primary, tuned, base, current)
    holder = current[0] if current else None
    if ok:
        promoted, holder = promote(client, cfg.model_name, cfg.champion_alias, version,
                                   float(tuned), primary)
        if not promoted:
            ok, reason = False, (f"a concurrent register made v{holder} {cfg.champion_alias} "
                                 f"(not worse on {primary}); " + reason)
    client.set_model_version_tag(cfg.model_name, version, "promoted", str(ok).lower())
    client.set_model_version_tag(cfg.model_name, version, "gate_reason", reason[:5000])
    return GateResult(cfg.model_name, version, ok, reason, holder)
