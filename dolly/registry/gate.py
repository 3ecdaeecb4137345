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
from typing import Callable

from dolly import prompts
from dolly.compare import EVAL_SET_TAG, WEIGHTS_TAG, logged_model_id, weights_digest
from dolly.config import TINY_BASE_MODEL, Config
from dolly.report import by_family, md_cell, what_it_shows

# What the model needs at serving time, pinned to what trained it (a logged torch model's
# inferred requirements would drag in torchvision; see the notes).
_SERVING_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate",
                     "pandas", "numpy")


def pip_requirements() -> list[str]:
    """`name==version` of the packages serving needs, pinned to the ones installed here."""
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
    import mlflow
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
        license_text=license_note(cfg.base_model, cfg.dataset),
        serving_limits={"serve_max_rows": cfg.serve_max_rows,
                        "serve_max_chars": cfg.serve_max_chars,
                        "serve_batch_wait_ms": cfg.serve_batch_wait_ms},
        metadata={"base_model": cfg.base_model, "dataset": cfg.dataset,
                  "prompt_format": "dolly-v1", "end_key": prompts.END_KEY},
    )
    # The weights' fingerprint: register refuses to make a second version of the same weights.
    mlflow.set_logged_model_tags(info.model_id, {WEIGHTS_TAG: weights_digest(model_dir)})
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


def base_licence(base_model: str) -> str:
    """The base model's licence, where the project knows it."""
    b = base_model.strip().lower()
    if b == "tiny-gptj":
        return "none: a model initialised and pretrained by this project (no third-party weights)"
    if "gpt-j" in b or "gptj" in b:
        return "Apache-2.0 (EleutherAI's GPT-J 6B)"
    return "unknown: check the base model's own licence"


def license_note(base_model: str, dataset: str) -> str:
    """LICENSE.txt of a logged model: the licences of its base weights and of its training data
    (the tuned weights carry both; Dolly v1, tuned on Alpaca, was CC BY-NC 4.0)."""
    return "\n".join([
        "Licence information for this fine-tuned model",
        "",
        f"Base model: {base_model}",
        f"  licence: {base_licence(base_model)}",
        f"Training data: {dataset}",
        f"  licence: {data_licence(dataset)}",
        "",
        "Use of the tuned weights must respect both. Where either says 'unknown', check it with",
        "whoever provided the base model or the data before using or sharing this model.",
        "",
    ])


_CARD_METRICS = ("exact_match", "rouge_l", "perplexity", "eval_loss", "stop_rate", "empty_rate")


