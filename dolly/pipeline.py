"""The `main` entry point's machinery: run data_prep -> train -> evaluate -> register as child
runs, reusing a step that already finished with the same inputs.

Each step runs as a child run of the parent through `mlflow.projects.run` (so it carries the
standard `mlflow.project.entryPoint` tag), with the parent's profile and config overrides, and
only run/model URIs passed between steps:
    data_prep                      -> prepared = runs:/<data_prep run>/prepared
    train(prepared)                -> model_uri = the train run's `model_uri` tag (models:/m-...)
    evaluate(model_uri, prepared)  -> eval_run = the evaluate run's id
    register(model_uri, eval_run)  -> the registered version, promoted or not

Reuse follows the `_already_ran` idea of MLflow's multistep example: each finished child is
tagged with a step key, a hash of its entry point, its inputs, the config fields it depends on
(declared on the field: `Config` metadata `steps`), the code version and, for data_prep, a
fingerprint of the dataset. A rerun finds a FINISHED run with the same key in the experiment and
reuses it; since each step's inputs hold its upstream run's URI, a recomputed step makes every
step after it recompute too.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolly.config import Config, fields_where
from dolly.errors import DollyError
from dolly.eval.report import by_family, family_line

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("data_prep", "train", "evaluate", "register")
KEY_TAG = "dolly.step_key"
CODE_TAG = "dolly.code_version"
SUMMARY_METRICS = ("exact_match", "rouge_l", "response_perplexity", "exact_match_unseen",
                   "eval_loss", "stop_rate", "empty_rate")
# What the steps run: a change elsewhere (README, tests, benchmarks) does not invalidate reuse.
CODE_PATHS = ("dolly", "steps", "configs", "MLproject", "conda.yaml", "requirements.txt")


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True,
                          timeout=60).stdout


def code_version() -> str:
    """The git commit, plus `+<hash>` of uncommitted changes to CODE_PATHS (diffs and new files);
    'unknown' outside a git checkout (then nothing is reused)."""
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
    """What the dataset is (dolly.data.readers' one source listing): 'builtin', 'files:<sha256 of the
    data files' names and bytes>', or 'hub:<id>[<split>]' (a Hub dataset is taken as immutable;
    -P reuse=false after it changes). A local path that cannot be listed gets 'unresolved:...':
    data_prep then runs and reports why."""
    from dolly.errors import DollyError
    from dolly.data.readers import resolve_source

    try:
        return resolve_source(cfg.dataset, cfg.dataset_split).fingerprint()
    except DollyError:
        return f"unresolved:{cfg.dataset}"


def target_experiment(client, cfg: Config, launched_in: str) -> str | None:
    """The experiment id `main` should run in when it differs from the one `mlflow run` put its
    run in: `cfg.experiment_name` (created if needed) when the run is in the Default experiment
    and the user chose none (MLFLOW_EXPERIMENT_NAME unset; `mlflow run` sets
    MLFLOW_EXPERIMENT_ID for every project command, so that one says nothing). An empty
    experiment_name keeps the run where it is.

    A new experiment keeps its artifacts beside the Default experiment's (same artifact root),
    not in the working directory."""
    import os

    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return None
    if launched_in != "0" or not cfg.experiment_name.strip():
        return None
    found = client.get_experiment_by_name(cfg.experiment_name)
    if found is not None:
        return None if found.experiment_id == launched_in else found.experiment_id
    root = client.get_experiment("0").artifact_location.rstrip("/").rsplit("/", 1)[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.experiment_name)
    try:
        return client.create_experiment(cfg.experiment_name, artifact_location=f"{root}/{safe}")
    except Exception:  # created meanwhile by a concurrent main
        found = client.get_experiment_by_name(cfg.experiment_name)
        if found is None:
            raise
        return found.experiment_id


def run_name(step: str, cfg: Config) -> str:
    """A run's name: its step and the model it is about ('train gpt-j-6b', 'main tiny-gptj')."""
    return f"{step} {cfg.base_model.rstrip('/').rsplit('/', 1)[-1]}"


@contextmanager
def step_run(cfg: Config, step: str, name: str | None = None, pointer_tag: str = "dolly.step_run",
             **start_run_kwargs):
    """The MLflow run step `step` logs into, active inside the block: named `name` (default
    `run_name(step, cfg)`), in the experiment `main`'s runs go to (`target_experiment`).

    `mlflow run -e <step>` puts its run in the Default experiment before any code of ours runs,
    and MLflow cannot move runs: then the step runs in a new run in cfg.experiment_name, and the
    CLI's run is named the same, tagged `pointer_tag` and described with a link to it (the
    CLI ends it with the step's exit status). A step `main` started, one whose experiment the
    user chose, and a run the user handed over (MLFLOW_RUN_ID of a run that is not a project run
    of this step, `mlflow run --run-id`) keep their run. `start_run_kwargs` go to the run the
    step logs into."""
    import mlflow

    name = name or run_name(step, cfg)
    client = mlflow.MlflowClient()
    launched_id = os.environ.get("MLFLOW_RUN_ID")
    if launched_id:
        launched = client.get_run(launched_id)
        tags = launched.data.tags
        ours = (tags.get("mlflow.project.entryPoint") == step
                and tags.get("mlflow.source.type") == "PROJECT"
                and not tags.get("mlflow.note.content"))  # made by the CLI just now
        target = target_experiment(client, cfg, launched.info.experiment_id) if ours else None
    else:
        from mlflow.tracking.fluent import _get_experiment_id

        target = target_experiment(client, cfg, _get_experiment_id())
    if target is None:
        with mlflow.start_run(run_name=name, **start_run_kwargs) as run:
            yield run
        return
    os.environ.pop("MLFLOW_RUN_ID", None)  # else start_run resumes the CLI's run
    # the launch's source (project URI, git commit) too: the UI's Source and Version columns
    source = ({k: v for k, v in launched.data.tags.items()
               if k.startswith(("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL"))}
              if launched_id else {})
    tags = {**source, **start_run_kwargs.pop("tags", {}), "mlflow.project.entryPoint": step,
            **({"dolly.launched_by": launched_id} if launched_id else {})}
    with mlflow.start_run(experiment_id=target, run_name=name, tags=tags,
                          **start_run_kwargs) as run:
        if launched_id:
            client.set_tag(launched_id, "mlflow.runName", name)
            client.set_tag(launched_id, pointer_tag, run.info.run_id)
            client.set_tag(launched_id, "mlflow.note.content", (
                f"This launch ran {step} as run {run.info.run_id} in experiment "
                f"'{cfg.experiment_name}' ([open it](#/experiments/{target}/runs/"
                f"{run.info.run_id}))."))
        print(f"{step}: run {run.info.run_id} in experiment '{cfg.experiment_name}' (id {target})"
              + (f"; this launch's run {launched_id} points there" if launched_id else ""),
              flush=True)
        yield run


def step_key(name: str, params: dict[str, str], cfg: Config, code: str, fingerprint: str) -> str:
    """sha256 of what a step's result depends on: its inputs (URIs of earlier steps), the code,
    the dataset fingerprint (data_prep only) and the config fields declared as read by it.
    Overrides count through the resolved config, not as text."""
    fields = fields_where(step=name)
    config_fields = set(cfg.to_dict())
    inputs = {k: v for k, v in params.items() if k != "config" and k not in config_fields}
    blob = {"entry_point": name, "inputs": inputs, "code": code,
            "config": {k: str(getattr(cfg, k)) for k in fields},
            "input": fingerprint if name == "data_prep" else ""}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def usable(client, name: str, run, cfg: Config) -> bool:
    """Whether a finished run of step `name` still has what later steps need."""
    from mlflow.exceptions import MlflowException

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
    """The newest FINISHED, still usable run of step `name` with step key `key`, or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.project.entryPoint` = '{name}' and tags.`{KEY_TAG}` = '{key}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20)
    return next((r for r in runs if usable(client, name, r, cfg)), None)


def _failed_run(client, experiment_id: str, parent_id: str, name: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`mlflow.project.entryPoint` = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else "?"


@dataclass
class Pipeline:
    """One `main` run: the parent run, what every step gets, and the steps' runs so far."""

    client: Any
    parent: Any                       # the active parent run (mlflow.entities.Run)
    cfg: Config
    common: dict[str, str]            # {"config": profile, **raw overrides}: every step's params
    code: str
    fingerprint: str
    reuse: bool
    runs: dict[str, Any] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def step(self, name: str, **inputs: str):
        """Run step `name` (or reuse an identical finished run); returns its run.

        Raises DollyError naming the step and its run when the step fails (tagged on the
        parent as failed_step / failed_run)."""
        import mlflow
        from mlflow.exceptions import ExecutionException

        params = {**self.common, **inputs}
        key = step_key(name, params, self.cfg, self.code, self.fingerprint)
        exp = self.parent.info.experiment_id
        run = already_ran(self.client, exp, name, key, self.cfg) if self.reuse else None
        was_reused = run is not None
        if was_reused:
            print(f"main: {name}: reusing finished run {run.info.run_id} "
                  "(same parameters, code and data)", flush=True)
        else:
            print(f"main: {name}: starting ({', '.join(f'{k}={v}' for k, v in params.items())})",
                  flush=True)
            try:
                submitted = mlflow.projects.run(uri=str(ROOT), entry_point=name, parameters=params,
                                                env_manager="local", experiment_id=exp,
                                                synchronous=True, run_name=run_name(name, self.cfg))
            except ExecutionException:
                rid = _failed_run(self.client, exp, self.parent.info.run_id, name)
                mlflow.set_tags({"failed_step": name, "failed_run": rid})
                raise DollyError(f"step '{name}' failed (run {rid}); its error is printed above") \
                    from None
            self.client.set_tag(submitted.run_id, KEY_TAG, key)
            self.client.set_tag(submitted.run_id, CODE_TAG, self.code)
            run = self.client.get_run(submitted.run_id)
        self.runs[name], self.reused[name] = run, was_reused
        mlflow.set_tags({f"step.{name}.run_id": run.info.run_id,
                         f"step.{name}.reused": str(was_reused).lower()})
        return run

    def run_all(self) -> str:
        """data_prep -> train -> evaluate -> register; returns the model URI that was trained."""
        prep = self.step("data_prep")
        prepared = f"runs:/{prep.info.run_id}/prepared"
        train = self.step("train", prepared=prepared)
        model_uri = train.data.tags.get("model_uri")
        if not model_uri:
            raise DollyError(f"train run {train.info.run_id} logged no model (no model_uri tag)")
        ev = self.step("evaluate", model_uri=model_uri, prepared=prepared)
        self.step("register", model_uri=model_uri, eval_run=ev.info.run_id)
        return model_uri


def description(lines: list[str], runs: dict[str, Any], reused: dict[str, bool]) -> str:
    """The parent run's description (Markdown): the summary, and a link to every step's run,
    reused ones included (links relative to the MLflow UI's page). The summary's lines naming
    the step runs are left out of it (the links say the same): the UI shows only the first lines
    of a description until 'Show more', and those are the figures."""
    step_lines = tuple(f"  {n:<10} run " for n in STEPS)
    lines = [line for line in lines if not line.startswith(step_lines)]
    links = [f"- {n}: [{runs[n].info.run_name or runs[n].info.run_id}]"
             f"(#/experiments/{runs[n].info.experiment_id}/runs/{runs[n].info.run_id})"
             f"{' (reused)' if reused[n] else ''}"
             f"{': base and tuned answers side by side, by family' if n == 'evaluate' else ''}"
             for n in STEPS if n in runs]
    return "\n".join(["```", *lines, "```", "", "Step runs:", *links])


def summary(cfg: Config, runs: dict[str, Any], reused: dict[str, bool],
            model_uri: str) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """(metrics, tags, printed lines) of a finished pipeline: base and tuned evaluation metrics
    (exact match per task family too, as a line each), the registered version and whether it
    was promoted, which steps were reused."""
    m, t = runs["evaluate"].data.metrics, runs["register"].data.tags
    metrics = {f"{who}/{k}": m[f"{who}/{k}"] for who in ("base", "tuned")
               for k in SUMMARY_METRICS if f"{who}/{k}" in m}
    metrics.update({f"{who}/{metric}/{family}": v for who in ("base", "tuned")
                    for metric in ("exact_match", "exact_match_unseen")
                    for family, v in by_family(m, who, metric).items()})
    promoted = t.get("promoted") == "true"
    version = t.get("registered_version", "")
    if version:
        metrics["registered_version"] = float(version)
    metrics["promoted"] = float(promoted)
    metrics["steps_reused"] = float(sum(reused.values()))
    tags = {"model_uri": model_uri, "data_hash": runs["data_prep"].data.tags.get("data_hash", ""),
            "registered_model": t.get("registered_model", cfg.model_name),
            "registered_version": version, "promoted": str(promoted).lower(),
            "gate_reason": t.get("gate_reason", "")[:5000],
            "steps_reused": ",".join(n for n in STEPS if reused.get(n)) or "none"}
    lines = ["main: summary"]
    for n in STEPS:
        lines.append(f"  {n:<10} run {runs[n].info.run_id}{'  (reused)' if reused[n] else ''}")
    lines.append("  " + ", ".join(
        f"{k} {m[f'base/{k}']:.4g} -> {m[f'tuned/{k}']:.4g}" for k in SUMMARY_METRICS[:4]
        if f"base/{k}" in m and f"tuned/{k}" in m) + "  (base -> tuned)")
    lines += [f"  {line}" for line in (family_line(m, "tuned"), family_line(m, "base")) if line]
    lines += [f"  {line} (unseen words)" for line in (family_line(m, "tuned", "exact_match_unseen"),
                                                      family_line(m, "base", "exact_match_unseen"))
              if line]
    verdict = (f"promoted to @{cfg.champion_alias}" if promoted
               else f"not promoted ({t.get('gate_reason', '?')})")
    lines.append(f"  registered {t.get('registered_model', cfg.model_name)} v{version}: {verdict}"
                 f"; gate on {cfg.primary_metric}")
    return metrics, tags, lines
