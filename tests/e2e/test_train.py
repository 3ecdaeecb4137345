"""The train entry point as users run it: `mlflow run . -e train`, real DeepSpeed ZeRO-3 on 2 CPU
ranks over gloo, a sqlite tracking store. One interrupted-and-resumed pair of runs serves the
partitioning, saved-weights, resume and MLflow checks; one more run checks that a dying rank
ends the step quickly with its error in the log; reruns that would change the schedule of a
checkpoint's run are refused before launch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (ROOT, TINY_OVERRIDES, free_port, fresh_store, mlflow_run, prepared_run,
                      project_env, runs_in, tracking_to)
from dolly.train import handoff, launch

pytestmark = pytest.mark.timeout(900)

STEPS_A, STEPS_B = 4, 8
TRAIN = {k: v for k, v in TINY_OVERRIDES.items() if k != "builtin_records"}
# constant: the rate at a step does not depend on the run's length, so run A (4 steps) is exactly
# the first half of run B (8 steps) and stands for B interrupted at its step-4 checkpoint. A
# cosine or linear schedule of 4 steps is not resumed into 8 (see the schedule tests below).
TRAIN.update(per_device_batch_size=8, logging_steps=1, save_steps=4, eval_steps=4,
             warmup_steps=0, learning_rate=3e-3, lr_scheduler="constant", rank_timeout_s=60)

# not 29500: other test sessions on this machine may train at the same time
TRAIN["master_port"] = free_port()


@dataclass
class Runs:
    tracking_uri: str
    prepared_uri: str
    prepared: Path
    out: Path
    a: subprocess.CompletedProcess
    b: subprocess.CompletedProcess

    def run(self, proc):
        """The MLflow run of one `mlflow run` call (its id is in the train step's output)."""
        import mlflow

        line = next(l for l in proc.stdout.splitlines() if "model_uri = " in l)
        client = mlflow.MlflowClient(self.tracking_uri)
        model_uri = line.split("model_uri = ")[1].strip()
        return client, next(r for r in runs_in(self.tracking_uri, "train")
                            if r.data.tags.get("model_uri") == model_uri)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Run A stops at its first checkpoint (max_steps=4); run B, the same command with the full
    max_steps=8, must resume from it and finish the schedule."""
    root = tmp_path_factory.mktemp("train")
    uri, prepared_uri, local = prepared_run(root, TINY_OVERRIDES, "train-e2e")
    out = root / "out"
    params = {"prepared": prepared_uri, "output_dir": out, **TRAIN}
    env = {"MLFLOW_EXPERIMENT_NAME": "train-e2e"}
    a = mlflow_run("train", {**params, "max_steps": STEPS_A}, uri, **env)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-5000:]
    assert (out / "checkpoint-4").is_dir()
    b = mlflow_run("train", {**params, "max_steps": STEPS_B}, uri, **env)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-5000:]
    return Runs(uri, prepared_uri, local, out, a, b)


def _probe_batch(prepared: Path, n: int):
    import pandas as pd

    from dolly.data.collator import CompletionCollator
    from dolly.tokenizer import load_tokenizer
    from dolly.prompts import special_ids

    tok = load_tokenizer(str(prepared / "tokenizer"))
    test = pd.read_parquet(prepared / "test.parquet")
    feats = [{"input_ids": test["input_ids"][i], "response_start": test["response_start"][i]}
             for i in range(min(n, len(test)))]
    return CompletionCollator(tok.pad_token_id, special_ids(tok)[0])(feats), tok


def test_zero3_partitions_parameters_and_saves_the_trained_weights(runs):
    import torch
    from transformers import GPTJForCausalLM

    from dolly.config import load_config
    from dolly.models.base import load_base_model

    ranks = [json.loads((runs.out / f"zero3_rank{r}.json").read_text()) for r in (0, 1)]
    final = GPTJForCausalLM.from_pretrained(runs.out / "final")
    total = sum(p.numel() for p in final.parameters())
    for rec in ranks:
        # during training every tensor was partitioned: each rank held about half of the
        # elements, and the module's own tensors were empty (gathered only when used) except
        # the few small ones ZeRO-3 keeps whole (layer norms, biases: under the persistence
        # threshold)
        assert rec["world_size"] == 2 and rec["step"] >= 1
        assert rec["partitioned_tensors"] == rec["tensors"] > 0
        assert rec["full_numel"] == total
        assert rec["materialized_numel"] < 0.05 * total
        assert total / 2 <= rec["local_numel"] <= total / 2 + rec["tensors"]
    assert len({r["pid"] for r in ranks}) == 2

    result = json.loads((runs.out / "train_result.json").read_text())
    batch, tok = _probe_batch(runs.prepared, result["probe_records"])
    with torch.no_grad():
        saved = final(**batch).loss.item()
        initial = load_base_model(load_config(None, TRAIN), tok)(**batch).loss.item()
    # the consolidated safetensors reproduce the trained (partitioned) model's loss exactly ...
    assert saved == pytest.approx(result["probe_loss"], rel=1e-4)
    # ... and they are trained weights, not the initial ones
    assert saved < initial - 0.5


def test_rerun_resumes_from_the_checkpoint_and_ends_at_the_same_step(runs):
    result = json.loads((runs.out / "train_result.json").read_text())
    assert result["resumed_from_step"] == STEPS_A
    assert result["global_step"] == result["max_steps"] == STEPS_B
    assert f"(step {STEPS_A})" in runs.b.stdout + runs.b.stderr
    client, run = runs.run(runs.b)
    assert run.data.params["resumed_from_step"] == str(STEPS_A)  # a fact, not a curve
    assert "resumed_from_step" not in run.data.metrics
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(STEPS_A + 1, STEPS_B + 1))  # continued, did not start over
    # ... on the same (constant) schedule: every resumed step at the learning rate A trained at
    rates = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                          "learning_rate"))
    assert rates == [(5, 0.003), (6, 0.003), (7, 0.003), (8, 0.003)]
    _, run_a = runs.run(runs.a)
    assert run_a.data.params["resumed_from_step"] == "0"
    assert sorted(p.name for p in runs.out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_mlflow_run_logs_params_metrics_and_a_loadable_model(runs):
    import mlflow
    import numpy as np

    client, run = runs.run(runs.b)
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert (p["zero_stage"], p["world_size"], p["precision"]) == ("3", "2", "fp32")
    assert p["effective_batch_size"] == "16" and p["prepared"] == runs.prepared_uri
    # charted: the per-step curves (mfu needs a known GPU peak), the base's corpus perplexity and
    # its copying of unseen words;
    # none of the Trainer's leftovers (epoch, total_flos, train_loss, train_runtime, eval speed)
    assert {k for k in m if not k.startswith("system/")} == {
        "loss", "grad_norm", "learning_rate", "eval_loss", "train_tokens_per_second",
        "padding_efficiency", "model_tflops_per_second", "peak_rss_mb_rank0",
        "peak_rss_mb_rank1", "pretrain/corpus_perplexity",
        "pretrain/random_init_corpus_perplexity", "pretrain/unseen_copy_accuracy"}
    for key in ("loss", "train_tokens_per_second", "peak_rss_mb_rank1"):  # one point a step
        steps = [h.step for h in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(STEPS_A + 1, STEPS_B + 1)), (key, steps)
    assert m["train_tokens_per_second"] > 0 and 0.5 < m["padding_efficiency"] <= 1.0
    # the whole run's figures, once, as tags
    assert float(tags["train_runtime_s"]) > 0 and float(tags["mean_train_tokens_per_second"]) > 0
    assert 0.5 < float(tags["mean_padding_efficiency"]) <= 1.0
    assert float(tags["base_corpus_perplexity"]) == pytest.approx(
        m["pretrain/corpus_perplexity"], rel=1e-3)
    assert float(tags["base_unseen_copy_accuracy"]) == pytest.approx(
        m["pretrain/unseen_copy_accuracy"], abs=1e-3)
    # the logged model is named after its base, and the run's URI of that name finds it
    model_id = tags["model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).name == "dolly-tiny-gptj"
    with tracking_to(runs.tracking_uri):
        info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/dolly-tiny-gptj")
    assert info.model_id == model_id
    # the loss history of the two runs together falls
    _, run_a = runs.run(runs.a)
    hist = [h.value for r in (run_a, run) for h in
            sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda h: h.step)]
    assert len(hist) == STEPS_B and hist[-1] < hist[0] - 0.5
    assert sum(hist[STEPS_A:]) < sum(hist[:STEPS_A])

    with tracking_to(runs.tracking_uri):
        loaded = mlflow.transformers.load_model(run.data.tags["model_uri"])
    model = loaded.model if hasattr(loaded, "model") else loaded["model"]
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (TRAIN["tiny_n_layer"], TRAIN["tiny_n_embd"],
                                                     TRAIN["tiny_n_head"])
    w = model.transformer.h[0].mlp.fc_in.weight.detach().numpy()
    assert w.shape == (4 * TRAIN["tiny_n_embd"], TRAIN["tiny_n_embd"])
    assert np.isfinite(w).all() and w.std() > 1e-3
    tok = loaded.tokenizer if hasattr(loaded, "tokenizer") else loaded["tokenizer"]
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("### End")


def _train_cmd(prepared: Path, out: Path, **settings) -> list[str]:
    """`python -m steps.train` (what `mlflow run . -e train` runs) with TRAIN plus `settings`."""
    merged = {**TRAIN, **settings}
    return [sys.executable, "-m", "steps.train", "--prepared", str(prepared),
            "--output_dir", str(out)] + [a for k, v in merged.items() for a in (f"--{k}", str(v))]


def test_a_dying_rank_ends_the_step_quickly_and_a_rerun_resumes(runs, tmp_path):
    out, total = tmp_path / "out", 60
    cmd = _train_cmd(runs.prepared, out, max_steps=total, eval_steps=0, save_steps=4)
    env = project_env(fresh_store(tmp_path))
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 400
        while (not (out / "checkpoint-4" / "trainer_state.json").exists()
               and proc.poll() is None and time.time() < deadline):
            time.sleep(0.1)
        rec = out / "zero3_rank1.json"
        assert rec.exists() and proc.poll() is None, log.read_text()[-3000:]
        os.kill(json.loads(rec.read_text())["pid"], signal.SIGINT)  # rank 1 dies mid-training
        t0 = time.time()
        code = proc.wait(timeout=120)
    elapsed = time.time() - t0
    text = log.read_text()
    assert code != 0
    assert elapsed < 30, elapsed  # the launcher took the other rank down, no hang
    assert "rank 1 failed: KeyboardInterrupt" in text
    assert "error: training failed: the launcher exited with code" in text
    assert not (out / "train_result.json").exists()
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
               if (p / "trainer_state.json").exists())
    print(f"\nrank 1 killed after checkpoint-{last}: the step failed {elapsed:.1f} s later")

    # the same command again (resume=auto): continues from the last checkpoint to the end
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from_step"] == last >= 4
    assert result["global_step"] == result["max_steps"] == total
    print(f"rerun resumed from step {last}, finished at step {result['global_step']}")


SIX = dict(max_steps=6, eval_steps=0, save_steps=0)  # the runs whose weights are compared


@pytest.fixture(scope="module")
def six_steps(runs, tmp_path_factory) -> Path:
    """model.safetensors of 1 node x 2 ranks (DeepSpeed launcher), 6 steps: the weights the
    other ways of launching the same ranks must reproduce."""
    root = tmp_path_factory.mktemp("six_steps")
    # checkpoint-3 and checkpoint-6 as well: the schedule test shortens this run
    one = subprocess.run(_train_cmd(runs.prepared, root / "one", **{**SIX, "save_steps": 3}),
                         cwd=ROOT,
                         env=project_env(fresh_store(root)), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    return root / "one" / "final" / "model.safetensors"


def _weight_delta(runs: Runs, a_file: Path, b_file: Path) -> float:
    """max |w_a - w_b| over all tensors; also checks that training moved the weights far more."""
    from safetensors.torch import load_file

    from dolly.config import load_config
    from dolly.models.base import load_base_model
    from dolly.tokenizer import load_tokenizer

    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # both trained: far from the (deterministic) initial weights, compared to their difference
    initial = load_base_model(load_config(None, TRAIN),
                              load_tokenizer(str(runs.prepared / "tokenizer")))
    key = "transformer.h.0.mlp.fc_in.weight"
    moved = (a[key].float() - initial.state_dict()[key].float()).abs().max().item()
    print(f"\nmax |w_a - w_b| over {len(a)} tensors: {diff:.3g} "
          f"(training moved {key} by up to {moved:.3g})")
    assert moved > 1e-3, moved
    return diff


def test_two_nodes_of_one_rank_train_the_same_weights_as_one_node_of_two(runs, six_steps,
                                                                           tmp_path):
    """ZeRO-3 over 2 "machines" (two train steps, node_rank 0 and 1, on loopback, each with its
    own output folder) ends with the weights 1 node x 2 ranks gets from the same data and seed."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        # each "machine" its own tracking store: two processes writing one sqlite file is not
        # what two machines do (they share a tracking server), and can time out on a busy host
        (store := tmp_path / f"store{rank}").mkdir()
        env = project_env(fresh_store(store))
        log = (tmp_path / f"node{rank}.log").open("w")
        # rank_timeout_s bounds the rendezvous too: on a loaded 2-core host one node's process
        # may start a minute after the other's
        nodes.append((subprocess.Popen(
            _train_cmd(runs.prepared, tmp_path / f"node{rank}", **SIX, num_nodes=2,
                       cpu_ranks=1, node_rank=rank, master_addr="127.0.0.1", master_port=port,
                       rank_timeout_s=300),
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in nodes:
        codes.append(proc.wait(timeout=800))
        log.close()
    logs = [Path(log.name).read_text()[-3000:] for _, log in nodes]
    assert codes == [0, 0], "\n".join(f"--- node{r} (exit {c}):\n{text}"
                                       for r, (c, text) in enumerate(zip(codes, logs)))
    assert "node 0 logs the model" in (tmp_path / "node1.log").read_text()
    assert not (tmp_path / "node1" / "final").exists()  # global rank 0 (node 0) saves
    assert _weight_delta(runs, six_steps, tmp_path / "node0" / "final" / "model.safetensors") < 1e-5
    result = json.loads((tmp_path / "node0" / "train_result.json").read_text())
    assert result["global_step"] == 6


# --- launcher=spark: the same ranks as a Spark barrier job on local[2] --------------------------

SPARK = dict(launcher="spark", spark_master="local[2]")


def test_spark_launcher_trains_the_same_weights_as_the_deepspeed_launcher(runs, six_steps,
                                                                          tmp_path):
    out = tmp_path / "out"
    proc = mlflow_run("train", {"prepared": runs.prepared_uri, "output_dir": out, **TRAIN, **SIX,
                                **SPARK}, runs.tracking_uri, MLFLOW_EXPERIMENT_NAME="train-e2e")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client, run = runs.run(proc)
    p = run.data.params
    assert (p["launcher"], p["world_size"], p["zero_stage"]) == ("spark", "2", "3")
    ranks = [json.loads((out / f"zero3_rank{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["full_numel"]
    for rec in ranks:  # each rank (its own Spark task and process) held half the elements
        assert rec["world_size"] == 2 and rec["partitioned_tensors"] == rec["tensors"]
        assert full / 2 <= rec["local_numel"] <= full / 2 + rec["tensors"]
    assert len({r["pid"] for r in ranks}) == 2
    models = client.search_logged_models([run.info.experiment_id],
                                         f"source_run_id = '{run.info.run_id}'")
    assert [m.model_id for m in models] == [run.data.tags["model_uri"].split("/")[-1]]
    assert json.loads((out / "train_result.json").read_text())["global_step"] == 6
    assert _weight_delta(runs, six_steps, out / "final" / "model.safetensors") < 1e-5


@pytest.mark.parametrize("sig, error", [
    (signal.SIGINT, "rank 1 failed: KeyboardInterrupt"),  # rank 1 dies
    (signal.SIGSTOP, "rank 0 failed: RuntimeError")])  # rank 1 hangs: rank 0 times out
def test_spark_launcher_a_failing_or_hanging_rank_ends_the_step_and_leaves_no_process(
        runs, tmp_path, sig, error):
    import psutil

    out, timeout_s = tmp_path / "out", 20
    cmd = _train_cmd(runs.prepared, out, max_steps=200, eval_steps=0, save_steps=0,
                     rank_timeout_s=timeout_s, **SPARK)
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=project_env(fresh_store(tmp_path)))
        recs = [out / f"zero3_rank{r}.json" for r in (0, 1)]
        deadline = time.time() + 400
        while not all(r.exists() for r in recs) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert all(r.exists() for r in recs) and proc.poll() is None, log.read_text()[-3000:]
        chain = []  # each rank, its torchrun agent and the guard around that (one Spark task)
        for rec in recs:
            rank = psutil.Process(json.loads(rec.read_text())["pid"])
            chain += [rank, rank.parent(), rank.parent().parent()]
        assert "torch.distributed.run" in " ".join(chain[1].cmdline())
        assert "torchrun_guard.py" in " ".join(chain[2].cmdline())
        chain[3].send_signal(sig)
        t0 = time.time()
        code = proc.wait(timeout=timeout_s + 120)
    elapsed = time.time() - t0
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert elapsed < timeout_s + 30, elapsed
    assert error in text
    # the step's last line carries a failing rank's error (which task Spark reports first is a
    # race), never the torchrun command
    last = text.strip().splitlines()[-1]  # after Spark's progress bar on the same line
    last = last[last.find("error: "):]
    assert last.startswith("error: training failed: the Spark job ended (") and \
        "rank" in last and "failed: " in last and "torchrun" not in last, last
    _, alive = psutil.wait_procs(chain, timeout=10)  # a stopped rank too
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    print(f"\nrank 1 got {sig.name}: the step failed {elapsed:.1f} s later, no rank process left")


def test_resume_on_another_world_size_continues_to_the_same_total_steps(runs, tmp_path):
    """Run A's output_dir (checkpoint-4 of 2 ranks) rerun with one rank and resume=auto: the
    checkpoint is converted (a copy) to DeepSpeed's universal format and training continues."""
    import hashlib

    import mlflow

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(runs.out / "checkpoint-4", out / "checkpoint-4")
    shutil.copy(runs.out / "fingerprint.json", out / "fingerprint.json")

    def files():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (out / "checkpoint-4").rglob("*") if p.is_file()}

    before = files()
    uri = fresh_store(tmp_path)
    proc = subprocess.run(_train_cmd(runs.prepared, out, max_steps=STEPS_B, cpu_ranks=1,
                                     eval_steps=0), cwd=ROOT, env=project_env(uri),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("checkpoint-4 was written by 2 rank(s), this run has 1: resuming a copy converted "
            "to DeepSpeed's universal checkpoint format") in proc.stdout
    assert files() == before  # the original is untouched
    assert (out / "universal" / "checkpoint-4-from-2-ranks" / "latest_universal").is_file()
    result = json.loads((out / "train_result.json").read_text())
    assert (result["resumed_from_step"], result["global_step"], result["world_size"]) == (
        STEPS_A, STEPS_B, 1)

    client = mlflow.MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    resumed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    c2, run_b = runs.run(runs.b)
    two = {m.step: m.value for m in c2.get_metric_history(run_b.info.run_id, "loss")}
    _, run_a = runs.run(runs.a)
    start = min(m.value for m in c2.get_metric_history(run_a.info.run_id, "loss") if m.step == 1)
    print(f"\nloss after the resume, 1 rank: {resumed}; 2 ranks: {two}; step 1: {start:.3f}")
    assert sorted(resumed) == list(range(STEPS_A + 1, STEPS_B + 1))
    for step, loss in resumed.items():
        # continues from the trained weights (not from the start), close to the 2-rank run
        # whose batches of 16 it now takes as batches of 8
        assert loss < start - 0.5 and abs(loss - two[step]) < 0.35, (step, loss, two[step])


# --- issue 23, case 9: a rerun whose schedule differs from its checkpoint's run ---------------

def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refusal(proc: subprocess.CompletedProcess, uri: str) -> str:
    """The one error line of a train step that stopped before launching (and trained nothing:
    its MLflow run logged no loss)."""
    import mlflow

    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" not in proc.stdout + proc.stderr  # no rank started
    run = runs_in(uri, "train")[0]
    assert run.info.status == "FAILED"
    assert not mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    return errors[0]


def test_a_rerun_asking_fewer_steps_than_its_checkpoint_is_refused_before_launch(
        runs, six_steps, tmp_path):
    """Trained max_steps=6 with save_steps=3, rerun into the same output_dir with max_steps=3.
    Before: it resumed at step 6, trained a 7th step and logged that 7-step model as the
    max_steps=3 result, and save_total_limit (2) then deleted checkpoint-3."""
    out = tmp_path / "out"
    shutil.copytree(six_steps.parent.parent, out)  # the 6-step run's output_dir
    before = _tree(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    uri = fresh_store(tmp_path)
    proc = mlflow_run("train", {"prepared": runs.prepared, "output_dir": out, **TRAIN, **SIX,
                                "save_steps": 3, "max_steps": 3}, uri)
    assert _refusal(proc, uri) == (
        f"error: resume=auto: output_dir '{out}' holds checkpoint-6 (step 6 of 6, constant "
        "schedule) and this run's schedule has 3 steps: resuming would train past step 3; "
        "nothing was deleted. Pass -P resume=never to delete checkpoint-3, checkpoint-6 and "
        "start fresh (or -P output_dir=<another folder>)")
    # both checkpoints, the fingerprint, the 6-step run's final weights and result: untouched
    assert _tree(out) == before


def test_a_rerun_stretching_a_cosine_schedule_to_more_steps_is_refused_before_launch(
        runs, tmp_path):
    """3 steps of a cosine schedule, rerun with max_steps=6. Before: step 4 trained at learning
    rate 0 (the 3-step schedule's end, restored with the optimizer) and steps 5-6 at the 6-step
    schedule's 0.00075 and 0.000201, where a 6-step run trains step 4 at 0.0015 (measured)."""
    import mlflow

    out = tmp_path / "out"
    uri = fresh_store(tmp_path)
    params = {"prepared": runs.prepared, "output_dir": out, **TRAIN, "lr_scheduler": "cosine",
              "eval_steps": 0, "save_steps": 3}
    three = mlflow_run("train", {**params, "max_steps": 3}, uri)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-5000:]
    run = runs_in(uri, "train")[0]
    rates = sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(
        run.info.run_id, "learning_rate"))
    assert rates == [(1, 0.003), (2, pytest.approx(0.00225)), (3, pytest.approx(0.00075))]
    before = _tree(out)
    six = mlflow_run("train", {**params, "max_steps": 6}, uri)
    assert _refusal(six, uri) == (
        f"error: resume=auto: output_dir '{out}' holds checkpoint-3 (step 3 of 3, cosine "
        "schedule) and this run's schedule has 6 steps: resuming would train the rest on a mix "
        "of both schedules; nothing was deleted. Pass -P resume=never to delete checkpoint-3 "
        "and start fresh (or -P output_dir=<another folder>)")
    assert _tree(out) == before


# --- the parent's decisions, without launching ---------------------------------------------------

@pytest.fixture
def fake_prepared(tmp_path) -> Path:
    import pandas as pd

    d = tmp_path / "prepared"
    d.mkdir()
    for split in ("train", "test"):
        pd.DataFrame({"input_ids": [[1, 2, 3]], "response_start": [2], "length": [3]}).to_parquet(
            d / f"{split}.parquet")
    (d / "summary.json").write_text(json.dumps({"data_hash": "h1"}))
    return d


def _checkpoint(out: Path, step: int, complete: bool = True, max_steps: int = 10) -> Path:
    """A checkpoint folder as the parent sees it; max_steps: its schedule's length (10: 10 epochs
    of one step on fake_prepared's one record)."""
    c = out / f"checkpoint-{step}"
    c.mkdir(parents=True)
    if complete:
        (c / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                          "max_steps": max_steps}))
    return c


@pytest.mark.timeout(60)
def test_plan_resumes_only_a_matching_complete_checkpoint(fake_prepared, tmp_path, monkeypatch):
    from dolly.config import load_config
    from dolly.errors import ConfigError

    monkeypatch.chdir(ROOT)  # epochs=10: ten steps of fake_prepared's one record, as _checkpoint
    out = tmp_path / "out"
    cfg = load_config(None, {"output_dir": out, "num_gpus": 0, "epochs": 10})
    first = launch.prepare_launch(cfg, fake_prepared)
    assert first.resumed_from is None and first.cfg.resume == "never"
    with socket.socket() as busy:  # a port another run holds: one node picks a free one
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        moved = launch.prepare_launch(load_config(None, {"output_dir": tmp_path / "p",
                                                         "num_gpus": 0, "master_port": port}),
                                      fake_prepared)
    assert moved.cfg.master_port != port and any("in use" in n for n in moved.notes)
    assert (first.world_size, first.cfg.precision) == (2, "fp32")
    _checkpoint(out, 4)
    _checkpoint(out, 8, complete=False)  # killed while saving
    (out / "train_result.json").write_text("{}")

    again = launch.prepare_launch(cfg, fake_prepared)  # same data and settings: continue
    assert again.resumed_from == str(out / "checkpoint-4") == again.cfg.resume
    assert not (out / "train_result.json").exists()  # a stale result is never reported

    # other settings: stop before anything changes, naming the change and the two ways on
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    fingerprint = (out / "fingerprint.json").read_text()
    with pytest.raises(ConfigError) as refused:
        launch.prepare_launch(load_config(None, {"output_dir": out, "num_gpus": 0, "epochs": 10,
                                                 "learning_rate": 5e-4}), fake_prepared)
    assert str(refused.value) == (
        f"resume=auto: output_dir '{out}' holds checkpoints of other data or settings "
        "(checkpoint-4, checkpoint-8; learning_rate: 0.001 -> 0.0005); nothing was deleted. "
        "Set those back to continue them, or pass -P resume=never to delete them and start "
        "fresh (or -P output_dir=<another folder>)")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "fingerprint.json").read_text() == fingerprint

    # only an explicit resume=never removes them
    never = launch.prepare_launch(load_config(None, {"output_dir": out, "num_gpus": 0, "epochs": 10,
                                                     "learning_rate": 5e-4, "resume": "never"}),
                                  fake_prepared)
    assert never.resumed_from is None
    # (another run on this machine may hold master_port: that note is not this test's)
    assert [n for n in never.notes if not n.startswith("master_port")] == [
        f"resume=never: removing checkpoint-4, checkpoint-8 from {out}"]
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.timeout(60)
def test_plan_refuses_a_schedule_of_another_length_before_changing_anything(
        fake_prepared, tmp_path, monkeypatch):
    from dolly.config import load_config
    from dolly.errors import ConfigError

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"

    def plan(**settings):
        return launch.prepare_launch(load_config(None, {"output_dir": out, "num_gpus": 0,
                                                        "epochs": 10, **settings}), fake_prepared)

    plan()  # the fingerprint of these settings
    _checkpoint(out, 4)  # step 4 of the 10 steps that 10 epochs make here
    (out / "train_result.json").write_text("{}")
    before = _tree(out)
    for settings, error in (
            ({"epochs": 5}, "resume=auto: output_dir '{}' holds checkpoint-4 (step 4 of 10, "
             "cosine schedule) and this run's schedule has 5 steps: resuming would train the "
             "rest on a mix of both schedules; nothing was deleted. Set -P max_steps=10 to "
             "finish its run, or pass -P resume=never to delete checkpoint-4 and start fresh "
             "(or -P output_dir=<another folder>)"),
            ({"max_steps": 3}, "resume=auto: output_dir '{}' holds checkpoint-4 (step 4 of 10, "
             "cosine schedule) and this run's schedule has 3 steps: resuming would train past "
             "step 3; nothing was deleted. Set -P max_steps=10 to finish its run, or pass -P "
             "resume=never to delete checkpoint-4 and start fresh (or -P output_dir=<another "
             "folder>)")):
        with pytest.raises(ConfigError) as refused:
            plan(**settings)
        assert str(refused.value) == error.format(out)
        assert _tree(out) == before  # no checkpoint, result or fingerprint touched
    # the way on it names: max_steps=10 is the same schedule as 10 epochs of one step
    assert plan(max_steps=10).resumed_from == str(out / "checkpoint-4")
    # a constant schedule's rates do not depend on the length: extended
    constant = tmp_path / "constant"
    launch.prepare_launch(load_config(None, {"output_dir": constant, "num_gpus": 0,
                                             "lr_scheduler": "constant"}), fake_prepared)
    _checkpoint(constant, 4)
    assert launch.prepare_launch(load_config(None, {
        "output_dir": constant, "num_gpus": 0, "lr_scheduler": "constant", "epochs": 20}),
        fake_prepared).resumed_from == str(constant / "checkpoint-4")


@pytest.mark.timeout(60)
def test_launch_commands_single_and_multi_node(fake_prepared, tmp_path, monkeypatch):
    import base64

    from dolly.config import load_config

    monkeypatch.chdir(ROOT)
    one = launch.prepare_launch(load_config(None, {"output_dir": tmp_path / "a", "num_gpus": 0}),
                                fake_prepared)
    cmd = launch.launch_command(one, fake_prepared, "runs:/x/prepared")
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    info = json.loads(base64.urlsafe_b64decode(cmd[4].split("=", 1)[1]))
    assert info == {"localhost": [0, 1]} and "--node_rank=0" in cmd and "--no_local_rank" in cmd
    assert cmd[cmd.index("--module") + 1] == "dolly.train.rank"
    assert cmd[cmd.index("--device") + 1] == "cpu"  # the parent's decision, passed on
    sent = json.loads(base64.urlsafe_b64decode(cmd[cmd.index("--config_b64") + 1]))
    assert sent["precision"] == "fp32" and sent["resume"] == "never"
    assert handoff.decode_config(cmd[cmd.index("--config_b64") + 1]) == one.cfg

    # nodes started one by one: the same world on every node, this node's rank
    two = launch.prepare_launch(load_config(None, {"output_dir": tmp_path / "b", "num_gpus": 0,
                                                   "num_nodes": 2, "node_rank": 1,
                                                   "master_addr": "10.0.0.1"}), fake_prepared)
    assert two.world_size == 4
    cmd = launch.launch_command(two, fake_prepared, "runs:/x/prepared")
    info = json.loads(base64.urlsafe_b64decode(cmd[4].split("=", 1)[1]))
    assert info == {"node0": [0, 1], "node1": [0, 1]}
    assert "--node_rank=1" in cmd and "--master_addr=10.0.0.1" in cmd

    # a hostfile: DeepSpeed's runner reaches every node from this one
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    p = launch.Plan(load_config(None, {"hostfile": hostfile, "num_nodes": 2}), True, 8, 16,
                      None, [])
    cmd = launch.launch_command(p, fake_prepared, "runs:/x/prepared")
    assert cmd[3] == "deepspeed.launcher.runner"
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--num_nodes") + 1] == "2" and "--master_addr" not in cmd
    assert launch._hostfile_world_size(load_config(None, {"hostfile": hostfile,
                                                            "num_nodes": 2, "num_gpus": 4})) == 8


@pytest.mark.timeout(60)
def test_spark_plans_executor_ranks_and_refuses_node_settings(fake_prepared, tmp_path,
                                                              monkeypatch):
    from dolly.config import load_config
    from dolly.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "deepspeed" / "zero3.json", tmp_path / "configs" / "deepspeed")
    cpu = launch.prepare_launch(load_config(ROOT / "configs" / "tiny.yaml", {
        "output_dir": "rel/out", "num_gpus": 0, "num_nodes": 2, "launcher": "spark"}),
        fake_prepared)
    assert (cpu.gpu, cpu.procs_per_node, cpu.world_size) == (False, 2, 4)
    assert cpu.cfg.output_dir == str(tmp_path / "rel" / "out")  # executors have another cwd
    # GPU executors: the driver needs none of its own
    gpus = launch._spark_world(load_config(ROOT / "configs" / "tiny.yaml", {
        "num_gpus": 8, "num_nodes": 2, "launcher": "spark"}), [])
    assert gpus == (True, 8, 16)
    for key, value in (("hostfile", "hosts"), ("node_rank", 1)):
        with pytest.raises(ConfigError, match=f"config key '{key}': launcher=spark"):
            launch.prepare_launch(load_config(ROOT / "configs" / "tiny.yaml", {
                "output_dir": tmp_path / key, "launcher": "spark", "num_nodes": 2, key: value}),
                fake_prepared)


def test_the_fingerprint_holds_every_field_that_shapes_the_model():
    from dolly.config import load_config

    tiny = ROOT / "configs" / "tiny.yaml"
    a = launch.fingerprint(load_config(tiny, {}), "h", 2, "fp32")
    b = launch.fingerprint(load_config(tiny, {"tiny_tie_embeddings": False}), "h", 2, "fp32")
    assert a != b and (a["tiny_tie_embeddings"], b["tiny_tie_embeddings"]) == (True, False)
