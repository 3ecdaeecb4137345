"""dolly.serve.contract: the records the registered model takes (by column name), the generation
params it accepts, and the one-line refusals of everything else."""
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from dolly.serve.contract import as_frame, check_params


NA = [None, float("nan"), np.nan, pd.NA]


@pytest.mark.parametrize("data, expected", [
    ("Greet Mo.", [("Greet Mo.", "")]),
    (["a", "b"], [("a", ""), ("b", "")]),
    ([["a"], ["b"]], [("a", ""), ("b", "")]),  # rows of one column, as JSON "instances" give them
    (pd.Series(["a", "b"]), [("a", ""), ("b", "")]),
    (np.array([["a"], ["b"]]), [("a", ""), ("b", "")]),
    (pd.DataFrame({"text": ["a", "b"]}), [("a", ""), ("b", "")]),  # one unnamed column
    # dolly-15k's column order: the instruction and its context are taken by name
    (pd.DataFrame({"category": ["closed_qa"], "context": ["Mo is 3."], "instruction": ["Age?"],
                   "response": ["3"]}), [("Age?", "Mo is 3.")]),
    ([{"input": "ma ko", "instruction": "Count."}, {"instruction": "Greet Mo."}],
     [("Count.", "ma ko"), ("Greet Mo.", "")]),
    ({"instruction": ["a", "b"], "context": ["x", None]}, [("a", "x"), ("b", "")]),
    ({"instruction": "a", "input": "x"}, [("a", "x")]),
    ({"instructions": ["a", "b"]}, [("a", ""), ("b", "")]),  # one field of instructions
    (pd.DataFrame({"instruction": ["a", *NA, " \t"], "input": [None, "x", *NA[1:], "\t"]}),
     [("a", ""), ("", "x"), ("", ""), ("", ""), ("", ""), (" \t", "\t")]),
])
def test_records_are_taken_by_name(data, expected):
    frame = as_frame(data)
    assert list(zip(frame["instruction"], frame["input"])) == expected


@pytest.mark.parametrize("data, message", [
    (["a", 3], "row 1: instruction is a number, expected a string"),
    (pd.DataFrame({"instruction": ["a", 2.5]}), "row 1: instruction is a number, expected a string"),
    ([{"instruction": True}], "row 0: instruction is a boolean, expected a string"),
    ([{"instruction": ["Greet Mo."]}], "row 0: instruction is a list, expected a string"),
    ({"instruction": [{"text": "a"}]}, "row 0: instruction is an object, expected a string"),
    ([{"instruction": "a", "context": 5}], "row 0: input is a number, expected a string"),
    ([{"input": "x"}], "record 0 has no 'instruction' field (fields: input)"),
    (pd.DataFrame({"category": ["c"], "response": ["r"]}),
     "no 'instruction' column among the 2 columns (category, response)"),
    (pd.DataFrame({"context": ["c"]}), "no 'instruction' column among the 1 columns (context)"),
    (pd.DataFrame({"instruction": ["a"], "input": ["x"], "context": ["y"]}),
     "both 'input' and 'context' columns"),
    (pd.DataFrame(index=[0, 1]), "the input has no columns"),
    (np.array([["a", "x"], ["b", "y"]]), "an array of shape (2, 2): send named columns"),
    (3.5, "expected records or instructions, got a number"),
    (None, "expected records or instructions, got null"),
])
def test_bad_records_are_refused_with_one_line(data, message):
    with pytest.raises(MlflowException) as e:
        as_frame(data)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.get_http_status_code() == 400


@pytest.mark.parametrize("params, message", [
    ({"temperature": -1}, "temperature must be a number >= 0 (0 = greedy), got -1"),
    ({"top_p": 1.5}, "top_p must be a number from 0 to 1, got 1.5"),
    ({"top_p": -0.1}, "top_p must be a number from 0 to 1, got -0.1"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0 = off), got -1"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0 (0 = off), got 2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": "many"}, 'max_new_tokens must be an integer >= 1, got "many"'),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got true"),
    ({"do_sample": "yes"}, 'do_sample must be true or false, got "yes"'),
    ({"max_new_token": 5}, "unknown params ['max_new_token']: this model takes"),
    ([1], "params must be an object of name: value, got a list"),
])
def test_bad_params_are_refused_naming_the_param_and_range(params, message):
    with pytest.raises(MlflowException) as e:
        check_params(params)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.get_http_status_code() == 400


def test_null_params_mean_the_default():
    assert check_params({"do_sample": None, "top_p": None, "top_k": 3}) == {"top_k": 3}
    assert check_params(None) == {}


def test_a_refusal_never_echoes_a_huge_request():
    with pytest.raises(MlflowException) as e:
        check_params({"max_new_tokens": "x" * 1_000_000})
    assert len(e.value.message) < 300


def test_json_kind_names_values_as_json_does():
    from dolly.serve.contract import json_kind

    assert [json_kind(v) for v in (1, 2.5, True, np.int64(3), np.bool_(True), [1], {"a": 1})] == [
        "a number", "a number", "a boolean", "a number", "a boolean", "a list", "an object"]


# --- issue 23: invalid text, duplicate columns and numbers too large are 400s, never crashes ---

