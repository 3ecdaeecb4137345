"""Scoring with the champion in a real local Spark session: spark_udf and the batch_score step."""
import json

import mlflow
import pandas as pd
import pytest

from conftest import TEMPLATE_BITS, runs_in, tracking_to


@pytest.mark.timeout(420)
def test_spark_udf_scores_a_dataframe(tiny_model, champion):
    from dolly import scoring

    with tracking_to(tiny_model.tracking_uri):
        spark = scoring.spark_session("local[2]", app="dolly-test-udf")
        try:
            udf = mlflow.pyfunc.spark_udf(spark, "models:/dolly@champion", result_type="string",
                                          env_manager="local", params={"max_new_tokens": 4})
            # Row 5 is ~40x the tiny model's 256-token context: shortened, not a failed batch.
            df = spark.createDataFrame(pd.DataFrame({
                "instruction": ["Repeat the word bada.", "Greet Kalo.", "Say hello to Mo.",
                                "Count the words in the input.", "Count the words: " +
                                "lapo " * 10_000, "   "], "id": [1, 2, 3, 4, 5, 6]}))
            out = df.withColumn("response", udf("instruction")).toPandas()
        finally:
            spark.stop()
    assert list(out["id"]) == [1, 2, 3, 4, 5, 6]  # every row scored, not only the first
    assert out["response"].map(lambda r: isinstance(r, str)).all()
    assert out["response"].iloc[5] == ""  # a blank instruction: an empty answer
    assert not any(bit in r for r in out["response"] for bit in TEMPLATE_BITS)


@pytest.mark.timeout(420)
def test_batch_score_keeps_every_row(tiny_model, champion, tmp_path):
    rows = [{"id": 1, "instruction": "Repeat the word bada."},
            {"id": 2, "instruction": None},
            {"id": 3, "instruction": ""},
            {"id": 4, "instruction": "   "},
            {"id": 5},
            {"id": 6, "instruction": "Greet Kalo.", "note": "x"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "scored"
    proc = tiny_model.mlflow_run("batch_score", {
        "input": src, "output": out, "max_new_tokens": 4, "spark_master": "local[2]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_parquet(out)
    assert list(df["id"]) == [1, 2, 3, 4, 5, 6]  # every row, in input order
    assert {"id", "instruction", "note", "response"} == set(df.columns)
    answered = df["response"].notna()
    assert list(answered) == [True, False, False, False, False, True]
    assert not any(bit in r for r in df["response"][answered] for bit in TEMPLATE_BITS)
    scored_by = json.loads((out / "_scored_by.json").read_text())
    assert scored_by["model_version"] == champion
    assert scored_by["scored_model_uri"] == f"models:/dolly/{champion}"
    run = runs_in(tiny_model.tracking_uri, "batch_score")[0]
    assert run.data.tags["model_version"] == champion
    m = run.data.metrics
    assert (m["rows_read"], m["rows_scored"], m["rows_skipped"]) == (6, 2, 4)
