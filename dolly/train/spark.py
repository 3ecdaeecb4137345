"""The train step's ranks as a Spark barrier job (launcher=spark), parent side.

pyspark's `DeepspeedTorchDistributor` (a `TorchDistributor` that also hands DeepSpeed its config)
runs the rank file `dolly/train/rank.py` under torchrun on every task of a barrier job, wiring
torchrun's rendezvous between the executors: with GPUs one task per node runs `num_gpus` ranks;
without, each of `cpu_ranks` x `num_nodes` tasks runs one CPU rank (`useGpu=False`,
`localMode=False`; measured with pyspark 4.3.0 on `local[2]`, 2026-11-29: ranks 0 and 1 of 2
over gloo, one torchrun process per task). DeepspeedTorchDistributor
rather than the plain TorchDistributor because it passes the ZeRO-3 JSON the same way the
DeepSpeed launcher path reads it (`--deepspeed_config <file>`), so both launchers run one config.

Rough edges of pyspark 4.3 handled here: the distributor appends `--deepspeed
--deepspeed_config <path>` to the script's arguments (the rank accepts them); it starts torchrun
directly, so ranks outlive a killed Spark task; and pyspark's `torch_run_process_wrapper` (the
plain TorchDistributor's guard) always exits 0, so a failed rank would not fail the job.
`_Distributor` starts torchrun through `dolly/train/torchrun_guard.py` (ends torchrun and its ranks
when the task is gone, exits with torchrun's code), and every rank also ends itself when its
torchrun is gone (`--exit_with_parent`).

The project must be at the same path on every executor (as with a hostfile: Databricks Repos or
a shared file system), and output_dir on a file system every node shares.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from dolly.config import Config
from dolly.errors import DollyError
from dolly.spark_session import spark_session
from dolly.train.handoff import Plan, rank_args

RANK_FILE = Path(__file__).resolve().with_name("rank.py")
GUARD_FILE = str(Path(__file__).resolve().with_name("torchrun_guard.py"))


def _torchrun_through_guard(input_params, train_path, *args):
    """DeepspeedTorchDistributor's torchrun command, run through dolly/train/torchrun_guard.py."""
    from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor

    cmd = DeepspeedTorchDistributor._create_torchrun_command(input_params, train_path, *args)
    at = cmd.index("torch.distributed.run")  # [python, -m, torch.distributed.run, ...]
    return [cmd[0], GUARD_FILE] + cmd[at + 1:]


def _run_rank_file(input_params, train_path, *args, **kwargs) -> None:
    from pyspark.ml.torch.distributor import TorchDistributor

    TorchDistributor._execute_command(_torchrun_through_guard(input_params, train_path, *args),
                                      log_streaming_client=input_params.get("log_streaming_client"))


def distributor(num_gpus: int, num_nodes: int, use_gpu: bool, deepspeed_config: str):
    """A DeepspeedTorchDistributor whose ranks end with their Spark task (see module doc)."""
    from pyspark import cloudpickle
    from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor

    # the barrier tasks get these functions by value: executors need not import this module
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class _Distributor(DeepspeedTorchDistributor):
        def run(self, train_object, *args):
            return self._run(train_object, _run_rank_file, *args)

    return _Distributor(numGpus=num_gpus, nnodes=num_nodes, localMode=False, useGpu=use_gpu,
                        deepspeedConfig=deepspeed_config)


def session(cfg: Config):
    """(the active Spark session or one built from spark_master, whether this step built it)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    return spark_session(cfg.spark_master, app="dolly-train"), True


def launch(p: Plan, prepared: Path, prepared_uri: str, run_id: str | None = None,
           tracking_uri: str | None = None) -> int:
    """Run the ranks of plan `p` as one Spark barrier job; 0 when every rank succeeded. Raises
    DollyError naming the job's failure (each rank's own error is in the log above it, streamed
    from the executors)."""
    cfg = p.cfg
    args = rank_args(p, prepared, prepared_uri) + ["--exit_with_parent"]
    if run_id:
        args += ["--mlflow_run_id", run_id]
        if tracking_uri:
            args += ["--mlflow_tracking_uri", tracking_uri]
    spark, built = session(cfg)
    try:
        dist = distributor(p.procs_per_node, p.world_size // p.procs_per_node, p.gpu,
                           str(Path(cfg.deepspeed_config).resolve()))
        dist.run(str(RANK_FILE), *args)
    except Exception as e:  # Py4J / Spark errors carry the task's whole output: keep a line
        raise DollyError(f"training failed: the Spark job ended ({_first_line(e)}); the "
                         "failing rank's error is above") from None
    finally:
        if built:
            spark.stop()
    return 0


def _first_line(e: BaseException) -> str:
    """The failing rank's own line from the job's error ("rank 1 failed: ...", else the rank's
    final "error: ..." line), else the error's first line; never the torchrun command the task
    error quotes."""
    text = str(e)
    found = re.search(r"rank \d+ failed: [^\n]*", text)
    if found:
        return found.group(0).strip()[:300]
    found = re.search(r"^error: ([^\n]*)", text, re.MULTILINE)
    if found:
        return f"a rank failed: {found.group(1).strip()[:300]}"
    return (text.strip().splitlines() or [""])[0].split(" Command [")[0][:300]
