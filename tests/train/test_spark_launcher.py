"""dolly.train.spark (launcher=spark): the pieces that need no Spark job: the command each task
runs, the error line."""
from __future__ import annotations

import sys

from dolly.train import spark


def test_each_task_runs_torchrun_through_the_guard_with_the_distributors_arguments(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("PYSPARK_TORCH_DISTRIBUTOR_RDZV_ID", "abc")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    params = {"local_mode": False, "num_processes": 2, "deepspeed_config": "/p/zero3.json"}
    cmd = spark._torchrun_through_guard(params, "/p/dolly/train/rank.py", "--device", "cpu")
    assert cmd == [sys.executable, spark.GUARD_FILE, "--nnodes=2", "--node_rank=1",
                   "--rdzv_endpoint=10.0.0.1:1234", "--rdzv_id=abc", "--nproc_per_node=1",
                   "/p/dolly/train/rank.py", "--device", "cpu", "--deepspeed",
                   "--deepspeed_config", "/p/zero3.json"]


def test_the_step_error_names_the_failing_rank_not_the_command():
    err = RuntimeError("An error occurred while calling o80.collectToPython.\n: RuntimeError: "
                       "Command ['python', '--node_rank=1'] failed with return code 1. The task "
                       "output is included below: ...\nrank 1 failed: KeyboardInterrupt: \nerror")
    assert spark._first_line(err) == "rank 1 failed: KeyboardInterrupt:"
    # a long traceback pushed the "rank N failed" line out of the task's last 100 lines
    assert spark._first_line(RuntimeError(
        "An error occurred while calling o48.collectToPython.\n...\n  File \"x.py\"\n"
        "error: RuntimeError: Timed out waiting 20000ms\n")) == \
        "a rank failed: RuntimeError: Timed out waiting 20000ms"
    assert spark._first_line(RuntimeError(
        "Job aborted due to stage failure: lost Command ['python', 'x']\nmore")) == \
        "Job aborted due to stage failure: lost"
