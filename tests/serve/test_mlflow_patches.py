"""dolly.serve.mlflow_patches: the scoring server's request handling for this model: JSON parsed
as sent, one-line errors, each request stamped with its deadline."""
import json

import pytest

from dolly.serve import mlflow_patches
from dolly.serve.contract import as_frame, check_params
from dolly.serve.deadline import current_deadline


@pytest.mark.parametrize("batching, thread", [(True, "dolly-request"), (False, "asyncio")])
def test_the_server_stamps_each_request_with_its_timeout_as_deadline(monkeypatch, batching,
                                                                     thread):
    import asyncio
    import threading
    import time

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")
    server_asyncio = mlflow_patches._server_asyncio(batching)
    t0 = time.monotonic()
    deadline, name = asyncio.run(server_asyncio.to_thread(
        lambda: (current_deadline(), threading.current_thread().name)))
    assert t0 + 7 <= deadline < t0 + 8
    # with batching, a pool of its own: no request waits for one of asyncio's 6 threads
    assert name.startswith(thread)
    assert current_deadline() is None  # the caller's context is untouched
    assert server_asyncio.wait_for is asyncio.wait_for  # the rest is asyncio itself


class _Meta:
    flavors = {"python_function": {"loader_module": "dolly.serve.pyfunc"}}


class _Model:
    """Stands for the PyFuncModel the server holds (its predict: DollyPyfunc's checks only)."""

    metadata = _Meta()

    def predict(self, data, params=None):
        frame = as_frame(data)
        check_params(params)
        return [f"{i}|{n}" for i, n in zip(frame["instruction"], frame["input"])]


def _invoke(body, content_type="application/json"):
    import json

    from dolly.serve.mlflow_patches import dolly_invocations

    def mlflow_invocations(data, content_type, model, input_schema):
        raise AssertionError("JSON for this model is parsed by dolly.serve.mlflow_patches")

    resp = dolly_invocations(mlflow_invocations)(body, content_type, _Model(), None)
    return resp.status, json.loads(resp.response)


def test_json_values_reach_the_model_as_sent():
    assert _invoke(b'{"inputs": [null, "a"]}') == (200, {"predictions": ["|", "a|"]})
    assert _invoke(b'{"dataframe_split": {"columns": ["context", "instruction"], '
                   b'"data": [["x", "a"]]}}') == (200, {"predictions": ["a|x"]})
    status, body = _invoke(b'{"inputs": [1, 2]}')
    assert (status, body["message"]) == (
        400, "row 0: instruction is a number, expected a string (or null for no answer)")


def test_a_missing_content_type_is_a_415_not_a_500():
    assert _invoke(b'{"inputs": ["a"]}', None) == (415, {
        "error_code": "BAD_REQUEST", "message": "no Content-Type header: send application/json, "
        "text/csv, application/vnd.apache.parquet"})


def test_error_messages_are_one_short_line_without_paths():
    from dolly.serve.mlflow_patches import short_message

    assert short_message("failed in /usr/lib/python3.11/site-packages/x.py\n  line 3") == \
        "failed in <path> line 3"
    assert len(short_message("x" * 10_000)) == 300
    status, body = _invoke(b'{"inputs": ["' + b"a" * 100 + b'"')
    assert status == 400 and body["message"].startswith("the body is not valid JSON:")


# --- issue 23: any body that is not a well-formed request is a 400 naming the fault ------------

