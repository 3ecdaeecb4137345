"""Scoring with the champion in a real local Spark session: spark_udf and the batch_score step."""
import hashlib
import json

import mlflow
import pandas as pd
import pytest

from helpers import TEMPLATE_BITS, runs_in, tracking_to
from dolly import scoring
from dolly.spark_session import spark_session
from dolly.errors import DollyError

GREEDY = {"max_new_tokens": 4, "do_sample": False}
# dolly-15k's column order (Spark reads its JSON with sorted columns): category comes first
DOLLY_15K = pd.DataFrame({
    "category": ["open_qa", "brainstorming", "closed_qa"],
    "context": ["ma ko li", "", "lapo bada"],
    "instruction": ["Count the words in the input.", "Greet Kalo.", "Repeat the first word."],
    "response": ["three", "Hello, Kalo!", "lapo"]})


@pytest.fixture(scope="module")
def spark(tiny_model, champion):
    """One local Spark session for every Spark case of this module."""
    with tracking_to(tiny_model.tracking_uri):
        session = spark_session("local[2]", app="dolly-test-udf")
        try:
            yield session
        finally:
            session.stop()


@pytest.fixture(scope="module")
def in_process(tiny_model, champion):
    with tracking_to(tiny_model.tracking_uri):
        return mlflow.pyfunc.load_model("models:/dolly@champion")


def _udf(tiny_model, spark, params):
    with tracking_to(tiny_model.tracking_uri):
        return mlflow.pyfunc.spark_udf(spark, "models:/dolly@champion", result_type="string",
                                       env_manager="local", params=params)


@pytest.mark.timeout(420)
def test_spark_udf_scores_a_dataframe(tiny_model, spark):
    udf = _udf(tiny_model, spark, {"max_new_tokens": 4})
    # Row 5 is ~40x the tiny model's 256-token context: shortened, not a failed batch.
    df = spark.createDataFrame(pd.DataFrame({
        "instruction": ["Repeat the word bada.", "Greet Kalo.", "Say hello to Mo.",
                        "Count the words in the input.", "Count the words: " + "lapo " * 10_000,
                        "   ", None, "\t\n"], "id": [1, 2, 3, 4, 5, 6, 7, 8]}))
    out = df.withColumn("response", udf("instruction")).toPandas()
    assert list(out["id"]) == [1, 2, 3, 4, 5, 6, 7, 8]  # every row scored, not only the first
    assert out["response"].map(lambda r: isinstance(r, str)).all()
    assert list(out["response"].iloc[5:]) == ["", "", ""]  # blank, null, tabs: empty answers
    assert not any(bit in r for r in out["response"] for bit in TEMPLATE_BITS)


@pytest.mark.timeout(420)
def test_spark_udf_takes_instruction_and_context_by_name(tiny_model, spark, in_process):
    udf = _udf(tiny_model, spark, GREEDY)
    df = spark.createDataFrame(DOLLY_15K)
    from pyspark.sql.functions import struct

    got = df.select(udf(struct("instruction", "context")).alias("a"),
                    udf(struct("context", "instruction")).alias("b"),  # order does not matter
                    udf("instruction").alias("c"),
                    udf("instruction", "context").alias("d")).toPandas()  # signature order
    with_context = in_process.predict(DOLLY_15K[["instruction", "context"]], GREEDY)
    alone = in_process.predict(list(DOLLY_15K["instruction"]), GREEDY)
    assert list(got["a"]) == list(got["b"]) == list(got["d"]) == with_context
    assert list(got["c"]) == alone
    # Which field reaches the model as what, observable whatever the (untrained) model answers:
    # a number in the context column is refused as the *input*, in either struct order.
    bad = spark.createDataFrame(pd.DataFrame({"category": ["open_qa"], "context": [7],
                                              "instruction": ["Greet Kalo."]}))
    for record in (struct("instruction", "context"), struct("context", "instruction")):
        with pytest.raises(Exception, match=r"row 0: input is a number, expected a string"):
            bad.select(udf(record)).collect()
    assert [r[0] for r in bad.select(udf("instruction")).collect()] == \
        in_process.predict(["Greet Kalo."], GREEDY)


@pytest.mark.timeout(420)
def test_spark_udf_refuses_a_non_string_instruction_naming_the_row(tiny_model, spark):
    udf = _udf(tiny_model, spark, GREEDY)
    df = spark.createDataFrame(pd.DataFrame({"id": [7, 8]}))
    with pytest.raises(Exception, match=r"row 0: instruction is a number, expected a string"):
        df.select(udf("id")).collect()


