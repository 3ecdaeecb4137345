"""evaluate and register through `mlflow run`, the promotion gate, and the champion's pyfunc."""
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from helpers import (TEMPLATE_BITS, TINY_OVERRIDES, TINY_PRETRAIN, free_port, mlflow_run,
                      mlflow_run_cmd, project_copy, project_env, runs_in, tracking_to)
from dolly.errors import DollyError


@pytest.mark.timeout(420)
def test_evaluate_entry_point(tiny_model):
    proc = tiny_model.mlflow_run("evaluate", {
        "model_uri": tiny_model.model_uri, "prepared": tiny_model.prepared,
        "eval_limit": 8, "eval_max_new_tokens": 8, "eval_batch_size": 4})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs_in(tiny_model.tracking_uri, "evaluate")[0]
    m, tags = run.data.metrics, run.data.tags
    for who in ("base", "tuned"):
        for k in ("response_perplexity", "eval_loss", "exact_match", "rouge_l", "stop_rate",
                  "empty_rate", "response_length", "tokens_per_s"):
            assert f"{who}/{k}" in m, f"{who}/{k}"
    # The fixture's model is the untrained base: evaluate must rebuild exactly that base
    # (from the train run's settings, although this run used the default profile).
    assert m["base/eval_loss"] == pytest.approx(m["tuned/eval_loss"], rel=1e-5)
    assert m["eval_records"] == 8
    assert tags["data_hash"] == tiny_model.data_hash
    assert tags["model_uri"] == tiny_model.model_uri
    assert tags["train_run_id"] == tiny_model.train_run
    table = tiny_model.client().download_artifacts(run.info.run_id, "eval_examples.json",
                                                   str(tiny_model.root / "dl"))
    doc = json.load(open(table))
    df = pd.DataFrame(doc["data"], columns=doc["columns"])
    assert len(df) == 8
    assert {"instruction", "reference", "base_response", "tuned_response",
            "tuned_exact_match", "tuned_rouge_l"} <= set(df.columns)
    # per task family: base and tuned exact match (and rouge_l), the means of the table's rows
    families = sorted(set(df["category"]))
    assert len(families) >= 3, families  # the built-in families rotate: 8 records hold several
    for who in ("base", "tuned"):
        for family in families:
            rows = df[df["category"] == family]
            assert m[f"{who}/exact_match/{family}"] == pytest.approx(
                rows[f"{who}_exact_match"].mean())
            assert m[f"{who}/rouge_l/{family}"] == pytest.approx(rows[f"{who}_rouge_l"].mean())
    assert {k.split("/")[-1] for k in m
            if k.count("/") == 2 and "/exact_match_unseen/" not in k} == set(families)
    # the unseen-word probe, limited by eval_limit too: its own table and per-family metrics
    assert m["probe_records"] == 8
    probe = tiny_model.client().download_artifacts(run.info.run_id, "probe_examples.json",
                                                   str(tiny_model.root / "dl"))
    doc = json.load(open(probe))
    pdf = pd.DataFrame(doc["data"], columns=doc["columns"])
    assert len(pdf) == 8 and set(pdf["category"]) == {
        "repeat", "greet", "first", "count_word", "count_digit", "more_than"}
    for who in ("base", "tuned"):
        assert m[f"{who}/exact_match_unseen"] == pytest.approx(pdf[f"{who}_exact_match"].mean())
        for family, rows in pdf.groupby("category"):
            assert m[f"{who}/exact_match_unseen/{family}"] == pytest.approx(
                rows[f"{who}_exact_match"].mean())
    # the run's description: every figure in its first line, then each family's records
    note = tags["mlflow.note.content"]
    assert note.startswith("**Exact match, base → tuned**, 8 held-out records: **all ")
    for family in families:
        n = int((df["category"] == family).sum())
        assert f"** (the first {min(n, 3)} of {n} records)" in note
    assert note.count("| instruction | input | reference | base answer | tuned answer |") == \
        len(families) + 1  # and the unseen-word probe's
    assert note.splitlines()[2].startswith("**Unseen words, base → tuned**, 8 probe records ")
    shown = tiny_model.client().download_artifacts(run.info.run_id, "comparison.md",
                                                   str(tiny_model.root / "dl"))
    assert Path(shown).read_text() == note


