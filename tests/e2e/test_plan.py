"""`mlflow run . -e plan` as the README shows it: offline, no weights, one plan per profile."""
from __future__ import annotations

import time

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


@pytest.mark.parametrize("profile, model, verdict", [
    ("dolly-v2-12b", "EleutherAI/pythia-12b (config.json values shipped in "
     "dolly/train/known_configs/): 11,846,072,320 parameters",
     "verdict: fits: each of the 8 GPUs needs 31.76 GiB of 36.00 GiB usable "
     "(40.00 GiB less 10% reserve)"),
    ("llama-3.1-8b-h100", "meta-llama/Llama-3.1-8B (config.json values shipped in "
     "dolly/train/known_configs/): 8,030,261,248 parameters",
     "verdict: fits: each of the 8 GPUs needs 45.67 GiB of 71.64 GiB usable "
     "(79.60 GiB less 10% reserve)"),
], ids=["dolly-v2-12b", "llama-3.1-8b-h100"])
def test_plan_of_the_other_bases_offline(tracking_uri, profile, model, verdict):
    """Dolly v2's Pythia 12B and Llama 3.1 8B: no weights, no Hub (HF_HUB_OFFLINE=1), not in
    the Hugging Face cache: the shipped config.json values."""
    proc = mlflow_run("plan", {"config": f"configs/{profile}.yaml", "num_gpus": "8"},
                      tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"plan ({profile}):" in proc.stdout
    assert model in proc.stdout
    assert verdict in proc.stdout


def test_plan_of_an_unknown_model_offline_is_one_line(tracking_uri, tmp_path):
    proc = mlflow_run("plan", {"base_model": str(tmp_path / "nowhere"), "tokenizer": ""},
                      tracking_uri)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: cannot read the config of base_model "
                                f"'{tmp_path / 'nowhere'}': ")
    assert "Traceback" not in proc.stderr


def _runs(tracking_uri: str, view) -> list:
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=view)


@pytest.mark.parametrize("entry_point, params, code", [
    ("plan", {}, 0),
    ("config", {"key": "max_steps"}, 0),
    ("config", {"key": "max_stepz"}, 2),  # failed: unknown key
])
def test_looking_something_up_leaves_no_run(tracking_uri, entry_point, params, code):
    """`mlflow run` creates a run before the entry point starts; plan and config end and delete
    it (MLflow's trash), failed or not, and the CLI still reports the exit status."""
    from mlflow.entities import ViewType

    proc = mlflow_run(entry_point, params, tracking_uri)
    assert proc.returncode == (0 if code == 0 else 1), proc.stderr[-2000:]
    if code:
        assert "error: unknown config key 'max_stepz'; did you mean 'max_steps'?" in proc.stderr
    else:
        assert "Run (ID" in proc.stderr and "succeeded" in proc.stderr
    deadline = time.monotonic() + 60  # deleted by a process of its own once the CLI ended it
    while _runs(tracking_uri, ViewType.ACTIVE_ONLY) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _runs(tracking_uri, ViewType.ACTIVE_ONLY) == []
    deleted = _runs(tracking_uri, ViewType.DELETED_ONLY)
    assert [(r.data.tags["mlflow.project.entryPoint"], r.info.status) for r in deleted] == [
        (entry_point, "FINISHED" if code == 0 else "FAILED")]


@pytest.mark.parametrize("finetune, base, verdict", [
    ("lora", "frozen base per GPU (16-bit): 11.27 GiB",
     "verdict: fits: each of the 1 GPUs needs 15.97 GiB of 20.25 GiB usable"),
    ("qlora", "frozen base per GPU (4-bit NF4 linear layers",
     "verdict: fits: each of the 1 GPUs needs 10.88 GiB of 20.25 GiB usable"),
])
def test_plan_of_lora_and_qlora_on_one_a10(tracking_uri, finetune, base, verdict):
    """GPT-J 6B on one 24 GB A10: full fine-tuning cannot fit (ZeRO-3 on one GPU splits
    nothing), LoRA's 16-bit base and QLoRA's 4-bit one do (docs/lora.md's table)."""
    proc = mlflow_run("plan", {"config": "configs/gpt-j-6b-a10.yaml", "num_gpus": "1",
                               "finetune": finetune}, tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"finetune {finetune} (LoRA r=16 on 168 linear layers, all-linear; plain data " \
        "parallel" in out
    assert base in out
    assert "adapters per GPU: 33,030,144 trainable parameters" in out
    assert verdict in out