def _hash_folder(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.timeout(420)
def test_batch_score_refuses_a_folder_holding_its_input(tiny_model, champion, tmp_path):
    d2 = tmp_path / "d2"
    d2.mkdir()
    (d2 / "input.jsonl").write_text(json.dumps({"instruction": "Greet Kalo."}) + "\n")
    (d2 / "README.txt").write_text("the user's notes")
    before = _hash_folder(d2)
    for mode in ({}, {"mode": "overwrite"}):  # as issue 11 ran it, then asking to overwrite
        proc = tiny_model.mlflow_run("batch_score", {"input": d2 / "input.jsonl", "output": d2,
                                                     "spark_master": "local[1]", **mode})
        assert proc.returncode != 0
        assert f"error: output {d2} holds the input {d2 / 'input.jsonl'}: choose an output " \
               "folder outside it" in proc.stderr
        assert "Traceback" not in proc.stderr and "log4j" not in proc.stderr  # no Spark
        assert _hash_folder(d2) == before
    other = tmp_path / "in.jsonl"
    other.write_text(json.dumps({"instruction": "Greet Kalo."}) + "\n")
    proc = tiny_model.mlflow_run("batch_score", {"input": other, "output": d2,
                                                 "spark_master": "local[1]"})
    assert proc.returncode != 0
    assert f"error: output folder {d2} is not empty (2 files, e.g. README.txt): batch_score " \
           "writes only into a new or empty folder" in proc.stderr
    assert _hash_folder(d2) == before


@pytest.mark.timeout(420)
def test_batch_score_keeps_every_row_and_counts_bad_ones(tiny_model, champion, in_process,
                                                          tmp_path):
    rows = [{"id": 1, "instruction": "Repeat the word bada."},
            {"id": 2, "instruction": None},
            {"id": 3, "instruction": ""},
            {"id": 4, "instruction": " \t "},
            {"id": 5},
            {"id": 6, "instruction": "Greet Kalo.", "note": "x"},
            {"id": 7, "instruction": 42},
            {"id": 8, "instruction": True},
            {"id": 9, "instruction": ["Greet Mo."]},
            {"id": 10, "instruction": {"text": "Greet Mo."}},
            {"id": 11, "instruction": "Count the words in the input.", "context": "ma ko li"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "scored"
    proc = tiny_model.mlflow_run("batch_score", {
        "input": src, "output": out, "max_new_tokens": 4, "do_sample": "false",
        "spark_master": "local[2]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch_score: 11 rows in, 3 scored, 4 empty" in proc.stdout
    assert proc.stdout.startswith(f"batch_score: scoring {src} (1 file(s)) with dolly "
                                  f"v{champion} on Spark local[2]\n")
    # the step's own lines are not buried: no per-file or per-tensor bars, no Spark start-up
    # warnings, no warnings about choices the project made knowingly
    for noise in ("Downloading artifacts", "Loading weights", "NativeCodeLoader", "WARN Utils",
                  "does not yet fully support pandas", 'env_manager="local"', "[Stage "):
        assert noise not in proc.stderr, noise
    assert "4 errored (not a string, reason in 'error')" in proc.stdout
    df = pd.read_parquet(out)
    assert list(df["id"]) == list(range(1, 12))  # every row, in input order
    assert {"id", "instruction", "note", "context", "response", "error"} == set(df.columns)
    answered = df["response"].notna()
    assert list(answered) == [True, False, False, False, False, True] + [False] * 4 + [True]
    assert list(df["error"].iloc[6:10]) == [
        "instruction is a number, expected a string", "instruction is a boolean, expected a "
        "string", "instruction is a list, expected a string", "instruction is an object, "
        "expected a string"]
    assert df["error"].iloc[:6].isna().all() and pd.isna(df["error"].iloc[10])
    # the row keeps its value, as JSON text
    assert list(df["instruction"].iloc[6:10]) == ["42", "true", '["Greet Mo."]',
                                                  '{"text":"Greet Mo."}']
    expected = in_process.predict(
        [{"instruction": "Repeat the word bada."}, {"instruction": "Greet Kalo."},
         {"instruction": "Count the words in the input.", "context": "ma ko li"}],
        {"max_new_tokens": 4, "do_sample": False})
    assert list(df["response"][answered]) == expected
    scored_by = json.loads((out / "_scored_by.json").read_text())
    assert scored_by["model_version"] == champion
    assert scored_by["scored_model_uri"] == f"models:/dolly/{champion}"
    run = runs_in(tiny_model.tracking_uri, "batch_score")[0]
    assert run.data.tags["model_version"] == champion
    assert run.info.run_name == f"batch_score dolly v{champion}"
    m = run.data.metrics
    assert (m["rows_read"], m["rows_scored"], m["rows_empty"], m["rows_errored"],
            m["rows_written"]) == (11, 3, 4, 4, 11)
    # what the step wrote is marked as its own: a rerun may replace exactly that, nothing else
    folder = scoring.check_output(out, src, "overwrite")
    assert set(folder.replace) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                   if p.is_file()} - {scoring.MARKER}
    with pytest.raises(DollyError, match="is not empty"):
        scoring.check_output(out, src)