MALFORMED = {
    "nested 1,000 deep": (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                          "the body is nested too deeply: at most 32 levels of arrays and objects"),
    "nested 40 deep": (b'{"inputs": ' + b"[" * 40 + b'"a"' + b"]" * 40 + b"}",
                       "the body is nested too deeply: at most 32 levels of arrays and objects"),
    "an integer of 5,000 digits": (b'{"inputs": [' + b"7" * 5000 + b"]}",
                                   "the body holds an integer of 5000 digits: at most 100"),
    "a negative integer of 101 digits": (b'{"inputs": ["a"], "params": {"top_k": -' + b"1" * 101
                                         + b"}}",
                                         "the body holds an integer of 101 digits: at most 100"),
    "a float too large": (b'{"inputs": ["a"], "params": {"temperature": 1e999}}',
                          "the body holds a number too large for a float: 1e999"),
    "a lone surrogate in an instruction": (
        b'{"inputs": ["Greet \\ud800 Mo."]}',
        "the body is not valid Unicode text: a lone surrogate \\ud800 at character 6 of inputs[0]"),
    "a lone surrogate in a record's input": (
        b'{"dataframe_records": [{"instruction": "a", "context": "x\\udfff"}]}',
        "the body is not valid Unicode text: a lone surrogate \\udfff at character 1 of "
        "dataframe_records[0].context"),
    "a lone surrogate in a column name": (
        b'{"dataframe_split": {"columns": ["instruction", "cat\\udc00"], "data": [["a", "b"]]}}',
        "the body is not valid Unicode text: a lone surrogate \\udc00 at character 3 of "
        "dataframe_split.columns[1]"),
    "a lone surrogate in a key": (
        b'{"inputs": ["a"], "params": {"\\ud800": 1}}',
        "the body is not valid Unicode text: a lone surrogate \\ud800 at character 0 of a key in "
        "params"),
    "a surrogate as raw bytes (CESU-8)": (b'{"inputs": ["a\xed\xa0\x80"]}',
                                          "the body is not valid UTF-8 (byte 14)"),
    "UTF-16": ('{"inputs": ["a"]}'.encode("utf-16"), "the body is not valid UTF-8 (byte 0)"),
    "input named twice": (
        b'{"dataframe_split": {"columns": ["instruction", "input", "input"], '
        b'"data": [["a", "b", "c"]]}}',
        'the column "input" is given 2 times: name each column once'),
    "a record key given twice": (
        b'{"dataframe_records": [{"instruction": "a", "instruction": "b"}]}',
        'the body gives the key "instruction" twice in one object: send each key once'),
    "a param given twice": (
        b'{"inputs": ["a"], "params": {"max_new_tokens": 3, "max_new_tokens": 300}}',
        'the body gives the key "max_new_tokens" twice in one object: send each key once'),
    "a format given twice": (b'{"inputs": ["a"], "inputs": ["b"]}',
                             'the body gives the key "inputs" twice in one object: send each key '
                             'once'),
    "a column key given twice": (b'{"inputs": {"instruction": ["a"], "instruction": ["b"]}}',
                                 'the body gives the key "instruction" twice in one object: send '
                                 'each key once'),
    "not an object": (b'["Greet Mo."]', "the body must be a JSON object with exactly one of "
                      "['inputs', 'instances', 'dataframe_split', 'dataframe_records'] (and "
                      "optionally params)"),
    "null": (b"null", "the body must be a JSON object with exactly one of ['inputs', "
             "'instances', 'dataframe_split', 'dataframe_records'] (and optionally params)"),
    "inputs null": (b'{"inputs": null}', "expected records or instructions, got null"),
    "dataframe_split rows of strings": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": ["a"]}}',
        "dataframe_split data must be a list of rows (arrays): row 0 is a string"),
    "dataframe_split rows of records": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": [{"instruction": "a"}]}}',
        "dataframe_split data must be a list of rows (arrays): row 0 is an object"),
    "dataframe_split a row too long": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": [["a"], ["b", "c"]]}}',
        "dataframe_split row 1 has 2 values for 1 columns"),
    "dataframe_split a column not named by a string": (
        b'{"dataframe_split": {"columns": ["instruction", 5], "data": [["a", "b"]]}}',
        "dataframe_split columns must be a list of column names (strings)"),
    "dataframe_split an index of other length": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": [["a"]], "index": [0, 1]}}',
        "dataframe_split index must be a list of 1 labels, one per row"),
    "dataframe_split data not a list": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": {"instruction": "a"}}}',
        "dataframe_split data must be a list of rows, got an object"),
    "dataframe_records of strings": (
        b'{"dataframe_records": ["a"]}',
        "dataframe_records must be a list of records (objects): record 0 is a string"),
    "an integer param too large for 64 bits": (
        b'{"inputs": ["a"], "params": {"top_k": 100000000000000000000000000000}}',
        "top_k must be an integer >= 0 (0 = off), got 100000000000000000000000000000"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_json_body_is_a_400_naming_the_fault(case):
    body, message = MALFORMED[case]
    assert _invoke(body) == (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": message})


def test_well_formed_bodies_near_the_limits_are_answered():
    # 32 levels; a surrogate pair escaped in JSON is one character; NaN is a missing value;
    # an integer of 100 digits is a number (refused as an instruction, not as a body)
    assert _invoke(b'{"inputs": ' + b"[" * 31 + b'"a"' + b"]" * 31 + b"}")[0] == 400
    assert _invoke(b'{"inputs": ' + b"[" * 31 + b'"a"' + b"]" * 31 + b"}")[1]["message"] == (
        "row 0: instruction is a list, expected a string (or null for no answer)")
    assert _invoke(b'{"inputs": ["Smile \\ud83d\\ude00", NaN]}') == (
        200, {"predictions": ["Smile \U0001F600|", "|"]})
    assert _invoke('\ufeff{"inputs": ["a"]}'.encode()) == (200, {"predictions": ["a|"]})
    assert _invoke(b'{"inputs": [' + b"7" * 100 + b"]}")[1]["message"] == (
        "row 0: instruction is a number, expected a string (or null for no answer)")
    assert _invoke(b'{"dataframe_split": {"columns": ["instruction"], "data": [["a"]], '
                   b'"index": [7]}}') == (200, {"predictions": ["a|"]})


# --- issue 23: a CSV request means what the same records mean as JSON: every cell is text ------

CSV = ('instruction,context\n'
       'NA,0042\n'
       'null,NaN\n'
       'True,1e5\n'
       ',ma ko\n'
       'Greet Mo.,\n'
       '"Say ""hi"", then stop.","a,b"\n')


def test_every_csv_cell_is_text_and_an_empty_cell_is_blank():
    records = [{"instruction": "NA", "input": "0042"}, {"instruction": "null", "input": "NaN"},
               {"instruction": "True", "input": "1e5"}, {"instruction": "", "input": "ma ko"},
               {"instruction": "Greet Mo.", "input": ""},
               {"instruction": 'Say "hi", then stop.', "input": "a,b"}]
    want = (200, {"predictions": ["NA|0042", "null|NaN", "True|1e5", "|ma ko", "Greet Mo.|",
                                  'Say "hi", then stop.|a,b']})
    assert _invoke(CSV.encode(), "text/csv") == want
    assert _invoke(CSV.encode(), "text/csv; charset=utf-8") == want
    assert _invoke(json.dumps({"dataframe_records": records}).encode()) == want
    # a short line's missing cells are empty; one column is instructions
    assert _invoke(b"instruction,input\nNA\n", "text/csv") == (200, {"predictions": ["NA|"]})
    assert _invoke(b"text\n007\n", "text/csv") == (200, {"predictions": ["007|"]})


@pytest.mark.parametrize("body, message", [
    (b"", "the CSV body is empty: send a header line naming the columns ('instruction', "
          "optionally 'input'), then one line per record"),
    (b"instruction,input,input\na,b,c\n", 'the column "input" is given 2 times: name each '
                                          'column once'),
    (b"instruction\na,b\n", "the body is not valid CSV: Error tokenizing data. C error: Expected "
                            "1 fields in line 2, saw 2"),
    (b"instruction\n\xff\n", "the body is not valid UTF-8 (byte 12)"),
    (b"category,response\nc,r\n", "no 'instruction' column among the 2 columns (category, "
                                  "response); name the columns 'instruction' and optionally "
                                  "'input' (or send conversations in a 'messages' column)"),
])
def test_a_malformed_csv_body_is_a_400_naming_the_fault(body, message):
    assert _invoke(body, "text/csv") == (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                               "message": message})


@pytest.mark.parametrize("content_type, message", [
    ("text/csv; charset=latin-1", "charset latin-1: the server reads UTF-8 only"),
    ("application/json; charset=utf-16", "charset utf-16: the server reads UTF-8 only"),
    ("application/json; format=pandas-split", "unknown Content-Type parameter 'format': send "
                                               "charset=utf-8 or none"),
])
def test_content_type_parameters_other_than_utf_8_are_a_415(content_type, message):
    assert _invoke(b'{"inputs": ["a"]}', content_type) == (415, {"error_code": "BAD_REQUEST",
                                                                 "message": message})


def test_the_input_check_hands_the_model_only_the_params_the_caller_set():
    import mlflow.pyfunc

    from dolly.serve.contract import signature

    mlflow_patches.install_input_checks()
    frame, params = mlflow.pyfunc._validate_prediction_input(
        ["a"], {"top_k": 3}, None, signature().params, mlflow_patches.DOLLY_LOADER)
    assert params == {"top_k": 3}  # MLflow's own check would add the other four defaults
    assert list(frame["instruction"]) == ["a"]