@pytest.mark.timeout(420)
def test_register_entry_point_and_gate(tiny_model, other_model):
    name = "dolly_gate"
    good = tiny_model.fake_eval_run(tuned=0.8, base=0.0)
    proc = tiny_model.mlflow_run("register", {"model_uri": tiny_model.model_uri,
                                              "eval_run": good, "model_name": name})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = tiny_model.client()
    first = str(client.get_model_version_by_alias(name, "champion").version)
    mv = client.get_model_version(name, first)
    assert mv.run_id == tiny_model.train_run  # registered where the train run logged it
    assert mv.source == tiny_model.model_uri  # no second copy
    assert mv.tags["promoted"] == "true" and mv.tags["tuned/exact_match"] == "0.8"
    assert mv.tags["data_hash"] == tiny_model.data_hash
    assert mv.tags["train_run_id"] == tiny_model.train_run and mv.tags["eval_run_id"] == good
    assert mv.description.startswith("# Model card: dolly_gate, version 1 (fine-tuned from tiny-gptj)")
    lic = client.get_registered_model(name).tags["license"]
    assert "project-generated" in lic
    reg_run = runs_in(tiny_model.tracking_uri, "register")[0]
    assert reg_run.data.tags["registered_version"] == first
    assert reg_run.data.tags["promoted"] == "true"

    # A worse model (beats its base, but below the champion) is registered, not promoted.
    worse = tiny_model.fake_eval_run(tuned=0.5, base=0.0, model_uri=other_model)
    proc = tiny_model.mlflow_run("register", {"model_uri": other_model,
                                              "eval_run": worse, "model_name": name})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    latest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert str(latest.version) != first
    assert latest.tags["promoted"] == "false"
    assert "worse than champion" in latest.tags["gate_reason"]

    # An evaluation of another model can not be used to register this one (in process: fast).
    from steps import register

    other = tiny_model.fake_eval_run(tuned=0.9, base=0.0, model_uri="models:/m-someone-else")
    with tracking_to(tiny_model.tracking_uri), pytest.raises(DollyError, match="m-someone-else"):
        register.main(["--model_uri", tiny_model.model_uri, "--eval_run", other,
                       "--model_name", name])
    assert len(client.search_model_versions(f"name='{name}'")) == 2


@pytest.mark.timeout(300)
def test_not_better_than_base_is_not_promoted(tiny_model):
    from dolly import registry
    from dolly.config import load_config

    cfg = load_config(None, {**TINY_OVERRIDES, "model_name": "dolly_flat"})
    flat = tiny_model.fake_eval_run(tuned=0.0, base=0.0)
    with tracking_to(tiny_model.tracking_uri):
        result = registry.register(tiny_model.model_uri, cfg,
                                   eval_metrics={"tuned/exact_match": 0.0, "base/exact_match": 0.0},
                                   eval_run=flat, data_hash=tiny_model.data_hash,
                                   train_run=tiny_model.train_run, base_model="tiny-gptj",
                                   dataset="tatsu-lab/alpaca")
    assert not result.promoted and "does not beat base" in result.reason
    client = tiny_model.client()
    assert client.get_registered_model("dolly_flat").aliases == {}
    assert client.get_registered_model("dolly_flat").tags["license"] == "CC BY-NC 4.0"


@pytest.mark.timeout(300)
def test_champion_pyfunc_returns_only_responses(tiny_model, champion):
    with tracking_to(tiny_model.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    instructions = ["Repeat the word bada.", "Greet Kalo.", "Count the words in the input."]
    out = model.predict(instructions, params={"max_new_tokens": 6})
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(o, str) for o in out)
    assert not any(bit in o for o in out for bit in TEMPLATE_BITS)
    df_out = model.predict(pd.DataFrame({"instruction": instructions[:2], "id": [1, 2]}),
                           params={"max_new_tokens": 4, "do_sample": False})
    assert len(df_out) == 2 and all(isinstance(o, str) for o in df_out)


# --- the whole pipeline: `mlflow run .` ------------------------------------------------------

MAIN_PARAMS = {"builtin_records": 200, "test_size": 0.1, "max_steps": 10, "eval_limit": 16,
               "eval_max_new_tokens": 8, "eval_batch_size": 16, **TINY_PRETRAIN}


