"""Everything that crosses the process boundary between the train step and its ranks, in one
place: the launch plan, the rank's command line (both the side that writes it and the side that
reads it), the config's encoding on that command line, and the result file rank 0 leaves for the
parent.

Both launchers (the DeepSpeed launcher in dolly.train.launch, a Spark barrier job in
dolly.train.spark) start the same rank module, `python -m dolly.train.rank`, with `rank_args`;
the rank parses them with `rank_parser`. The rank imports this module and never the launchers.
The standard library and dolly.config only: both processes import it cheaply.
"""
from __future__ import annotations

import argparse
import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolly.config import Config
from dolly.errors import DollyError

RANK_MODULE = "dolly.train.rank"
FINAL_DIR = "final"                 # <output_dir>/final: the consolidated weights rank 0 writes
RESULT_FILE = "train_result.json"   # <output_dir>/train_result.json: rank 0's summary
# lr_scheduler values whose learning rate at a step does not depend on the run's length: a
# checkpoint of one continues exactly into a longer run (checkpoints.schedule_conflict, and the
# ranks' own check, trainer.ScheduleGuard)
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


@dataclass
class Plan:
    """What the parent decided before launching: the config the ranks get, and why."""

    cfg: Config                # precision resolved; resume = a checkpoint path or 'never'
    gpu: bool                  # the ranks' device, passed to them as --device gpu|cpu
    procs_per_node: int
    world_size: int
    resumed_from: str | None   # checkpoint path or None
    notes: list[str]
    load_universal: bool = False  # resumed_from is a universal checkpoint (another world size)


def b64_json(obj: Any) -> str:
    """`obj` as URL-safe base64 of its JSON: one argv word, no quoting needed."""
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def encode_config(cfg: Config) -> str:
    """The config's non-default fields (Config.to_strings) as base64 JSON: a short argv that
    `decode_config` reads back to an equal Config."""
    return b64_json(cfg.to_strings(changed_from=Config()))


def decode_config(text: str) -> Config:
    """The Config that `encode_config` wrote (raises ConfigError for a bad value)."""
    return Config.from_strings(json.loads(base64.urlsafe_b64decode(text)))


def rank_args(p: Plan, prepared: Path, prepared_uri: str) -> list[str]:
    """The arguments of `python -m dolly.train.rank` (every launcher passes the same)."""
    return ["--config_b64", encode_config(p.cfg), "--device", "gpu" if p.gpu else "cpu",
            "--prepared", str(Path(prepared).resolve()), "--prepared_uri", prepared_uri] + (
        ["--load_universal"] if p.load_universal else [])


def rank_parser() -> argparse.ArgumentParser:
    """The rank's command line: what `rank_args` writes, plus what only the Spark launcher adds
    (`--mlflow_run_id`, `--mlflow_tracking_uri`, `--exit_with_parent`) and what pyspark's
    DeepspeedTorchDistributor appends (`--deepspeed --deepspeed_config <file>`)."""
    ap = argparse.ArgumentParser(prog=f"python -m {RANK_MODULE}",
                                 description="One rank of the train step (started by the launcher).")
    ap.add_argument("--config_b64", required=True,
                    help="the resolved config's non-default fields, JSON in base64")
    ap.add_argument("--device", required=True, choices=("gpu", "cpu"),
                    help="the parent's decision: GPU ranks (NCCL) or CPU ranks (gloo)")
    ap.add_argument("--prepared", required=True, help="local prepared/ folder")
    ap.add_argument("--prepared_uri", default="", help="fetched on nodes that lack --prepared")
    ap.add_argument("--load_universal", action="store_true",
                    help="the resume checkpoint is in DeepSpeed's universal format")
    ap.add_argument("--mlflow_run_id", default="",
                    help="rank 0 logs into this run (default: $MLFLOW_RUN_ID)")
    ap.add_argument("--mlflow_tracking_uri", default="",
                    help="the run's tracking store (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--exit_with_parent", action="store_true",
                    help="end this rank when its launcher process is gone (launcher=spark)")
    # pyspark's DeepspeedTorchDistributor appends these two: ZeRO is always on, and the JSON it
    # names is the config's own deepspeed_config file (the parent passes its absolute path)
    ap.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deepspeed_config", default="", help=argparse.SUPPRESS)
    return ap


def write_result(cfg: Config, result: dict[str, Any]) -> Path:
    """Rank 0's summary for the parent (steps, losses, seconds, final_dir) as
    <output_dir>/train_result.json; returns its path."""
    path = Path(cfg.output_dir) / RESULT_FILE
    path.write_text(json.dumps(result, indent=2))
    return path


def read_result(cfg: Config) -> dict[str, Any]:
    """The train_result.json rank 0 wrote (steps, losses, seconds, final_dir); raises DollyError
    when rank 0 did not finish."""
    path = Path(cfg.output_dir) / RESULT_FILE
    if not path.is_file():
        raise DollyError(f"training ended without {path}: rank 0 did not finish")
    return json.loads(path.read_text())