@pytest.mark.parametrize("data, message", [
    # dtype=object: pandas 3's default string dtype (Arrow) refuses a lone surrogate itself
    (pd.DataFrame({"instruction": ["Greet \ud800 Mo."]}, dtype=object),
     "row 0: instruction is not valid Unicode text (a lone surrogate \\ud800 at character 6)"),
    ([{"instruction": "Greet Mo."}, {"instruction": "Count.", "context": "ma \udfff"}],
     "row 1: input is not valid Unicode text (a lone surrogate \\udfff at character 3)"),
    (["ok", "\udc80"], "row 1: instruction is not valid Unicode text (a lone surrogate \\udc80 at "
                       "character 0)"),
    ({"instruction": ["a"], "input": ["\ud83d"]},  # half of a pair: U+1F600 is \ud83d\ude00
     "row 0: input is not valid Unicode text (a lone surrogate \\ud83d at character 0)"),
    ({"texts": ["\ud83d"]},  # one field of instructions
     "row 0: instruction is not valid Unicode text (a lone surrogate \\ud83d at character 0)"),
    (pd.Series(["\udbff"], dtype=object),
     "row 0: instruction is not valid Unicode text (a lone surrogate \\udbff at character 0)"),
    (pd.DataFrame([["a", "x", "y"]], columns=["instruction", "input", "input"]),
     'the column "input" is given 2 times: name each column once'),
    (pd.DataFrame([["a", "b", "c", "d"]], columns=["category", "instruction", "category",
                                                   "category"]),
     'the column "category" is given 3 times: name each column once'),
    (pd.DataFrame([["a", "b"]], columns=[1, "1"]), 'the column "1" is given 2 times: name each '
                                                   'column once'),
])
def test_invalid_text_and_duplicate_columns_are_refused_with_one_line(data, message):
    with pytest.raises(MlflowException) as e:
        as_frame(data)
    assert e.value.message == message
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_text_beyond_the_bmp_is_valid_but_a_python_surrogate_pair_is_not():
    frame = as_frame([{"instruction": "Smile \U0001F600", "input": "\U0001F600"}])
    assert list(zip(frame["instruction"], frame["input"])) == [("Smile \U0001F600", "\U0001F600")]
    # a Python str does not join surrogates (JSON's "\\ud83d\\ude00" is parsed to U+1F600)
    with pytest.raises(MlflowException) as e:
        as_frame(["Smile \ud83d\ude00"])
    assert e.value.message == ("row 0: instruction is not valid Unicode text (a lone surrogate "
                               "\\ud83d at character 6)")


@pytest.mark.parametrize("params, message", [
    ({"temperature": 10 ** 400}, "temperature must be a number >= 0 (0 = greedy), got an integer "
                                 "of over 40 digits"),
    ({"max_new_tokens": 10 ** 5000}, "max_new_tokens must be an integer >= 1, got an integer of "
                                     "over 40 digits"),
    ({"top_k": 2 ** 63}, "top_k must be an integer >= 0 (0 = off), got 9223372036854775808"),
    ({"top_p": 10 ** 400}, "top_p must be a number from 0 to 1, got an integer of over 40 digits"),
    ({"temperature": float("inf")}, "temperature must be a number >= 0 (0 = greedy), got Infinity"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0 (0 = greedy), got NaN"),
    ({"top_p": float("-inf")}, "top_p must be a number from 0 to 1, got -Infinity"),
    ("many", "params must be an object of name: value, got a string"),
    ({"max_new_tokens": "\ud800"}, 'max_new_tokens must be an integer >= 1, got "\\ud800"'),
    ({"\ud800": 1}, "unknown params ['\\ud800']: this model takes ['do_sample', "
                    "'max_new_tokens', 'temperature', 'top_k', 'top_p']"),
])
def test_params_too_large_or_not_finite_are_refused_not_crashed_on(params, message):
    with pytest.raises(MlflowException) as e:
        check_params(params)
    assert e.value.message == message


def test_the_largest_64_bit_params_are_taken():
    assert check_params({"top_k": 2 ** 63 - 1, "temperature": 1e308}) == {
        "top_k": 2 ** 63 - 1, "temperature": 1e308}


def test_a_message_quoting_invalid_text_can_be_encoded():
    from dolly.serve.contract import bad_input, printable

    assert printable("a\ud800b") == "a\\ud800b"
    assert printable("caf\u00e9 \U0001F600") == "caf\u00e9 \U0001F600"
    message = bad_input("no 'instruction' column among the 1 columns (\udfff)").message
    assert message == "no 'instruction' column among the 1 columns (\\udfff)"
    message.encode("utf-8")  # would raise on a lone surrogate


# Issue 23, case 8's kind on the served side: names are found as Spark finds them (in any case),
# so a spark_udf over struct("Instruction", "Context") never drops its input silently.
@pytest.mark.parametrize("data", [
    pd.DataFrame({"Instruction": ["Greet Mo."], "Context": ["x"]}),
    pd.DataFrame({"instruction": ["Greet Mo."], "INPUT": ["x"]}),
    [{"INSTRUCTION": "Greet Mo.", "Context": "x"}],
    {"Instruction": ["Greet Mo."], "Input": ["x"]},
])
def test_columns_are_found_in_any_case(data):
    frame = as_frame(data)
    assert frame.to_dict("records") == [{"instruction": "Greet Mo.", "input": "x"}]


@pytest.mark.parametrize("data, message", [
    (pd.DataFrame({"instruction": ["a"], "Instruction": ["b"]}),
     "columns 'instruction' and 'Instruction' differ only in case: they name one field (as in "
     "Spark); send one of them"),
    (pd.DataFrame({"instruction": ["a"], "input": ["b"], "Input": ["c"]}),
     "columns 'input' and 'Input' differ only in case: they name one field (as in Spark); send "
     "one of them"),
    ([{"instruction": "a", "Context": "b", "input": "c"}],
     "record 0 has both 'Context' and 'input': send one of them"),
    ([{"instruction": "a", "INSTRUCTION": "b"}],
     "record 0: fields 'instruction' and 'INSTRUCTION' differ only in case: they name one "
     "field (as in Spark); send one of them"),
])
def test_two_names_of_one_field_are_refused(data, message):
    with pytest.raises(MlflowException) as e:
        as_frame(data)
    assert e.value.message == message
