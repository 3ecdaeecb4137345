"""main entry point (the default of `mlflow run .`): data_prep -> train -> evaluate -> register.

Each step runs as a child run of this run through `mlflow.projects.run` (so it carries the
standard mlflow.project.entryPoint tag), with this run's profile and config overrides, and only
run/model URIs passed between steps:
    data_prep                      -> prepared = runs:/<data_prep run>/prepared
    train(prepared)                -> model_uri = the train run's `model_uri` tag (models:/m-...)
    evaluate(model_uri, prepared)  -> eval_run = the evaluate run's id
    register(model_uri, eval_run)  -> the registered version, promoted or not

Reuse (MLflow's multistep `_already_ran` idea): each finished child is tagged with a step key, a
hash of its entry point, its parameters, the resolved config it depends on, the code version (git
commit plus a hash of uncommitted changes to CODE_PATHS) and, for data_prep, a fingerprint of the
dataset files. A rerun finds a FINISHED run with the same key in this experiment and reuses it instead of
recomputing; since each step's parameters hold its upstream run's URI, a recomputed step makes
every step after it recompute too. -P reuse=false recomputes everything.

The run ends with a summary (key metrics, registered version, promoted or not) as metrics/tags,
printed too. A failing step fails this run with one line naming the step and its run.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
from mlflow.exceptions import ExecutionException, MlflowException

from dolly import cli, data, tracking
from dolly.config import DEFAULT_PROFILE, Config, load_config
from dolly.errors import DollyError

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("data_prep", "train", "evaluate", "register")
KEY_TAG = "dolly.step_key"
CODE_TAG = "dolly.code_version"
SUMMARY_METRICS = ("exact_match", "rouge_l", "perplexity", "eval_loss", "stop_rate", "empty_rate")


def _profile(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1] or DEFAULT_PROFILE
        if arg.startswith("--config="):
            return arg.split("=", 1)[1] or DEFAULT_PROFILE
    return DEFAULT_PROFILE


def overrides(cfg: Config, profile: str) -> dict[str, str]:
    """The config values this run got beyond its profile, as `-P` strings for the children."""
    base = load_config(profile).to_dict()
    return {k: str(v) for k, v in cfg.to_dict().items() if v != base[k]}


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True,
                          timeout=60).stdout


# What the steps run: a change elsewhere (README, tests, benchmarks) does not invalidate reuse.
CODE_PATHS = ("dolly", "steps", "configs", "MLproject", "conda.yaml", "requirements.txt")


def code_version() -> str:
    """git commit, plus a hash of uncommitted changes to CODE_PATHS (diffs and new files)."""
    try:
        commit = _git("rev-parse", "HEAD").decode().strip()
        h = hashlib.sha256(_git("diff", "HEAD", "--binary", "--", *CODE_PATHS))
        for name in sorted(filter(None, _git("ls-files", "--others", "--exclude-standard", "-z",
                                             "--", *CODE_PATHS).split(b"\0"))):
            h.update(name)
            path = ROOT / name.decode(errors="replace")
            if path.is_file():
                h.update(path.read_bytes())
        dirty = h.hexdigest() != hashlib.sha256(b"").hexdigest()
        return f"{commit}+{h.hexdigest()[:16]}" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def input_fingerprint(cfg: Config) -> str:
    """What the dataset is: 'builtin', a hash of local files' contents, or the Hub id + split
    (a Hub dataset is taken as immutable; -P reuse=false after it changes)."""
    ds = cfg.dataset.strip()
    if ds == "builtin":
        return "builtin"
    path = Path(ds[3:] if ds.startswith("hf:") else ds)
    if path.exists():
        h = hashlib.sha256()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "files:" + h.hexdigest()
    return f"hub:{ds}[{cfg.dataset_split}]"


# Config fields a step does not read, so changing one does not redo that step: a new eval_limit
# re-evaluates without retraining, a new model_name only registers again. (data_prep reads only
# dolly.data.DATA_FIELDS.) eval_batch_size stays with train: the logged model batches by it.
_EVAL_ONLY = ("eval_max_new_tokens", "eval_limit")
_NAMING = ("model_name", "champion_alias")  # register only
_SCORING_ONLY = ("spark_master",)
_NOT_READ_BY = {"train": _EVAL_ONLY + ("primary_metric",) + _NAMING + _SCORING_ONLY,
                "evaluate": _NAMING + _SCORING_ONLY,  # primary_metric: _usable checks it
                "register": _SCORING_ONLY}


def step_key(name: str, params: dict[str, str], cfg: Config, code: str, fingerprint: str) -> str:
    """What a step's result depends on: its inputs (URIs of earlier steps), the code, the data
    and the config fields it reads. Overrides count through the resolved config, not as text."""
    if name == "data_prep":
        fields = data.DATA_FIELDS
    else:
        fields = tuple(k for k in cfg.to_dict() if k not in _NOT_READ_BY.get(name, ()))
    inputs = {k: v for k, v in params.items() if k != "config" and k not in cfg.to_dict()}
    blob = {"entry_point": name, "inputs": inputs, "code": code,
            "config": {k: str(getattr(cfg, k)) for k in fields},
            "input": fingerprint if name == "data_prep" else ""}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _usable(client, name: str, run, cfg: Config) -> bool:
    """A finished run whose outputs are still there."""
    tags, metrics = run.data.tags, run.data.metrics
    if name == "data_prep":
        return bool(tags.get("data_hash"))
    if name == "train":
        return bool(tags.get("model_uri"))
    if name == "evaluate":
        return f"tuned/{cfg.primary_metric}" in metrics
    if name == "register":
        try:
            client.get_model_version(tags["registered_model"], tags["registered_version"])
            return True
        except (KeyError, MlflowException):
            return False
    return True


def already_ran(client, experiment_id: str, name: str, key: str, cfg: Config):
    """The newest FINISHED run of this step with the same step key, or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.project.entryPoint` = '{name}' and tags.`{KEY_TAG}` = '{key}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    return next((r for r in runs if _usable(client, name, r, cfg)), None)


def _failed_run(client, experiment_id: str, parent: str, name: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}' and tags.`mlflow.project.entryPoint` = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else "?"


def run_step(client, parent, name: str, params: dict[str, str], key: str, code: str,
             reuse: bool, cfg: Config):
    """(the step's run, reused?): an earlier identical run, or a new child run."""
    exp = parent.info.experiment_id
    if reuse:
        found = already_ran(client, exp, name, key, cfg)
        if found is not None:
            print(f"main: {name}: reusing finished run {found.info.run_id} "
                  "(same parameters, code and data)", flush=True)
            return found, True
    print(f"main: {name}: starting ({', '.join(f'{k}={v}' for k, v in params.items())})", flush=True)
    try:
        submitted = mlflow.projects.run(uri=str(ROOT), entry_point=name, parameters=params,
                                        env_manager="local", experiment_id=exp,
                                        synchronous=True, run_name=name)
    except ExecutionException:
        rid = _failed_run(client, exp, parent.info.run_id, name)
        mlflow.set_tags({"failed_step": name, "failed_run": rid})
        raise DollyError(f"step '{name}' failed (run {rid}); its error is printed above") from None
    client.set_tag(submitted.run_id, KEY_TAG, key)
    client.set_tag(submitted.run_id, CODE_TAG, code)
    return client.get_run(submitted.run_id), False


def main(argv: list[str]) -> None:
    cfg, inp = cli.parse(argv, {"reuse": "true"})
    reuse = inp["reuse"].strip().lower() not in ("false", "0", "no", "off")
    profile = _profile(argv)
    common = {"config": profile, **overrides(cfg, profile)}
    code = code_version()
    fingerprint = input_fingerprint(cfg)
    client = mlflow.MlflowClient()
    with mlflow.start_run() as parent:
        tracking.log_config(cfg)
        mlflow.set_tags({CODE_TAG: code, "dolly.input_fingerprint": fingerprint})
        if code == "unknown":
            print("main: no git checkout: steps are not reused", flush=True)
            reuse = False
        runs, reused = {}, {}

        def step(name: str, **inputs: str):
            params = {**common, **inputs}
            key = step_key(name, params, cfg, code, fingerprint)
            run, was = run_step(client, parent, name, params, key, code, reuse, cfg)
            runs[name], reused[name] = run, was
            mlflow.set_tags({f"step.{name}.run_id": run.info.run_id,
                             f"step.{name}.reused": str(was).lower()})
            return run

        prep = step("data_prep")
        prepared = f"runs:/{prep.info.run_id}/prepared"
        train = step("train", prepared=prepared)
        model_uri = train.data.tags.get("model_uri")
        if not model_uri:
            raise DollyError(f"train run {train.info.run_id} logged no model (no model_uri tag)")
        ev = step("evaluate", model_uri=model_uri, prepared=prepared)
        reg = step("register", model_uri=model_uri, eval_run=ev.info.run_id)
        summarize(cfg, runs, reused, prep, ev, reg, model_uri)


def summarize(cfg: Config, runs, reused, prep, ev, reg, model_uri: str) -> None:
    m, t = ev.data.metrics, reg.data.tags
    summary = {}
    for who in ("base", "tuned"):
        for k in SUMMARY_METRICS:
            if f"{who}/{k}" in m:
                summary[f"{who}/{k}"] = m[f"{who}/{k}"]
    promoted = t.get("promoted") == "true"
    version = t.get("registered_version", "")
    if version:
        summary["registered_version"] = float(version)
    summary["promoted"] = float(promoted)
    summary["steps_reused"] = float(sum(reused.values()))
    mlflow.log_metrics(summary)
    mlflow.set_tags({"model_uri": model_uri, "data_hash": prep.data.tags.get("data_hash", ""),
                     "registered_model": t.get("registered_model", cfg.model_name),
                     "registered_version": version, "promoted": str(promoted).lower(),
                     "gate_reason": t.get("gate_reason", "")[:5000],
                     "steps_reused": ",".join(n for n in STEPS if reused.get(n)) or "none"})
    lines = ["main: summary"]
    for n in STEPS:
        lines.append(f"  {n:<10} run {runs[n].info.run_id}{'  (reused)' if reused[n] else ''}")
    p = cfg.primary_metric
    lines.append("  " + ", ".join(
        f"{k} {m[f'base/{k}']:.4g} -> {m[f'tuned/{k}']:.4g}" for k in SUMMARY_METRICS[:4]
        if f"base/{k}" in m and f"tuned/{k}" in m) + "  (base -> tuned)")
    verdict = (f"promoted to @{cfg.champion_alias}" if promoted
               else f"not promoted ({t.get('gate_reason', '?')})")
    lines.append(f"  registered {t.get('registered_model', cfg.model_name)} v{version}: {verdict}"
                 f"; gate on {p}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    cli.run(main)
