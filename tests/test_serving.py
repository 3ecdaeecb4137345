"""dolly.serving: what the registered model's pyfunc accepts, and how it shortens a prompt."""
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from conftest import SMALLEST
from dolly import prompts
from dolly.serving import DollyPyfunc, instructions_of


@pytest.mark.parametrize("data, expected", [
    ("Greet Mo.", ["Greet Mo."]),
    (["a", "b"], ["a", "b"]),
    ([["a"], ["b"]], ["a", "b"]),  # rows of one column, as JSON "instances" give them
    (pd.DataFrame({"instruction": ["a", "b"], "id": [1, 2]}), ["a", "b"]),
    (pd.Series(["a", "b"]), ["a", "b"]),
    (np.array([["a", "x"], ["b", "y"]]), ["a", "b"]),
    ({"instruction": ["a", "b"]}, ["a", "b"]),
])
def test_instructions_of_each_input_shape(data, expected):
    assert instructions_of(data) == expected


def test_a_null_cell_stays_missing():
    # pandas 3 stores a null string as NaN; either way the row gets an empty answer later
    first, second = instructions_of(pd.DataFrame({"instruction": ["a", None]}))
    assert first == "a" and (second is None or second != second)


@pytest.mark.parametrize("data, message", [
    ({"instruction": ["a"], "other": ["b"]}, "expected one field of instructions"),
    (pd.DataFrame(index=[0, 1]), "no columns"),
    (3.5, "expected instructions as strings, got float"),
])
def test_instructions_of_rejects_with_one_line(data, message):
    with pytest.raises(MlflowException, match=message):
        instructions_of(data)


@pytest.fixture(scope="module")
def wrapped():
    """MLflow's own transformers pyfunc over a real tiny pipeline (64-token context), wrapped."""
    import transformers
    from mlflow.transformers import _TransformersWrapper

    from dolly.config import load_config
    from dolly.modeling import build_tiny
    from dolly.tokenizer import build_tokenizer

    cfg = load_config(None, SMALLEST)
    tok = build_tokenizer(cfg, [])
    tok.padding_side = "left"
    pipe = transformers.pipeline("text-generation", model=build_tiny(cfg, tok), tokenizer=tok)
    inner = _TransformersWrapper(pipe, {}, {"return_full_text": False}, prompts.PROMPT_TEMPLATE)
    return DollyPyfunc(inner, {})


def test_fit_keeps_the_end_of_a_too_long_instruction(wrapped):
    frame = wrapped._frame  # tokens of the template around the instruction
    assert 0 < frame < 48
    short = "Greet Mo."
    assert wrapped.fit(short, 48) == (short, False)
    long = "start " + "filler " * 200 + "the question at the end?"
    text, shortened = wrapped.fit(long, 48)
    prompt = prompts.PROMPT_TEMPLATE.format(prompt=text)
    assert shortened and long.endswith(text) and text.endswith("the question at the end?")
    assert len(wrapped._ids(prompt)) <= 48
    assert prompt.startswith(prompts.INTRO_NO_INPUT) and prompt.endswith(prompts.RESPONSE_KEY_NL)


def test_predict_answers_every_row_in_order(wrapped):
    long = "Count the words: " + "lapo " * 5000
    params = {"max_new_tokens": 4, "do_sample": False}
    out = wrapped.predict(["", "Greet Mo.", None, long, " \t"], params)
    # each answered row gets the answer it gets when asked alone (greedy), in its own place
    alone = [wrapped.predict([instruction], params)[0] for instruction in ("Greet Mo.", long)]
    assert alone[0] != alone[1]  # this tiny model answers the two differently: order shows
    assert out == ["", alone[0], "", alone[1], ""]


@pytest.mark.parametrize("data, params, message", [
    ([], {}, "no instructions"),
    (["a", 3], {}, "instruction 1 is a int"),
    (["a"], {"max_new_tokens": 0}, "positive integer"),
    (["a"], {"max_new_tokens": 60}, "leaves no room for a prompt"),
])
def test_predict_rejects_what_it_cannot_answer(wrapped, data, params, message):
    with pytest.raises(MlflowException, match=message) as e:
        wrapped.predict(data, params)
    assert e.value.get_http_status_code() == 400