@pytest.mark.timeout(1200)
def test_main_runs_four_child_steps_then_reuses_them(tracking_uri, tmp_path):
    # The project runs from a private committed copy of this working tree: its code version
    # stays the same for the whole test even if someone edits the working tree meanwhile, so
    # the reuse checks below always hold and every later check always runs.
    project = project_copy(tmp_path / "project")
    # a free rendezvous port: another training may hold 29500
    params = {**MAIN_PARAMS, "output_dir": tmp_path / "train", "master_port": free_port()}
    proc = mlflow_run("main", params, tracking_uri, timeout=1100, project=project,
                      HF_TOKEN=FAKE_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_TOKEN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    runs = runs_in(tracking_uri)
    # `mlflow run` put its run in Default; the pipeline ran in the `dolly` experiment
    launcher = next(r for r in runs if r.info.experiment_id == "0")
    parent = client.get_run(launcher.data.tags["dolly.pipeline_run"])
    assert client.get_experiment(parent.info.experiment_id).name == "dolly"
    assert parent.data.tags["dolly.launched_by"] == launcher.info.run_id
    assert parent.info.run_name == "main tiny-gptj"
    assert parent.info.run_id in launcher.data.tags["mlflow.note.content"]
    children = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"data_prep", "train", "evaluate", "register"}
    assert {r.info.run_name for r in children.values()} == {
        "data_prep tiny-gptj", "train tiny-gptj", "evaluate tiny-gptj", "register tiny-gptj"}
    assert {r.info.experiment_id for r in children.values()} == {parent.info.experiment_id}
    # lineage: the parent's description is the summary with a link to every child; each split
    # is a dataset input with its own digest (evaluate's: the eval_limit records it evaluated)
    note = parent.data.tags["mlflow.note.content"]
    assert "main: summary" in note and "(base -> tuned)" in note
    assert "  tuned exact match by family: " in note and "  base exact match by family: " in note
    assert children["evaluate"].data.tags["mlflow.note.content"].startswith(
        "**Exact match, base → tuned**, 16 held-out records: ")
    for r in children.values():
        assert f"runs/{r.info.run_id})" in note
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
              for r in (children["data_prep"], children["evaluate"]) for i in r.inputs.dataset_inputs}
    assert len({inputs["train"].digest, inputs["test"].digest, inputs["evaluation"].digest}) == 3
    assert children["evaluate"].data.tags["eval_set"].startswith(inputs["evaluation"].digest)
    # the logged model carries its evaluation metrics (MLflow 3 shows them on its page)
    logged = client.get_logged_model(
        children["train"].data.tags["model_uri"].removeprefix("models:/"))
    assert {m.key for m in logged.metrics} >= {"tuned/exact_match", "tuned/rouge_l",
                                              "tuned/response_perplexity"}
    trained_on = [i.dataset for i in children["train"].inputs.dataset_inputs]
    assert [d.digest for d in trained_on] == [inputs["train"].digest]
    assert all(r.info.status == "FINISHED" for r in children.values())
    # only URIs pass between steps
    prepared = f"runs:/{children['data_prep'].info.run_id}/prepared"
    model_uri = children["train"].data.tags["model_uri"]
    assert children["train"].data.params["prepared"] == prepared
    assert children["evaluate"].data.params["model_uri"] == model_uri
    assert children["register"].data.params["eval_run"] == children["evaluate"].info.run_id
    # every step got main's overrides
    assert all(r.data.params["max_steps"] == "10" for r in children.values())
    # the summary
    t, m = parent.data.tags, parent.data.metrics
    assert t["registered_model"] == "dolly" and t["registered_version"] == "1"
    # the summary's verdict is the register step's (the old `in ("true", "false")` check was
    # true of any summary: main writes one of the two whatever the step said)
    reg = children["register"].data.tags
    assert reg["promoted"] in ("true", "false") and reg["gate_reason"]
    assert (t["promoted"], t["gate_reason"]) == (reg["promoted"], reg["gate_reason"])
    assert m["promoted"] == (1.0 if reg["promoted"] == "true" else 0.0)
    assert client.get_model_version("dolly", "1").tags["promoted"] == reg["promoted"]
    assert {"base/exact_match", "tuned/exact_match", "tuned/response_perplexity", "registered_version",
            "promoted"} <= set(m)
    per_family = {k for k in children["evaluate"].data.metrics if "/exact_match/" in k}
    assert per_family and {k: m[k] for k in per_family} == {
        k: children["evaluate"].data.metrics[k] for k in per_family}
    assert m["tuned/response_perplexity"] < m["base/response_perplexity"]  # 10 steps already lower the loss
    assert client.get_model_version("dolly", "1").run_id == children["train"].info.run_id
    assert "main: summary" in proc.stdout

    # The same inputs again: every step is reused, nothing is recomputed or registered twice.
    again = mlflow_run("main", params, tracking_uri, timeout=900, project=project)
    assert again.returncode == 0, again.stderr[-3000:]
    parents = client.search_runs([parent.info.experiment_id],
                                 "tags.`mlflow.project.entryPoint` = 'main'",
                                 order_by=["attributes.start_time DESC"])
    code = parent.data.tags["dolly.code_version"]
    assert code == parents[0].data.tags["dolly.code_version"] != "unknown"
    assert "+" not in code  # the copy is committed: a clean commit, no local changes
    for step in ("data_prep", "train", "evaluate", "register"):
        assert f"main: {step}: reusing finished run {children[step].info.run_id}" in again.stdout
    assert parents[0].data.tags["steps_reused"] == "data_prep,train,evaluate,register"
    for r in children.values():  # the rerun's parent links the runs it reused
        assert f"runs/{r.info.run_id}) (reused)" in parents[0].data.tags["mlflow.note.content"]
    assert len(client.search_model_versions("name='dolly'")) == 1

    # A token in the environment is never logged: not in the store (params, tags, model
    # versions, descriptions) nor in any artifact (configs, tables, the model's files).
    db = Path(tracking_uri[len("sqlite:///"):])
    assert FAKE_TOKEN.encode() not in db.read_bytes()
    artifacts = Path(client.get_experiment(parent.info.experiment_id).artifact_location
                     .removeprefix("file://"))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name == "MLmodel" for p in files)
    assert not [p for p in files if FAKE_TOKEN.encode() in p.read_bytes()]

    # evaluate dies (killed, as by the OOM killer) in a run with a new eval_limit: main fails
    # with one line naming the step, nothing is registered, the champion stays.
    failing = {**params, "eval_limit": 12}
    # 10 steps rarely beat the base, so v1 may not hold the alias: make it the champion to guard
    client.set_registered_model_alias("dolly", "champion", "1")
    broken = _main_with_evaluate_killed(failing, tracking_uri, project)
    assert broken.returncode != 0
    assert "main: train: reusing finished run" in broken.stdout  # eval_limit does not retrain
    errors = [ln for ln in broken.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and "step 'evaluate' failed" in errors[-1], broken.stderr[-2000:]
    assert len(client.search_model_versions("name='dolly'")) == 1
    assert str(client.get_model_version_by_alias("dolly", "champion").version) == "1"
    # the cause gone, the same command reuses what had finished and completes
    fixed = mlflow_run("main", failing, tracking_uri, timeout=900, project=project)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    for step in ("data_prep", "train"):
        assert f"main: {step}: reusing finished run {children[step].info.run_id}" in fixed.stdout
    assert "main: evaluate: starting" in fixed.stdout
    # Issue 12's case: the same weights, evaluated on fewer records, are not a new version and
    # do not move the alias; the register run says which version they already are.
    assert len(client.search_model_versions("name='dolly'")) == 1
    assert str(client.get_model_version_by_alias("dolly", "champion").version) == "1"
    last = client.search_runs([parent.info.experiment_id],
                              "tags.`mlflow.project.entryPoint` = 'register'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.data.tags["registered_version"] == "1" and last.data.tags["promoted"] == "false"
    assert last.data.tags["gate_reason"] == ("identical weights are already v1: not registered "
                                             "again, @champion left alone")
    assert "register: dolly v1 already holds these weights" in fixed.stdout


FAKE_TOKEN = "hf_FakeTokenForTheSecretScan0123456789"


def _main_with_evaluate_killed(params, tracking_uri, project: Path):
    """`mlflow run <project> -e main`, with the evaluate step's process SIGKILLed once it runs."""
    import signal
    import subprocess
    import tempfile
    import time

    cmd = mlflow_run_cmd("main", params, project)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # files, not pipes: a full pipe would stall main while this loop polls
        proc = subprocess.Popen(cmd, cwd=project, env=project_env(tracking_uri), text=True,
                                stdout=out, stderr=err)
        deadline = time.monotonic() + 600
        victim = None
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            victim = _find_evaluate(proc.pid)
            time.sleep(0.2)
        assert victim, "the evaluate step never started"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=300)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _find_evaluate(root_pid: int) -> int | None:
    """The pid of a `python -m steps.evaluate` process under root_pid, if one runs."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "steps.evaluate" in child.cmdline():
                return child.pid
        except psutil.Error:  # ended meanwhile
            continue
    return None


@pytest.mark.timeout(300)
def test_failing_step_fails_main_with_one_line(tracking_uri, tmp_path):
    proc = mlflow_run("main", {"dataset": tmp_path / "missing.jsonl"}, tracking_uri, timeout=280)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors and "step 'data_prep' failed" in errors[-1]
    client = mlflow.MlflowClient(tracking_uri)
    runs = runs_in(tracking_uri)
    parent = next(r for r in runs if "dolly.launched_by" in r.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["failed_step"] == "data_prep"
    launcher = client.get_run(parent.data.tags["dolly.launched_by"])
    assert launcher.info.status == "FAILED" and launcher.info.experiment_id == "0"
    assert {r.data.tags.get("mlflow.project.entryPoint") for r in runs} == {"main", "data_prep"}