def model_card(*, name: str, version: str, base_model: str, dataset: str, data_hash: str,
               licence: str, metrics: dict[str, float], train_run: str, eval_run: str,
               primary_metric: str, pretrain_steps: int = 0) -> str:
    """A short Markdown model card for the version description. `pretrain_steps`: how long the
    tiny-gptj base was pretrained on the built-in corpus (0: a randomly initialised base)."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}"

    rows = []
    for m in _CARD_METRICS:
        b, t = metrics.get(f"base/{m}"), metrics.get(f"tuned/{m}")
        if b is None and t is None:
            continue
        rows.append(f"| {m}{' (gate)' if m == primary_metric else ''} | {fmt(b)} | {fmt(t)} |")
    n = metrics.get("eval_records")
    base, tuned = by_family(metrics, "base"), by_family(metrics, "tuned")
    family_rows = [f"| {md_cell(family)} | {fmt(base.get(family))} | {fmt(tuned.get(family))} |"
                   for family in sorted(base.keys() | tuned.keys())]
    return "\n".join([
        f"# Model card: {name}, version {version} (fine-tuned from {base_model})",
        "",
        f"Instruction-following model fine-tuned from **{base_model}** with this project's "
        "pipeline, in the prompt format of Databricks' Dolly v1 (Alpaca-style instruction "
        "template, stops at `### End`). It is not Databricks' Dolly model. The pyfunc takes "
        "records with an `instruction` and an optional `input` (or `context`) by column name (a "
        "string or a list of strings are instructions) and returns only the responses; "
        "generation params default to Dolly's (do_sample, top_p 0.92, top_k 0, "
        "max_new_tokens 256).",
        "",
        *([what_it_shows(base_model), ""] if base_model != TINY_BASE_MODEL or pretrain_steps > 0
          else ["**The base is a randomly initialised tiny GPT-J** (`pretrain_steps=0`): the "
                "base column shows an untrained model, so the comparison only shows that "
                "training happened, not that instruction tuning improved a pretrained model.",
                ""]),
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
        *(["", "Exact match by task family:", "", "| family | base | tuned |", "|---|---|---|",
            *family_rows] if family_rows else []),
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
    duplicate: bool = False       # the weights were already `version`: nothing was registered


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
            settle_s: float = 0.5, attempts: int = 6,
            rescored: dict[str, float] | None = None) -> tuple[bool, str | None]:
    """Point `alias` at `version`, safely against a concurrent register of the same model.

    The registry has no compare-and-set, so: read the alias, give way to a better holder, else
    set it, wait a moment and read it back twice. Both sides of a race use the same total order,
    (score, version number), so they agree on one champion: the loser stops, the winner sets the
    alias again if a worse version overwrote it. `rescored`: versions whose score was measured
    again on this candidate's evaluation set (used instead of their tags). Returns (holds the
    alias, the alias's version).
    """
    from mlflow.exceptions import MlflowException

    mine = _key(version, score)
    rescored = rescored or {}
    current = None
    for _ in range(attempts):
        current = champion(client, name, alias, primary)
        if current is not None and current[0] in rescored:
            current = (current[0], rescored[current[0]])
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


def same_weights(client, name: str, model_uri: str) -> tuple[str | None, str | None]:
    """(weights digest of the logged model at `model_uri` or None, the lowest version of `name`
    that already holds those weights or None)."""
    from mlflow.exceptions import MlflowException

    model_id = logged_model_id(model_uri)
    if not model_id:
        return None, None
    try:
        digest = client.get_logged_model(model_id).tags.get(WEIGHTS_TAG)
    except MlflowException:
        return None, None
    if not digest:
        return None, None
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'")
    except MlflowException:
        return digest, None
    versions = sorted(int(v.version) for v in found)
    return digest, (str(versions[0]) if versions else None)


def _champion_eval_set(client, name: str, version: str) -> str:
    return (client.get_model_version(name, version).tags or {}).get(EVAL_SET_TAG, "")


def register(model_uri: str, cfg: Config, *, eval_metrics: dict[str, float], eval_run: str,
             data_hash: str, train_run: str | None, base_model: str, dataset: str,
             eval_set: str = "",
             score_champion: Callable[[str], float | None] | None = None) -> GateResult:
    """Register `model_uri` (no copy) as a new version of cfg.model_name and apply the gate.

    Weights that are already a version (same `weights_sha256`) are not registered again: the
    result names that version and the alias is left alone. The candidate is compared with the
    champion only on one evaluation set: when the champion's `eval_set` differs from
    `eval_set`, `score_champion(version)` re-scores it on the candidate's set (None: it could
    not, and the alias does not move). The version carries at most 8 tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name, primary = cfg.model_name, cfg.primary_metric
    digest, existing = same_weights(client, name, model_uri)
    if existing:
        current = champion(client, name, cfg.champion_alias, primary)
        return GateResult(name, existing, False,
                          f"identical weights are already v{existing}: not registered again, "
                          f"@{cfg.champion_alias} left alone", current[0] if current else None,
                          duplicate=True)
    licence = data_licence(dataset)
    tuned, base = eval_metrics.get(f"tuned/{primary}"), eval_metrics.get(f"base/{primary}")
    tags = {"data_hash": data_hash, "train_run_id": train_run or "", "eval_run_id": eval_run,
            EVAL_SET_TAG: eval_set}
    if digest:
        tags[WEIGHTS_TAG] = digest
    if tuned is not None:
        tags[f"tuned/{primary}"] = f"{tuned:.6g}"
    mv = mlflow.register_model(model_uri, name, tags=tags)
    version = str(mv.version)
    train_run = train_run or mv.run_id or ""
    card = model_card(name=name, version=version, base_model=base_model,
                      dataset=dataset, data_hash=data_hash, licence=licence,
                      metrics=eval_metrics, train_run=train_run, eval_run=eval_run,
                      primary_metric=primary, pretrain_steps=cfg.pretrain_steps)
    client.update_model_version(name, version, description=card)
    try:
        existing_licence = client.get_registered_model(name).tags.get("license")
    except MlflowException:
        existing_licence = None
    client.set_registered_model_tag(name, "license", merge_licences(existing_licence, licence))
    client.update_registered_model(name, description=registered_model_description(name, cfg))

    current = champion(client, name, cfg.champion_alias, primary)
    note, remeasured = "", {}
    if current is not None and current[0] != version and tuned is not None:
        theirs = _champion_eval_set(client, name, current[0])
        if not eval_set or theirs != eval_set:
            score = score_champion(current[0]) if score_champion else None
            if score is None:
                reason = (f"champion v{current[0]} was evaluated on another set "
                          f"({theirs or 'unknown'}, this one {eval_set or 'unknown'}) and could "
                          f"not be re-evaluated on this one: not compared, alias not moved")
                return _finish(client, GateResult(name, version, False, reason, current[0]))
            note = (f" (champion v{current[0]} re-evaluated on this set: {primary} "
                    f"{score:.4g}, was {current[1] if current[1] is None else f'{current[1]:.4g}'}"
                    f" on set {theirs or 'unknown'})")
            remeasured[current[0]] = score
            current = (current[0], score)
    ok, reason = gate_decision(primary, tuned, base, current)
    reason += note
    holder = current[0] if current else None
    if ok:
        promoted, holder = promote(client, name, cfg.champion_alias, version, float(tuned),
                                   primary, rescored=remeasured)
        if not promoted:
            ok, reason = False, (f"a concurrent register made v{holder} {cfg.champion_alias} "
                                 f"(not worse on {primary}); " + reason)
    return _finish(client, GateResult(name, version, ok, reason, holder))


def _finish(client, result: GateResult) -> GateResult:
    client.set_model_version_tag(result.name, result.version, "promoted",
                                 str(result.promoted).lower())
    client.set_model_version_tag(result.name, result.version, "gate_reason", result.reason[:5000])
    return result


def registered_model_description(name: str, cfg: Config) -> str:
    """What the registered model is and how to call it (the registry's model page)."""
    return "\n".join([
        f"# {name}: an instruction-following model fine-tuned with the dolly pipeline",
        "",
        "Each version is a causal language model fine-tuned on instruction records in the prompt "
        "format of Databricks' Dolly v1 (this project reproduces that recipe; it is not "
        "Databricks' model). Its version description is a model card with the evaluation of "
        f"that version against its base model; `@{cfg.champion_alias}` is the version that "
        "passed the promotion gate.",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f"model = mlflow.pyfunc.load_model('models:/{name}@{cfg.champion_alias}')",
        "model.predict(pd.DataFrame({'instruction': ['Name a primary color.']}))",
        "```",
        "",
        f"Served: `mlflow models serve -m models:/{name}@{cfg.champion_alias} --env-manager local "
        "-h 127.0.0.1 -p 5001`, then POST `{\"inputs\": [\"...\"]}` to /invocations.",
    ])
