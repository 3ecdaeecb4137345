"""Batch scoring reads its input files with data_prep's readers (dolly.data.readers), in Spark,
and finds its columns as Spark finds them (issue 23, case 8: names that differ only in case)."""
import codecs
import json
from contextlib import contextmanager

import pandas as pd
import pytest

from helpers import tracking_to
from dolly import scoring
from dolly.errors import DataError
from dolly.spark_session import spark_session

pytestmark = pytest.mark.timeout(300)

GREEDY = {"max_new_tokens": 4, "do_sample": False}
# As a spreadsheet exports dolly-15k: capitalized headers, the reference answer as `Response`.
EXCEL_CSV = ('Instruction,Context,Response\r\n'
             'Count the words in the input.,ma ko li,three\r\n'
             'Greet Kalo.,,"Hello, Kalo!"\r\n')


@pytest.fixture(scope="module")
def spark():
    """One local Spark session for the module (case-insensitive, Spark's default)."""
    session = spark_session("local[1]", app="dolly-test-input")
    try:
        yield session
    finally:
        session.stop()


@contextmanager
def case_sensitive(spark):
    spark.conf.set("spark.sql.caseSensitive", "true")
    try:
        yield
    finally:
        spark.conf.unset("spark.sql.caseSensitive")


def test_read_input_decodes_like_data_prep(tmp_path, spark):
    folder = tmp_path / "in"
    folder.mkdir()
    # a UTF-8 BOM, NaN for a missing value, and a Windows-1252 byte (a row of nulls, no U+FFFD)
    (folder / "a.jsonl").write_bytes(
        codecs.BOM_UTF8 + b'{"id": 1, "instruction": "Hi"}\n{"id": 2, "instruction": NaN}\n'
        b'{"id": 3, "instruction": "Tr\xe8s bien"}\n')
    # an indented JSON array under a .jsonl name, with a column the others lack
    (folder / "b.jsonl").write_text(json.dumps([{"id": 4, "instruction": "Go.", "note": "n"}], indent=2))
    # UTF-16 CSV with a BOM, a quoted field across lines
    (folder / "c.csv").write_text('id,instruction\r\n5,"two\r\nlines"\r\n', encoding="utf-16")
    (folder / "_scored_by.json").write_text("{}")  # an earlier output's sidecar: skipped
    assert [f.name for f in scoring.input_files(folder)] == ["a.jsonl", "b.jsonl", "c.csv"]
    rows = [r.asDict() for r in scoring.read_input(spark, folder).collect()]
    assert [(r["instruction"], r["note"]) for r in rows] == [
        ("Hi", None), (None, None), (None, None), ("Go.", "n"), ("two\r\nlines", None)]
    assert [r["id"] for r in rows] == [1, 2, None, 4, 5]  # the CSV's text "5" unioned as a long


# --- names that differ only in case --------------------------------------------------------------

def _same_but_case_files(tmp_path):
    csv = tmp_path / "header.csv"
    csv.write_text("instruction,INSTRUCTION\r\nGreet Kalo.,Greet Mo.\r\n")
    # in different records: Spark's JSON reader would merge them and drop the second's value
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"instruction": "Greet Kalo."}\n{"Instruction": "Greet Mo."}\n')
    parquet = tmp_path / "table.parquet"
    pd.DataFrame({"instruction": ["Greet Kalo."], "Instruction": ["Greet Mo."]}).to_parquet(parquet)
    return [(csv, "instruction", "INSTRUCTION"), (jsonl, "instruction", "Instruction"),
            (parquet, "instruction", "Instruction")]


def test_two_columns_that_differ_only_in_case_are_refused_naming_both(tmp_path, spark):
    for path, a, b in _same_but_case_files(tmp_path):
        with pytest.raises(DataError) as e:
            scoring.read_input(spark, path, keep_types=("instruction", "input", "context"))
        assert str(e.value) == (f"{path} has columns '{a}' and '{b}', which differ only in case: "
                                "Spark (spark.sql.caseSensitive=false) takes them for one "
                                "column; rename one of them")
    with case_sensitive(spark):  # a case-sensitive session tells them apart: nothing is lost
        for path, a, b in _same_but_case_files(tmp_path):
            rows = scoring.read_input(spark, path).collect()
            assert [(r[a], r[b]) for r in rows] == {
                ".csv": [("Greet Kalo.", "Greet Mo.")], ".parquet": [("Greet Kalo.", "Greet Mo.")],
                ".jsonl": [("Greet Kalo.", None), (None, "Greet Mo.")]}[path.suffix]


