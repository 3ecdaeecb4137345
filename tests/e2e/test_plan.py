"""`mlflow run . -e plan` as the README shows it: offline, no weights, one plan per profile."""
from __future__ import annotations

import pytest

from helpers import mlflow_run

pytestmark = pytest.mark.timeout(300)


def test_plan_entry_point_for_a10_x4(tracking_uri):
    proc = mlflow_run("plan", {"config": "configs/gpt-j-6b-a10.yaml", "num_gpus": "4"},
                      tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "plan (gpt-j-6b-a10):" in out
    assert "6,050,882,784 parameters" in out and "GPTJConfig()" in out
    assert "1 node(s) x 4 GPU(s), bf16, micro-batch 4 x 1024 tokens" in out
    assert "model states per GPU (DeepSpeed ZeRO-3 estimate): 3.59 GiB" in out
    assert "CPU memory per node (DeepSpeed estimate, offload optimizer): 135.25 GiB" in out
    assert ("verdict: fits: each of the 4 GPUs needs 7.63 GiB of 20.25 GiB usable "
            "(22.50 GiB less 10% reserve)") in out


def test_plan_of_an_unknown_model_offline_is_one_line(tracking_uri, tmp_path):
    proc = mlflow_run("plan", {"base_model": str(tmp_path / "nowhere"), "tokenizer": ""},
                      tracking_uri)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: cannot read the config of base_model "
                                f"'{tmp_path / 'nowhere'}': ")
    assert "Traceback" not in proc.stderr
