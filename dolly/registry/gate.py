"""Registering a model version and the promotion gate: the alias (`@champion`) moves only to a
version that beats its base and is not worse than the current champion on the same evaluation
set, safely against a concurrent register of the same model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from dolly.config import Config
from dolly.digests import EVAL_SET_TAG, WEIGHTS_TAG
from dolly.registry.card import (data_licence, merge_licences, model_card,
                                 registered_model_description)
from dolly.tracking import logged_model_id

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


def logged_prompt_format(model_uri: str, default: str) -> str:
    """The prompt format the logged model at `model_uri` records (MLmodel metadata), else
    `default`."""
    import mlflow

    try:
        return (mlflow.models.get_model_info(model_uri).metadata or {}).get("prompt_format") \
            or default
    except Exception:  # an old or unreadable model: the config's value
        return default


def logged_weights(model_uri: str) -> dict:
    """What the logged model's weights are (MLmodel metadata: `finetune`, and for an adapter
    its base, rank and targets); {} for an old or unreadable model."""
    import mlflow

    keys = ("finetune", "adapter_base", "adapter_base_path", "adapter_base_revision", "lora_r",
            "lora_alpha", "lora_target_modules")
    try:
        meta = mlflow.models.get_model_info(model_uri).metadata or {}
    except Exception:
        return {}
    return {k: meta[k] for k in keys if k in meta}


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
                      primary_metric=primary, pretrain_steps=cfg.pretrain_steps,
                      prompt_format=logged_prompt_format(model_uri, cfg.prompt_format),
                      weights=logged_weights(model_uri))
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
