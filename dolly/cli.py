"""Argument handling shared by the entry points: `--config`, step inputs, and config overrides.

MLflow passes declared parameters by name and undeclared `-P key=value` as `--key value`; so
every `--key` that is not one of the step's own inputs must be a config field.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from dolly.config import DEFAULT_PROFILE, FIELDS, Config, load_config, unknown_key  # noqa: F401
from dolly.errors import ConfigError, DollyError


@dataclass(frozen=True)
class Args:
    """An entry point's command line, parsed once.

    cfg: the resolved config; inputs: the step's own inputs ({name: text}); profile: the
    profile path as given; overrides: the raw `--key value` config overrides as given (what
    a parent step hands on to its children)."""

    cfg: Config
    inputs: dict[str, str]
    profile: str
    overrides: dict[str, str]


def parse_args(argv: list[str], inputs: dict[str, str | None]) -> Args:
    """Parse `--key value` / `--key=value` pairs into an Args.

    `inputs` maps the step's own parameter names to their defaults (None = required). Raises
    ConfigError (one line) for a malformed argument, a missing required input, an unknown key
    (with the closest known one) or a bad value."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}' (expected --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"parameter '{key}' has no value")
            value = argv[i + 1]
            i += 1
        pairs[key.replace("-", "_")] = value
        i += 1
    profile = pairs.pop("config", None) or DEFAULT_PROFILE
    # An unknown key first: a typo (`ouput`) is the reason a required input seems missing.
    unknown = [k for k in pairs if k not in FIELDS and k not in inputs]
    if unknown:
        raise unknown_key(unknown[0], [*FIELDS, *inputs])
    step_inputs = {}
    for name, default in inputs.items():
        value = pairs.pop(name, None)
        if value in (None, "") and default is None:
            raise ConfigError(f"parameter '{name}' is required (-P {name}=...)")
        step_inputs[name] = value if value not in (None, "") else default
    return Args(load_config(profile, pairs), step_inputs, profile, pairs)


def parse(argv: list[str], inputs: dict[str, str | None]) -> tuple[Config, dict[str, str]]:
    """(config, step inputs): `parse_args` for the steps that need nothing else."""
    args = parse_args(argv, inputs)
    return args.cfg, args.inputs


def run(main: Callable[[list[str]], int | None], keep_run: bool = True) -> None:
    """Call `main(argv)`; a DollyError becomes one line on stderr and exit code 2.

    keep_run=False (the read-only entry points, config and plan): the run `mlflow run` created
    for this process before it started is ended and deleted (MLflow's trash: `mlflow runs
    restore` brings it back), failed or not, so looking something up leaves no run behind. Any
    other entry point that fails before it started that run (a mistyped key, a model URI that
    does not resolve: nothing logged but the CLI's parameters) has it deleted too, unless `main`
    started it (main names a failed step's run)."""
    quiet_third_party()
    try:
        code = main(sys.argv[1:]) or 0
    except DollyError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as e:  # unexpected: keep the traceback for a bug report, end with one line
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        code = 1
    import os

    if not keep_run:
        discard_launch_run()
    elif code != 0 and os.environ.get("MLFLOW_RUN_ID"):  # still unused: start_run pops it
        discard_launch_run(top_level_only=True)
    sys.exit(code)


# Third-party output a user cannot act on, which buried the steps' own lines: per-file and
# per-tensor progress bars ('Downloading artifacts', 'Loading weights', 'Writing model shards'),
# and warnings about choices this project made knowingly. The environment reaches the processes
# a step starts (training ranks, Spark's Python workers); a variable the user set is kept. The
# Trainer's per-step bar is progress on long work and stays.
# Usage telemetry is off too: the default profile makes no network calls (MLflow 3 and the Hub
# send usage data by default).
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
              "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}
# pyspark 4.1 warns at every pandas UDF that pandas 3 is not fully supported (the scoring UDF's
# use of pandas is tested here).
_QUIET_WARNING = "ignore:PySpark does not yet fully support pandas:FutureWarning"


def quiet_third_party() -> None:
    """Silence _QUIET_ENV's progress bars and _QUIET_WARNING for this process and
    the ones it starts."""
    import os
    import warnings

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "huggingface_hub" in sys.modules:  # read its setting when it was imported
        from huggingface_hub.utils import disable_progress_bars

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            disable_progress_bars()
    given = os.environ.get("PYTHONWARNINGS", "")
    if _QUIET_WARNING not in given:
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (given, _QUIET_WARNING)))
    warnings.filterwarnings("ignore", message=_QUIET_WARNING.split(":")[1],
                            category=FutureWarning)


def discard_launch_run(top_level_only: bool = False) -> None:
    """Delete, once `mlflow run` has ended it, the run it made for this entry point
    (MLFLOW_RUN_ID), if it is one (its `mlflow.project.entryPoint` tag names this module's entry
    point). MLflow's CLI ends the run after this process exits and fails on a run already
    deleted (MLflow 3.17 compares the run's status text with RunStatus numbers, so it cannot see
    that the run has ended), so a detached process waits for the end (at most 120 s), then
    deletes it. Nothing happens outside `mlflow run`; a tracking store that cannot be reached
    leaves the run as it was."""
    import os
    import subprocess
    from pathlib import Path

    run_id = os.environ.get("MLFLOW_RUN_ID")
    spec = sys.modules["__main__"].__spec__
    if not run_id or spec is None:
        return
    root = str(Path(__file__).resolve().parents[1])
    script = (f"import sys; sys.path.insert(0, {root!r}); "
              "from dolly.cli import _delete_when_ended; "
              f"_delete_when_ended({run_id!r}, {spec.name.rsplit('.', 1)[-1]!r}, "
              f"{int(time.time() * 1000)}, top_level_only={top_level_only})")
    subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _delete_when_ended(run_id: str, entry_point: str, exited_ms: int,
                       top_level_only: bool = False, wait_s: float = 120.0) -> None:
    """Delete run `run_id` of `entry_point` once it has ended, if it ended after `exited_ms`
    (the entry point's exit, epoch ms): a run that had ended before is not this launch's.
    top_level_only: not a child run (of `main`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:  # a store busy for a moment (sqlite) is tried again until the deadline
            run = client.get_run(run_id)
            tags = run.data.tags
            if (tags.get("mlflow.project.entryPoint") != entry_point
                    or (top_level_only and "mlflow.parentRunId" in tags)):
                return
            if run.info.status != "RUNNING":
                if (run.info.end_time or 0) >= exited_ms - 1000:  # ms clocks of one machine
                    client.delete_run(run_id)
                return
        except (MlflowException, OSError):
            pass
        time.sleep(0.2)
