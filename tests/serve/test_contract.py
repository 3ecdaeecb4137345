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
    (3.5, "expected records or instructions, got a float"),
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