def test_columns_are_found_in_any_case_as_spark_finds_them(tmp_path, spark):
    src = tmp_path / "excel.csv"
    src.write_text(EXCEL_CSV)
    df = scoring.read_input(spark, src, keep_types=("Instruction", "input", "context"))
    assert df.columns == ["Instruction", "Context", "Response"]
    for column in ("Instruction", "instruction", "INSTRUCTION"):  # -P column=..., the default
        assert scoring.check_columns(df, column, "model_response") == ("Instruction", "Context")
    assert scoring.input_column(df) == "Context"
    assert scoring.check_columns(df, "context", "model_response") == ("Context", None)
    other = tmp_path / "upper.jsonl"
    other.write_text('{"INSTRUCTION": "Count the words in the input.", "INPUT": "ma ko li"}\n')
    assert scoring.check_columns(scoring.read_input(spark, other), "instruction") == \
        ("INSTRUCTION", "INPUT")
    with case_sensitive(spark):  # exactly, as that session resolves them
        assert scoring.check_columns(df, "Instruction") == ("Instruction", None)
        with pytest.raises(DataError) as e:
            scoring.check_columns(df, "instruction")
        assert str(e.value) == (
            "input has no column 'instruction' (columns: Instruction, Context, Response); column "
            "names are case-sensitive in this session (spark.sql.caseSensitive=true): pass "
            "-P column=Instruction")


