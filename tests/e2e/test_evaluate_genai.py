"""The evaluate step's records in MLflow 3's evaluation view (dolly/eval/genai.py): two nested
evaluation runs (base, tuned) of one trace per record with exact_match/rouge_l/stop assessments
equal to eval_examples.json, each measure once on the evaluate run, no local path logged.

The step runs in this process (steps.evaluate.main, the code `mlflow run -e evaluate` runs) on the
session's tiny logged model; test_main.py runs it through `mlflow run`."""
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from helpers import tracking_to

pytestmark = pytest.mark.timeout(300)

LIMIT = 8
MEASURES = ("exact_match", "rouge_l", "stop")


@pytest.fixture(scope="module")
def evaluated(tiny_model):
    """(evaluate run, {'base': run, 'tuned': run}, eval_examples.json as a DataFrame, the step's
    stdout + stderr) of one in-process evaluate step on LIMIT records."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from steps import evaluate as step

    client = tiny_model.client()
    exp = client.get_experiment_by_name(tiny_model.experiment).experiment_id
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, tracking_to(tiny_model.tracking_uri):
        mp.setenv("MLFLOW_EXPERIMENT_NAME", tiny_model.experiment)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        with redirect_stdout(out), redirect_stderr(out):
            step.main(["--model_uri", tiny_model.model_uri, "--prepared", str(tiny_model.prepared),
                       "--eval_limit", str(LIMIT), "--eval_max_new_tokens", "8",
                       "--eval_batch_size", "8"])
    children = client.search_runs([exp], "tags.`dolly.evaluated` != ''",
                                  order_by=["attributes.start_time DESC"], max_results=2)
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    table = client.download_artifacts(parent.info.run_id, "eval_examples.json",
                                      str(tiny_model.root / "dl_genai"))
    doc = json.loads(Path(table).read_text())
    return parent, {r.data.tags["dolly.evaluated"]: r for r in children}, \
        pd.DataFrame(doc["data"], columns=doc["columns"]), doc, out.getvalue()


def traces_of(run, tiny_model):
    with tracking_to(tiny_model.tracking_uri):
        return mlflow.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id,
                                    return_type="list")


def test_two_named_evaluation_runs_nested_in_the_evaluate_run(evaluated):
    parent, children, _, _, output = evaluated
    assert set(children) == {"base", "tuned"}
    for who, run in children.items():
        assert run.info.run_name == f"{parent.info.run_name} {who}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["mlflow.runType"] == "genai_evaluate"
        assert "mlflow.project.entryPoint" not in run.data.tags  # never taken for a step's run
        assert run.info.status == "FINISHED"
        # MLflow's means of the assessments equal the evaluate run's metrics
        for scorer, metric in (("exact_match", "exact_match"), ("rouge_l", "rouge_l"),
                               ("stop", "stop_rate")):
            assert run.data.metrics[f"{scorer}/mean"] == pytest.approx(
                parent.data.metrics[f"{who}/{metric}"])
    # quiet: no progress bar, no banner; the step's own line
    assert "Evaluating" not in output and "Evaluation completed" not in output
    assert f"logged as the evaluation runs '{parent.info.run_name} base'" in output


def test_one_trace_per_record_with_the_tables_scores(evaluated, tiny_model):
    _, children, table, _, _ = evaluated
    assert len(table) == LIMIT
    requests = {}
    for who, run in children.items():
        traces = traces_of(run, tiny_model)
        assert len(traces) == LIMIT
        by_record = {}
        for t in traces:
            feedback = {a.name: a.feedback.value for a in t.info.assessments if a.feedback}
            expected = {a.name: a.expectation.value for a in t.info.assessments if a.expectation}
            assert set(feedback) == set(MEASURES), feedback
            inputs = json.loads(t.info.request_preview)
            by_record[inputs["instruction"], inputs.get("context", "")] = (t, feedback, expected)
        assert len(by_record) == LIMIT
        requests[who] = sorted(t.info.request_preview for t in traces)
        for _, row in table.iterrows():
            t, feedback, expected = by_record[row["instruction"], row["input"] or ""]
            assert t.data.spans[0].outputs == row[f"{who}_response"]  # the answer generated once
            assert expected == {"expected_response": row["reference"]}
            assert feedback["exact_match"] == row[f"{who}_exact_match"]
            assert feedback["rouge_l"] == pytest.approx(row[f"{who}_rouge_l"])
            assert feedback["stop"] is bool(row[f"{who}_stopped"])
    # the same requests in both runs: the UI's Compare pairs each record's two answers
    assert requests["base"] == requests["tuned"]
    # the tuned traces name the tuned LoggedModel (its page lists them), the base ones none
    with tracking_to(tiny_model.tracking_uri):
        on_model = mlflow.search_traces(locations=[children["tuned"].info.experiment_id],
                                        model_id=tiny_model.model_uri.removeprefix("models:/"),
                                        return_type="list")
    assert sorted(t.info.trace_id for t in on_model) == sorted(
        t.info.trace_id for t in traces_of(children["tuned"], tiny_model))


def test_each_measure_once_on_the_evaluate_run_and_on_the_model(evaluated, tiny_model):
    parent, _, _, _, _ = evaluated
    m = parent.data.metrics
    unprefixed = [k for k in m if "/" not in k and k not in ("eval_records", "probe_records")]
    assert not unprefixed, unprefixed
    assert "tuned/response_perplexity" in m and "base/response_perplexity" in m
    assert not any(k.endswith("/perplexity") for k in m)
    client = tiny_model.client()
    assert len(client.get_metric_history(parent.info.run_id, "tuned/exact_match")) == 1
    logged = client.get_logged_model(tiny_model.model_uri.removeprefix("models:/"))
    model_keys = {x.key for x in logged.metrics if x.run_id == parent.info.run_id}
    assert model_keys == {k for k in m if k.startswith("tuned/")}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _local_paths(value, tmp_root: Path) -> list[str]:
    """Strings in `value` that name a local path: one under the test's tmp root, or an absolute
    path that exists on this machine (a bare '/' answer is no path)."""
    found = []
    for s in _strings(value):
        for word in s.replace("file://", " ").split():
            if str(tmp_root) in word or (len(word) > 1 and word.startswith("/")
                                         and os.path.exists(word)):
                found.append(s)
    return found


def test_no_local_path_in_the_tables_or_the_traces(evaluated, tiny_model):
    parent, children, _, doc, _ = evaluated
    root = tiny_model.root
    assert str(root) in str(tiny_model.prepared)  # the step read its data from that tmp folder
    assert not _local_paths(doc, root)
    for run in children.values():
        for t in traces_of(run, tiny_model):
            info = t.info.to_dict()
            # the store's own folder for the trace's files, as every run's artifact_uri
            info["tags"].pop("mlflow.artifactLocation")
            spans = [s.to_dict() for s in t.data.spans]
            assert not _local_paths([info, spans], root), (info, spans)
        assert not _local_paths(run.data.tags, root), run.data.tags
