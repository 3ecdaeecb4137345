"""Every benchmark script still runs: each on a tiny input, its last stdout line a JSON object with
the fields bench/README.md names. No timing is asserted (figures live in bench/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import FIXTURES, ROOT, project_env

DATA = str(FIXTURES / "alpaca_sample.json")  # 16 records
# A 1-layer, 64-wide GPT-J with the corpus BPE: seconds, not minutes, on 2 cores.
SMALL = ["--tokenizer", "corpus-bpe", "--n-layer", "1", "--n-embd", "64", "--n-head", "4",
         "--rotary-dim", "16", "--threads", "1"]

CASES = {
    "data_prep": (["--copies", "1", "--repeats", "1"],
                  ["records", "seconds", "tokenizer_only_seconds", "baseline_seconds",
                   "overhead_vs_tokenizer", "speedup"]),
    "padding": (["--worlds", "1,2"],
                ["padding_efficiency", "real_tokens", "computed_tokens", "packed_rows",
                 "max_length", "length_grouped_padding_efficiency_world1",
                 "length_grouped_padding_efficiency_world2", "baseline_padding_efficiency",
                 "baseline_padding_efficiency_longest", "compute_saved"]),
    "train_throughput": (["--steps", "2", "--warmup-steps", "1", "--batch-size", "2", *SMALL],
                         ["tokens_per_second", "baseline_tokens_per_second", "speedup",
                          "padding_efficiency", "baseline_padding_efficiency", "real_tokens",
                          "max_length", "final_loss", "baseline_final_loss"]),
    "scoring": (["--rows", "4", "--max-new-tokens", "2", "--batch-size", "2", *SMALL],
                ["rows", "rows_per_second", "baseline_rows_per_second", "speedup"]),
    "serving": (["--requests", "4", "--concurrency", "2", "--max-new-tokens", "2", "--lone", "1",
                 "--timeout-s", "1", "--timeout-rows", "8", "--timeout-new-tokens", "4",
                 "--idle-timeout", "30", *SMALL],
                ["requests", "concurrency", "p50_ms", "p99_ms", "errors", "lone_ms",
                 "p50_over_lone", "unbatched_p50_ms", "unbatched_requests_per_second",
                 "requests_per_second_over_unbatched", "timeout_status",
                 "next_request_status", "streamed_first_token_p50_ms",
                 "lone_first_token_ms", "streamed_requests_per_second"]),
    "register_memory": (["--n-layer", "1", "--n-embd", "64", "--n-head", "4", "--rotary-dim", "16",
                         "--min-params", "0", "--no-baseline"],
                        ["model_bytes", "peak_rss_bytes", "peak_rss_over_model_bytes"]),
    # the real rank code (dolly.train.rank.train, ZeRO-3, 1 CPU rank; then finetune=lora in a
    # child process) + both generation paths
    "gpu_check": (["--smoke"],
                  ["train_tokens_per_second_per_gpu", "padding_efficiency", "planned_gpu_gib",
                   "final_loss", "micro_batch", "gen_rows_per_second", "gen_tokens_per_second",
                   "gen_baseline_rows_per_second", "gen_speedup", "gen_agreement",
                   "lora_tokens_per_second_per_gpu", "lora_padding_efficiency", "lora_final_loss",
                   "lora_micro_batch", "lora_param_count", "lora_trainable_param_count"]),
}




def _run(name: str, tmp: Path) -> subprocess.CompletedProcess:
    args, _ = CASES[name]
    # From the project root, as bench/README.md runs them; stores and artifacts go to tmp dirs.
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--data", DATA, *args],
        cwd=ROOT, env=project_env(f"sqlite:///{tmp}/mlflow.db", TMPDIR=str(tmp)),
        capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All scripts, 3 at a time: much of their time is imports, server start-up and waiting."""
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {n: pool.submit(_run, n, tmp_path_factory.mktemp(n)) for n in CASES}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(CASES))
def test_bench_script_ends_with_its_json(name, runs):
    proc = runs[name].result()
    _, fields = CASES[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict)
    missing = [f for f in fields if f not in result]
    assert not missing, f"{name}: missing {missing} in {last}"
    assert result.get("bench", name) == name
    for f in fields:
        assert isinstance(result[f], (int, float)), (f, result[f])
    if name == "serving":
        assert result["errors"] == 0 and result["requests"] == 4
        assert result["unbatched_requests"] == 4 and result["next_request_status"] == 200
        assert result["api"] == "chat" and result["streamed_requests"] == 4
    if name == "scoring":
        assert result["rows"] == 4
    if name in ("padding", "train_throughput"):  # ours is the config's default: packed rows
        assert result["batching"] == "packed"
        assert result["padding_efficiency"] >= result["baseline_padding_efficiency"]
    if name == "gpu_check":  # both generation paths gave the same greedy answers
        assert result["mode"] == "smoke" and result["gen_agreement"] == 1.0
        assert result["gen_rows"] == 6 and result["timed_steps"] == 2
        _assert_lora_ran(result)


def _assert_lora_ran(result: dict) -> None:
    """gpu_check's LoRA part trained adapters only and saved them; QLoRA is skipped on CPU."""
    assert "lora_error" not in result, result["lora_error"]
    assert result["lora_frozen_digests_match"] is True
    assert 0 < result["lora_trainable_param_count"] < result["lora_param_count"]
    assert {"adapter_model.safetensors", "adapter_config.json",
            "base_reference.json"} <= set(result["lora_adapter_files"])
    # the plan's figure, or why there is none (the plan does not handle adapters, no DeepSpeed)
    assert (isinstance(result["lora_planned_gpu_gib"], float)
            or isinstance(result["lora_plan_note"], str)), result
    assert "CPU" in result["qlora_skipped"] and "qlora_tokens_per_second_per_gpu" not in result


@pytest.mark.timeout(300)
def test_gpu_check_generation_needs_neither_deepspeed_nor_mlflow(tmp_path):
    """The GPU machine may lack DeepSpeed and MLflow: generation and LoRA still run, the full
    fine-tune says why it did not."""
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; sys.modules['mlflow'] = None; "
            f"sys.path.insert(0, {str(ROOT / 'bench')!r}); "
            f"sys.argv = ['gpu_check.py', '--smoke', '--data', {DATA!r}]; "
            f"runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=project_env(f"sqlite:///{tmp_path}/mlflow.db", TMPDIR=str(tmp_path)),
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train_skipped"] == "DeepSpeed is not installed"
    assert result["gen_rows"] == 6 and result["gen_agreement"] == 1.0
    _assert_lora_ran(result)  # LoRA needs neither (its child process cannot import them)
    assert "mlflow" not in proc.stderr.lower()
