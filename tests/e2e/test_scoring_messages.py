"""batch_score with a `messages` column: conversations scored in Spark, bad ones refused per row
before the model (never a failed partition), the column kept as the array it was."""
import json

import pandas as pd
import pytest

from helpers import tracking_to
from dolly import scoring
from dolly.errors import DataError
from dolly.spark_session import spark_session

pytestmark = pytest.mark.timeout(300)

GREEDY = {"max_new_tokens": 4, "do_sample": False}
KEEP = ("instruction", "input", "context")  # what the step reads as VARIANT


def _turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# One record per line; what each row's error column says (None: scored or empty).
ROWS = [
    ({"instruction": "Greet Kalo."}, None),
    ({"messages": _turns(("user", "Greet Mo."))}, None),
    ({"messages": _turns(("user", "Greet Mo."), ("assistant", "Hello, Mo!"),
                         ("user", "Again."))},
     "messages holds more than one turn: this model was trained in Dolly's format (one "
     "instruction, no system turn, no history); use a model trained with "
     "prompt_format=chat_template"),
    ({"messages": _turns(("system", "Be brief."), ("user", "Greet Mo."))},
     "messages holds more than one turn: this model was trained in Dolly's format (one "
     "instruction, no system turn, no history); use a model trained with "
     "prompt_format=chat_template"),
    ({"messages": _turns(("tool", "42"), ("user", "Greet Mo."))},
     "messages has a turn whose role is not system, user or assistant"),
    ({"messages": _turns(("user", "Greet Mo."), ("assistant", "Hello, Mo!"))},
     "the last message of messages must be the user's"),
    ({"messages": [{"role": "user"}]}, "messages has a turn without content"),
    ({"messages": None}, None),  # nothing to answer: empty
    # an empty conversation is none: the row's instruction (and its input) are scored
    ({"instruction": "Count the words in the input.", "input": "ma ko li", "messages": []}, None),
    # a conversation wins over the row's instruction and input (a number here: not an error)
    ({"instruction": "Greet Kalo.", "input": 7, "messages": _turns(("user", "Greet Mo."))}, None),
]


@pytest.fixture(scope="module")
def spark():
    """One local Spark session for the module (case-insensitive, Spark's default)."""
    session = spark_session("local[1]", app="dolly-test-messages")
    try:
        yield session
    finally:
        session.stop()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read(out) -> pd.DataFrame:
    got = pd.read_parquet(out).astype(object)
    return got.where(got.notna(), None)  # pandas reads a null string as NaN


def _as_lists(value):
    """A Parquet list of structs as pandas reads it (an array of dicts) as a list of dicts."""
    return None if value is None else [dict(t) for t in value]


def test_messages_column_is_found_as_spark_finds_it_and_must_hold_conversations(tmp_path, spark):
    src = _jsonl(tmp_path / "a.jsonl", [{"Messages": [{"Role": "user", "Content": "Greet Mo."}],
                                         "context": "x"}])
    df = scoring.read_input(spark, src, keep_types=KEEP)
    assert scoring.messages_column(df) == ("Messages", "Role", "Content")
    # the instruction column is optional beside conversations
    assert scoring.check_columns(df, "instruction") == (None, "context")
    parquet = tmp_path / "b.parquet"
    pd.DataFrame({"id": [1, 2], "messages": [_turns(("system", "S."), ("user", "U.")), None]}
                 ).to_parquet(parquet)
    assert scoring.messages_column(scoring.read_input(spark, parquet)) == \
        ("messages", "role", "content")
    for records, spark_type in [
        ([{"instruction": "Greet Mo.", "messages": "Greet Mo."}], "string"),
        ([{"messages": ["Greet Mo."]}], "array<string>"),
        ([{"messages": [{"role": "user", "text": "Greet Mo."}]}],
         "array<struct<role:string,text:string>>"),
        ([{"messages": [{"role": "user", "content": 7}]}],
         "array<struct<content:bigint,role:string>>"),
    ]:
        df = scoring.read_input(spark, _jsonl(tmp_path / "bad.jsonl", records), keep_types=KEEP)
        with pytest.raises(DataError) as e:
            scoring.check_columns(df, "instruction")
        assert str(e.value) == (
            f"input column 'messages' is {spark_type}: expected conversations, an array of "
            "{role, content} turns (array<struct<role:string,content:string>>, as Spark reads "
            '[{"role": "user", "content": "..."}] from JSON)')
    # as the step reads it for -P column=Messages: that column as VARIANT
    df = scoring.read_input(spark, _jsonl(tmp_path / "c.jsonl", [ROWS[1][0]]),
                            keep_types=("Messages", "input", "context"))
    with pytest.raises(DataError) as e:
        scoring.check_columns(df, "Messages")
    assert str(e.value) == ("-P column=Messages names the column 'messages', which holds "
                            "conversations, not instructions: pass the instructions' column, or "
                            "-P column=instruction when the input has none")