@pytest.mark.parametrize("csv, kwargs, message", [
    (EXCEL_CSV, {}, "input already has a column 'Response', the same column as 'response' to "
     "Spark (spark.sql.caseSensitive=false); pass -P output_column=<another name> to keep it"),
    ("instruction,Error\r\nGreet Kalo.,none\r\n", {}, "input already has a column 'Error', the "
     "same column as 'error' to Spark (spark.sql.caseSensitive=false); pass -P "
     "error_column=<another name> to keep it"),
    ("instruction\r\nGreet Kalo.\r\n", {"output_column": "Error"}, "output_column and "
     "error_column 'Error' and 'error' are one column to Spark (spark.sql.caseSensitive=false): "
     "answers and error reasons need columns of their own"),
], ids=["response", "error", "output-is-error"])
def test_a_column_the_step_adds_never_replaces_one_of_the_inputs(tmp_path, spark, csv, kwargs,
                                                                 message):
    src = tmp_path / "in.csv"
    src.write_text(csv)
    folder = scoring.check_output(tmp_path / "out", src)
    df = scoring.read_input(spark, src)
    with pytest.raises(DataError) as e:  # before any work: the model is not even looked up
        scoring.score_to_parquet(spark, df, "models:/no-such-model/1", "instruction", folder,
                                 **kwargs)
    assert str(e.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no output, no staging


@pytest.mark.timeout(600)
def test_json_and_parquet_columns_in_any_case_are_scored_as_their_names_say(
        tmp_path, spark, tiny_model, champion):
    import mlflow

    folder = tmp_path / "in"
    folder.mkdir()
    # a JSON number in `Context` stays a number (VARIANT, matched in any case): an error row
    (folder / "a.jsonl").write_text(
        '{"Instruction": "Count the words in the input.", "Context": "ma ko li"}\n'
        '{"Instruction": "Greet Kalo.", "Context": 7}\n')
    # another file's `instruction` / `context` are the same columns to Spark: unioned into them
    pd.DataFrame({"instruction": ["Repeat the word bada.", "Greet Mo."],
                  "context": [None, "lapo"], "__dolly_row": ["mine", "mine too"]}
                 ).to_parquet(folder / "b.parquet")
    df = scoring.read_input(spark, folder, keep_types=("instruction", "input", "context"))
    assert df.columns == ["Instruction", "Context", "__dolly_row"]
    out = tmp_path / "out"
    with tracking_to(tiny_model.tracking_uri):
        counts = scoring.score_to_parquet(spark, df, "models:/dolly@champion", "instruction",
                                          scoring.check_output(out, folder), "model_response",
                                          GREEDY)
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    assert counts == {"rows_read": 4, "rows_scored": 3, "rows_empty": 0, "rows_errored": 1,
                      "rows_written": 4}
    got = pd.read_parquet(out).astype(object)
    got = got.where(got.notna(), None)  # pandas reads a null string as NaN
    assert list(got.columns) == ["Instruction", "Context", "__dolly_row", "error",
                                 "model_response"]
    assert list(got["Instruction"]) == ["Count the words in the input.", "Greet Kalo.",
                                        "Repeat the word bada.", "Greet Mo."]
    assert list(got["Context"]) == ["ma ko li", "7", None, "lapo"]
    assert list(got["__dolly_row"]) == [None, None, "mine", "mine too"]  # the user's, unchanged
    assert list(got["error"]) == [None, "Context is a number, expected a string", None, None]
    expected = model.predict([{"instruction": "Count the words in the input.", "input": "ma ko li"},
                              {"instruction": "Repeat the word bada."},
                              {"instruction": "Greet Mo.", "input": "lapo"}], GREEDY)
    assert [got["model_response"][i] for i in (0, 2, 3)] == expected
    assert got["model_response"][1] is None


@pytest.mark.timeout(900)
def test_batch_score_keeps_an_excel_style_response_column_and_reads_its_context(
        tmp_path, tiny_model, champion):
    """Issue 23, case 8: headers `Instruction,Context,Response`, `-P column=Instruction`. The
    step refuses before any work rather than replace the user's `Response` with the model's
    `response`; with `-P output_column=model_response` every input column is kept unchanged
    and `Context` is each row's input."""
    import mlflow

    src = tmp_path / "excel.csv"
    src.write_text(EXCEL_CSV)
    out = tmp_path / "scored"
    base = {"input": src, "output": out, "max_new_tokens": 4, "do_sample": "false",
            "spark_master": "local[1]"}
    proc = tiny_model.mlflow_run("batch_score", {**base, "column": "Instruction"})
    assert proc.returncode != 0
    assert ("\nerror: input already has a column 'Response', the same column as 'response' to "
            "Spark (spark.sql.caseSensitive=false); pass -P output_column=<another name> to keep "
            "it\n") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["excel.csv"]

    proc = tiny_model.mlflow_run("batch_score", {**base, "output_column": "model_response"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch_score: 2 rows in, 2 scored, 0 empty" in proc.stdout
    got = pd.read_parquet(out)
    assert list(got.columns) == ["Instruction", "Context", "Response", "error", "model_response"]
    assert got[["Instruction", "Context", "Response"]].values.tolist() == [
        ["Count the words in the input.", "ma ko li", "three"], ["Greet Kalo.", "", "Hello, Kalo!"]]
    assert got["error"].isna().all()
    with tracking_to(tiny_model.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    assert list(got["model_response"]) == model.predict(
        [{"instruction": "Count the words in the input.", "input": "ma ko li"},
         {"instruction": "Greet Kalo."}], GREEDY)

    # The untrained tiny model answers "" with or without an input, so the check above cannot
    # tell whether `Context` reached it: a model that echoes its record can.
    echo = _echo_model(tmp_path, tiny_model)
    proc = tiny_model.mlflow_run("batch_score", {
        "input": src, "output": tmp_path / "echoed", "model_uri": echo,
        "column": "Instruction", "output_column": "model_response", "spark_master": "local[1]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(pd.read_parquet(tmp_path / "echoed")["model_response"]) == [
        "instruction='Count the words in the input.' input='ma ko li'",
        "instruction='Greet Kalo.' input=''"]


ECHO = """import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [f"instruction={r['instruction']!r} input={r['input']!r}"
                for r in model_input.to_dict("records")]


mlflow.models.set_model(Echo())
"""


def _echo_model(tmp_path, tiny_model) -> str:
    """A logged pyfunc (models from code) that answers each record with what it received.
    (MLflow warns that its `predict` has no type hints, through a filter of its own: on purpose,
    the echo takes whatever spark_udf hands it.)"""
    import mlflow

    code = tmp_path / "echo_model.py"
    code.write_text(ECHO)
    with tracking_to(tiny_model.tracking_uri):
        exp = mlflow.get_experiment_by_name(tiny_model.experiment).experiment_id
        with mlflow.start_run(experiment_id=exp, run_name="echo model (test)"):
            return mlflow.pyfunc.log_model(name="echo", python_model=str(code)).model_uri



# Issue 24: every input batch_score needs is resolved before any work, with one line.
@pytest.mark.parametrize("params, line", [
    ({"model_uri": "runs:/nope/model"},
     "error: model_uri 'runs:/nope/model': cannot load its MLmodel (no such run, model or "
     "artifact)"),
    ({"model_uri": "dolly"},  # the project's own package folder, relative to the project
     "error: model_uri 'dolly': not an MLflow model (the folder has no MLmodel file); use "
     "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<path> or a folder "
     "holding an MLmodel file"),
    ({"ouput": "SCORED"},
     "error: unknown config key 'ouput'; did you mean 'output'? (`mlflow run . -e config` "
     "lists the keys)"),
])
def test_batch_score_refuses_a_bad_model_or_key_in_one_line_before_any_work(
        tmp_path, params, line):
    from helpers import mlflow_run

    (tmp_path / "in.jsonl").write_text('{"instruction": "Greet Kalo."}\n')
    out = tmp_path / "scored"
    base = {"input": tmp_path / "in.jsonl", "output": out}
    if "ouput" in params:
        base.pop("output")
        params = {"ouput": out}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = mlflow_run("batch_score", {**base, **params}, uri, timeout=300)
    assert proc.returncode != 0
    ours = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert ours == [line], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("mlflow.exceptions")[0]
    assert "SparkContext" not in proc.stderr and not out.exists()
    # the run `mlflow run` made holds nothing but the parameters: deleted, not left in Default
    from helpers import runs_left

    assert runs_left(uri) == []
