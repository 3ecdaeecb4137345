"""dolly.eval.genai: the offline scorers of the evaluate step's MLflow evaluations (literal
values), the rows they score, the trace metadata that replaces local paths, the quiet settings.
The evaluation runs themselves: tests/e2e/test_evaluate_genai.py."""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dolly.eval import genai


def _trace(**root_attributes):
    """What the stop scorer reads of an MLflow Trace: data.spans, the root's attributes."""
    child = SimpleNamespace(parent_id="r", attributes={genai.STOPPED_ATTR: True})
    root = SimpleNamespace(parent_id=None, attributes=root_attributes)
    return SimpleNamespace(data=SimpleNamespace(spans=[child, root]))


def _ref(text):
    return {"expected_response": text}


def test_the_scorers_names_are_the_assessment_names():
    assert [s.name for s in genai.SCORERS] == ["exact_match", "rouge_l", "stop"]
    assert all(s.timeout == 0 for s in genai.SCORERS)  # no watchdog thread per call


@pytest.mark.parametrize("answer, reference, value", [
    ("Paris", "paris.", 1.0),             # case and trailing punctuation are normalised away
    ("  Hello,  Kalo! ", "hello, kalo", 1.0),
    ("Hello Kalo", "Hello, Kalo", 0.0),   # inner punctuation counts
    ("", "x", 0.0),
])
def test_exact_match_scorer(answer, reference, value):
    assert genai.exact_match_scorer(outputs=answer, expectations=_ref(reference)) == value


def test_rouge_l_scorer():
    # LCS 3 words: precision 3/3, recall 3/4, F1 = 2 * 1 * 0.75 / 1.75 = 6/7
    assert genai.rouge_l_scorer(outputs="the cat sat", expectations=_ref("the cat sat down")) \
        == pytest.approx(6 / 7)
    assert genai.rouge_l_scorer(outputs="ma ko li", expectations=_ref("ma ko li")) == 1.0
    assert genai.rouge_l_scorer(outputs=None, expectations=_ref("ma")) == 0.0


def test_stop_scorer_reads_the_root_span():
    assert genai.stop_scorer(trace=_trace(**{genai.STOPPED_ATTR: True})) is True
    assert genai.stop_scorer(trace=_trace(**{genai.STOPPED_ATTR: False})) is False
    assert genai.stop_scorer(trace=_trace()) is None  # no attribute: no assessment
    assert genai.stop_scorer(trace=None) is None


def test_scorers_without_a_reference_give_no_assessment():
    assert genai.exact_match_scorer(outputs="a", expectations={}) is None
    assert genai.rouge_l_scorer(outputs="a", expectations=None) is None


def test_the_harness_call_passes_only_what_each_scorer_takes():
    # Scorer.run is what mlflow.genai.evaluate calls, with every field
    kw = {"inputs": {"instruction": "Name the capital of France."}, "outputs": "Paris",
          "expectations": _ref("paris."), "trace": _trace(**{genai.STOPPED_ATTR: True})}
    assert [s.run(**kw) for s in genai.SCORERS] == [1.0, 1.0, True]  # ROUGE ignores case too


def test_answer_rows_share_the_inputs_of_base_and_tuned():
    table = pd.DataFrame({
        "instruction": ["Greet sami.", "Count the words in the input."],
        "input": [None, "ka bo"], "reference": ["Hello, sami!", "2"],
        "category": ["greet", np.nan],
        "base_response": ["sami sami", ""], "tuned_response": ["Hello, sami!", "2"],
        "base_stopped": [False, False], "tuned_stopped": [True, np.True_]})
    base, tuned = genai.answer_rows(table, "base"), genai.answer_rows(table, "tuned")
    assert [r["inputs"] for r in base] == [r["inputs"] for r in tuned] == [
        {"instruction": "Greet sami."},
        {"instruction": "Count the words in the input.", "context": "ka bo"}]
    assert base[0] == {"inputs": {"instruction": "Greet sami."}, "outputs": "sami sami",
                       "expectations": {"expected_response": "Hello, sami!"},
                       "stopped": False, "category": "greet"}
    assert [r["outputs"] for r in tuned] == ["Hello, sami!", "2"]
    assert [r["stopped"] for r in tuned] == [True, True]
    assert base[1]["category"] == ""


def test_source_metadata_has_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "steps" / "evaluate.py")])
    local = genai.source_metadata({"mlflow.source.git.repoURL": "/work/main"})
    assert local == {"mlflow.source.name": os.path.join("steps", "evaluate.py"),
                     "mlflow.source.git.repoURL": ""}
    monkeypatch.setattr(sys, "argv", ["/elsewhere/run.py"])
    url = "https://github.com/someone/dolly.git"
    assert genai.source_metadata({"mlflow.source.git.repoURL": url}) == {
        "mlflow.source.name": "run.py", "mlflow.source.git.repoURL": url}
    assert genai.source_metadata({})["mlflow.source.git.repoURL"] == ""
    assert genai.source_metadata({"mlflow.source.git.repoURL": "file:///srv/repo"})[
        "mlflow.source.git.repoURL"] == ""


def test_quiet_settings_hold_for_the_call_only(monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_GENAI_EVAL_MAX_WORKERS", raising=False)
    monkeypatch.setenv("MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT", "5")  # the user's value wins
    with genai._offline_quiet():
        print("Evaluating: 100%")
        sys.stderr.write("progress bar\n")
        assert os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] == "1"
        assert os.environ["MLFLOW_GENAI_EVAL_PREDICT_RATE_LIMIT"] == "0"
        assert os.environ["MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT"] == "5"
    assert "MLFLOW_GENAI_EVAL_MAX_WORKERS" not in os.environ
    assert os.environ["MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT"] == "5"
    out, err = capfd.readouterr()
    assert "Evaluating" not in out + err and "progress bar" not in out + err
    # on an error, what was held back is shown before the error propagates
    with pytest.raises(ValueError), genai._offline_quiet():
        print("what MLflow said")
        raise ValueError("boom")
    assert "what MLflow said" in capfd.readouterr().err