@pytest.mark.timeout(600)
def test_conversations_are_scored_and_bad_ones_are_errors_before_the_model(
        tmp_path, spark, tiny_model, champion):
    import mlflow

    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, **r} for i, (r, _) in enumerate(ROWS)])
    df = scoring.read_input(spark, src, keep_types=KEEP)
    assert df.columns == ["id", "instruction", "messages", "input"]
    out = tmp_path / "out"
    with tracking_to(tiny_model.tracking_uri):
        counts = scoring.score_to_parquet(spark, df, "models:/dolly@champion", "instruction",
                                          scoring.check_output(out, src), params=GREEDY)
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    assert counts == {"rows_read": 10, "rows_scored": 4, "rows_empty": 1, "rows_errored": 5,
                      "rows_written": 10}
    got = _read(out)
    assert list(got.columns) == ["id", "instruction", "messages", "input", "error", "response"]
    assert list(got["id"]) == list(range(10))
    assert list(got["error"]) == [e for _, e in ROWS]
    # every input column as it was: the conversations as the arrays they were
    assert [_as_lists(m) for m in got["messages"]] == [
        [{"role": t["role"], "content": t.get("content")} for t in r["messages"]]
        if r.get("messages") is not None else None for r, _ in ROWS]
    assert list(got["instruction"]) == [r.get("instruction") for r, _ in ROWS]
    assert list(got["input"]) == [None] * 8 + ["ma ko li", "7"]
    expected = model.predict([{"instruction": "Greet Kalo."}, {"instruction": "Greet Mo."},
                              {"instruction": "Count the words in the input.",
                               "input": "ma ko li"}], GREEDY)
    assert list(got["response"]) == [expected[0], expected[1], None, None, None, None, None, None,
                                     expected[2], expected[1]]
    # in process, a messages column gets the same answer (a dict with `messages` would be an
    # OpenAI request)
    assert model.predict(pd.DataFrame({"messages": [ROWS[1][0]["messages"]]}), GREEDY) == \
        [expected[1]]


# A pyfunc that answers each record with what it received. (MLflow warns that its `predict` has no
# type hints, through a filter of its own: on purpose, the echo takes whatever spark_udf hands it.)
ECHO = """import mlflow


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        def text(x):  # spark_udf hands a null string over as NaN
            return x if isinstance(x, str) else None

        def turns(m):
            return None if m is None else [(t["role"], t["content"]) for t in m]

        return [f"{text(r['instruction'])!r} {r['input']!r} {turns(r['messages'])!r}"
                for r in model_input.to_dict("records")]


mlflow.models.set_model(Echo())
"""


@pytest.mark.timeout(600)
def test_the_model_gets_each_conversation_as_role_and_content_turns(tmp_path, spark, tiny_model):
    """What spark_udf hands the model, seen by a model that echoes its records: the turns as
    {role, content} whatever the case of their fields, null messages for an instruction row; a
    model that is not Dolly's has no one-turn rule. An input of conversations only needs no
    instruction column."""
    import mlflow

    code = tmp_path / "echo_model.py"
    code.write_text(ECHO)
    with tracking_to(tiny_model.tracking_uri):
        exp = mlflow.get_experiment_by_name(tiny_model.experiment).experiment_id
        with mlflow.start_run(experiment_id=exp, run_name="echo model (test)"):
            echo = mlflow.pyfunc.log_model(name="echo", python_model=str(code)).model_uri
        src = _jsonl(tmp_path / "in.jsonl", [
            {"Messages": [{"Role": "system", "Content": "Be brief.", "name": "x"},
                          {"Role": "user", "Content": "Greet Mo."}]},
            {"instruction": "Greet Kalo.", "context": "lapo"}])
        out = tmp_path / "out"
        counts = scoring.score_to_parquet(spark, scoring.read_input(spark, src, keep_types=KEEP),
                                          echo, "instruction", scoring.check_output(out, src))
        assert counts["rows_scored"] == 2
        assert list(_read(out)["response"]) == [
            "None '' [('system', 'Be brief.'), ('user', 'Greet Mo.')]",
            "'Greet Kalo.' 'lapo' None"]
        only = _jsonl(tmp_path / "only.jsonl", [{"messages": _turns(("user", "Greet Mo.")),
                                                 "context": 7}, {"context": "lapo"}])
        counts = scoring.score_to_parquet(spark, scoring.read_input(spark, only, keep_types=KEEP),
                                          echo, "instruction",
                                          scoring.check_output(tmp_path / "only", only))
    assert counts == {"rows_read": 2, "rows_scored": 1, "rows_empty": 1, "rows_errored": 0,
                      "rows_written": 2}
    got = _read(tmp_path / "only")
    assert list(got.columns) == ["messages", "context", "error", "response"]
    assert list(got["context"]) == ["7", "lapo"]  # read as VARIANT, written as text as before
    assert list(got["response"]) == ["None '' [('user', 'Greet Mo.')]", None]
