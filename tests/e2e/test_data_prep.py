"""data_prep through `mlflow run`, as a user runs it, against a real sqlite tracking store."""
import json

import mlflow
import pandas as pd
import pytest

from helpers import mlflow_run, runs_in

pytestmark = pytest.mark.timeout(300)


def only_run(tracking_uri):
    """The one step run of the store (the run `mlflow run` made in Default points to it)."""
    runs = runs_in(tracking_uri)
    step = [r for r in runs if "dolly.step_run" not in r.data.tags]
    assert len(step) == 1 and len(runs) <= 2
    assert all(r.data.tags["dolly.step_run"] == step[0].info.run_id for r in runs
               if r is not step[0])
    return mlflow.MlflowClient(tracking_uri), step[0]


def test_builtin_offline_default(tracking_uri, tmp_path):
    proc = mlflow_run("data_prep", {"builtin_records": 300}, tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = only_run(tracking_uri)
    m = run.data.metrics
    # the generator makes no bad or duplicate records: all 300 kept, 5% held out (the default
    # profile's share: 300 of its 6,000)
    assert (m["records_read"], m["records_kept"], m["records_rejected"]) == (300, 300, 0)
    assert (m["records_train"], m["records_test"]) == (285, 15)
    assert run.data.tags["mlflow.project.entryPoint"] == "data_prep"
    assert run.info.run_name == "data_prep tiny-gptj"  # named by step and model, not at random
    # in the experiment main's runs go to; the run `mlflow run` made in Default points to it
    assert client.get_experiment(run.info.experiment_id).name == "dolly"
    launched = client.get_run(run.data.tags["dolly.launched_by"])
    assert (launched.info.experiment_id, launched.info.run_name, launched.info.status) == (
        "0", "data_prep tiny-gptj", "FINISHED")
    assert launched.data.tags["dolly.step_run"] == run.info.run_id
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in \
        launched.data.tags["mlflow.note.content"]
    assert len(run.data.tags["data_hash"]) == 64
    files = {f.path for f in client.list_artifacts(run.info.run_id, "prepared")}
    assert {"prepared/train.parquet", "prepared/test.parquet", "prepared/rejected.jsonl",
            "prepared/summary.json", "prepared/lengths.png"} <= files
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/prepared",
                                                tracking_uri=tracking_uri, dst_path=str(tmp_path))
    train = pd.read_parquet(f"{local}/train.parquet")
    assert len(train) == 285 and train["text"].str.endswith("\n\n### End").all()
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["test", "train"]
    assert run.data.params["builtin_records"] == "300"
    assert "learning_rate" not in run.data.params  # params: the keys data_prep reads


def test_mixed_jsonl_accounts_for_every_line(tracking_uri, tmp_path):
    good = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("a", "b", "c")]
    lines = [json.dumps(g) for g in good] + [
        "{oops", json.dumps({"instruction": "x"}), json.dumps({"instruction": 1, "output": "y"}),
        json.dumps({"instruction": " ", "output": "y"}), json.dumps(good[0]),
        json.dumps({"instruction": "big", "output": "z " * 20000})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = mlflow_run("data_prep", {"dataset": path, "test_size": 1}, tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = only_run(tracking_uri)
    m = run.data.metrics
    assert (m["records_read"], m["records_kept"], m["records_rejected"]) == (9, 3, 6)
    rej = client.download_artifacts(run.info.run_id, "prepared/rejected.jsonl", str(tmp_path))
    got = {json.loads(l)["where"]: json.loads(l)["reason"] for l in open(rej)}
    assert got == {"line 4": "malformed_json", "line 5": "missing_response",
                   "line 6": "non_string_field", "line 7": "blank_instruction",
                   "line 8": "duplicate", "line 9": "too_long"}


@pytest.mark.parametrize("name", ["unrelated.csv", "does-not-exist.jsonl"])
def test_unusable_input_fails_with_one_line(tracking_uri, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("city,population\nParis,2100000\n")
    proc = mlflow_run("data_prep", {"dataset": path}, tracking_uri)
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(ours) == 1 and name in ours[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("mlflow.exceptions")[0]


def test_failed_run_still_logs_counts_and_rejections(tracking_uri, tmp_path):
    # Every record but one is rejected: the step fails, and the run says why.
    path = tmp_path / "few.jsonl"
    path.write_bytes(b'{"instruction": "Say very well.", "output": "Tr\xe8s bien"}\n'
                     b'{"instruction": NaN, "output": "x"}\n'
                     b'{"instruction": "Name a color.", "output": "Blue."}\n')
    proc = mlflow_run("data_prep", {"dataset": path}, tracking_uri)
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert ours == ["error: only 1 valid record(s): need at least 2 to make a train/test split "
                    "(2 rejected: see prepared/rejected.jsonl)"], proc.stderr[-2000:]
    client, run = only_run(tracking_uri)
    assert run.info.status == "FAILED"
    m = run.data.metrics
    assert (m["records_read"], m["records_kept"], m["records_rejected"],
            m["rejected_encoding"], m["rejected_missing_instruction"]) == (3, 1, 2, 1, 1)
    rej = client.download_artifacts(run.info.run_id, "prepared/rejected.jsonl", str(tmp_path))
    got = [(json.loads(l)["where"], json.loads(l)["reason"]) for l in open(rej)]
    assert got == [("line 1", "encoding"), ("line 2", "missing_instruction")]


def test_issue23_cases_through_mlflow_run(tracking_uri, tmp_path):
    # One folder holding the five data cases of issue 23: every record read is kept or rejected
    # with its file, its lines and the value it was.
    from collections import Counter

    from helpers import write_case_files

    folder = write_case_files(tmp_path / "cases")
    proc = mlflow_run("data_prep", {"dataset": folder, "test_size": 1}, tracking_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = only_run(tracking_uri)
    m = run.data.metrics
    assert (m["records_read"], m["records_kept"], m["records_rejected"]) == (17, 11, 6)
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/prepared",
                                                tracking_uri=tracking_uri, dst_path=str(tmp_path))
    kept = pd.concat([pd.read_parquet(f"{local}/train.parquet"),
                      pd.read_parquet(f"{local}/test.parquet")])
    assert Counter(kept["source"].str.rsplit("/", n=1).str[-1]) == {
        "cr.jsonl": 4, "na.parquet": 4, "invisible.jsonl": 1, "list.parquet": 1, "quote.csv": 1}
    rej = [json.loads(l) for l in open(f"{local}/rejected.jsonl")]
    assert [(r["source"].rsplit("/", 1)[-1], r["where"], r["reason"]) for r in rej] == [
        ("invisible.jsonl", "line 1", "blank_instruction"),
        ("invisible.jsonl", "line 2", "blank_instruction"),
        ("invisible.jsonl", "line 3", "blank_response"),
        ("list.parquet", "row 1", "non_string_field"),
        ("na.parquet", "row 3", "missing_instruction"),
        ("quote.csv", "lines 3-6", "malformed_csv")]
    assert rej[3]["record"]["input"] == ["para one", "para two"]
    assert rej[5]["detail"] == ("unclosed quote from line 3: lines 3-6, to the end of the file, "
                                "read as one field")
    texts = kept.set_index("instruction")["text"]
    no_input = ("Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\n")
    assert texts["Say one."] == no_input + "Say one.\n\n### Response:\none\n\n### End"
    assert texts["Say d."] == no_input + "Say d.\n\n### Response:\nd\n\n### End"
    assert m["rejected_malformed_csv"] == 1 and m["rejected_blank_instruction"] == 2
