"""dolly.serve.pyfunc: DollyPyfunc's prompts, answers and batching across calls, and what the
logged model ships."""
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from helpers import ROOT, SeenPrompts, same_model, tracking_to
from dolly import generation, prompts
from dolly.serve import pyfunc


def test_a_record_with_input_is_asked_in_the_training_format(wrapped):
    tok = wrapped.pipeline.tokenizer
    frame = pd.DataFrame({"category": ["c", "c"], "context": ["ma ko li", " \t"],
                          "instruction": ["Count the words.", "Greet Mo."]})
    with SeenPrompts(wrapped.pipeline.model) as seen:
        out = wrapped.predict(frame, {"max_new_tokens": 2, "do_sample": False})
    assert len(out) == 2
    # what training tokenized for such records, up to and including the response key
    train = [tok(prompts.format_record(i, c, "x"), add_special_tokens=False)["input_ids"]
             for i, c in [("Count the words.", "ma ko li"), ("Greet Mo.", None)]]
    want = [ids[:ids.index(tok.convert_tokens_to_ids(prompts.RESPONSE_KEY_NL)) + 1]
            for ids in train]
    assert sorted(seen.prompts) == sorted(want)
    assert tok.decode(want[0]) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nCount the words.\n\n### Input:\nma ko li\n\n### Response:\n")


def test_too_long_records_are_shortened_by_the_function_evaluation_uses(wrapped):
    tok = wrapped.pipeline.tokenizer
    long_ins = "start " + "filler " * 2000 + "the question at the end?"
    long_inp = "begin " + "lapo " * 2000 + "last words"
    with SeenPrompts(wrapped.pipeline.model) as seen:
        wrapped.predict([{"instruction": long_ins}, {"instruction": "Q?", "input": long_inp}],
                        {"max_new_tokens": 4, "do_sample": False})
    budget = wrapped.context - generation.answer_room(4, wrapped.context)  # 64 - 4
    want = [generation.shorten_prompt_ids(tok, long_ins, None, budget)[0],
            generation.shorten_prompt_ids(tok, "Q?", long_inp, budget)[0]]
    assert sorted(seen.prompts) == sorted(want)
    assert all(len(p) <= 60 for p in seen.prompts)
    text = tok.decode(want[1])
    assert text.startswith(prompts.INTRO_WITH_INPUT) and "\n### Instruction:\nQ?\n\n" in text
    assert text.endswith("lapo last words\n\n### Response:\n")


def test_predict_answers_every_row_in_order(wrapped):
    rows = ["Greet Mo.", "", "Repeat the word bada.", None, "Count: ma ko li", " \t\n",
            "Name a colour."]
    greedy = {"max_new_tokens": 3, "do_sample": False}
    out = wrapped.predict(rows, greedy)
    one_by_one = [wrapped.predict([r], greedy)[0] for r in rows]
    assert out == one_by_one
    assert out[1] == out[3] == out[5] == ""
    assert len({out[0], out[2], out[4], out[6]}) > 1  # distinct answers: order is observable


def test_temperature_zero_is_greedy(wrapped):
    rows = ["Greet Mo.", "Repeat the word bada."]
    assert wrapped.predict(rows, {"max_new_tokens": 3, "temperature": 0}) == \
        wrapped.predict(rows, {"max_new_tokens": 3, "do_sample": False})


CALLS = [["Greet Mo."], ["Repeat the word bada.", "Count: ma ko li"], ["Name a colour."],
         [{"instruction": "Count the words.", "input": "ma ko li"}], ["Say hello to Kalo."],
         ["What is the first word of the input?"]]


def test_concurrent_callers_share_batches_and_get_their_own_answers(lively):
    wrapped = lively
    import threading

    greedy = {"max_new_tokens": 4, "do_sample": False}
    alone = same_model(wrapped, 0)
    assert alone.batcher is None
    want = [alone.predict(rows, greedy) for rows in CALLS]  # one call at a time, no batching
    # a long wait, so that every caller reaches the batch however slow the machine is
    batched = same_model(wrapped, 1000)
    gate, got = threading.Barrier(len(CALLS)), [None] * len(CALLS)

    def call(k):
        gate.wait()
        got[k] = batched.predict(CALLS[k], greedy)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(CALLS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    assert len({a for answers in want for a in answers}) > 3  # mixed up answers would show
    assert max(batched.batcher.batches) > 2  # rows of several calls went in one batch


def test_sorted_and_unsorted_batches_give_the_same_answers_in_the_same_order(lively):
    wrapped = lively
    rows = ["Greet Mo.", "Count the words in the input: ma ko li bada fe", "Hi",
            "Repeat the word bada.", "Say the word kalo back to me, then stop."]
    greedy = {"max_new_tokens": 4, "do_sample": False}
    model = same_model(wrapped, 5, batch_size=2)
    out = model.predict(rows, greedy)
    shuffled = [4, 2, 0, 3, 1]
    assert model.predict([rows[i] for i in shuffled], greedy) == [out[i] for i in shuffled]
    assert out == [same_model(wrapped, 0, batch_size=1).predict([r], greedy)[0] for r in rows]
    assert len(set(out)) == len(rows)  # distinct answers: any reordering would show
    # batches of two, shortest prompt first: "Hi" with "Greet Mo.", then the next two
    with SeenPrompts(model.pipeline.model) as seen:
        model.predict(rows, greedy)
    tok = model.pipeline.tokenizer
    texts = [tok.decode(p).split("### Instruction:\n")[1].split("\n")[0] for p in seen.prompts]
    assert texts == ["Hi", "Greet Mo.", "Repeat the word bada.",
                     "Say the word kalo back to me, then stop.",
                     "Count the words in the input: ma ko li bada fe"]


def test_the_batching_wait_is_read_from_the_environment(wrapped, monkeypatch):
    monkeypatch.setenv(pyfunc.BATCH_WAIT_ENV, "0")
    assert same_model(wrapped, 10).batcher is None
    monkeypatch.setenv(pyfunc.BATCH_WAIT_ENV, "25")
    assert same_model(wrapped, 0).batcher.wait_s == 0.025
    monkeypatch.setenv(pyfunc.BATCH_WAIT_ENV, "soon")
    with pytest.raises(MlflowException, match="DOLLY_SERVE_BATCH_WAIT_MS must be an integer"):
        same_model(wrapped, 10)


@pytest.mark.parametrize("data, params, message", [
    ([], {}, "no instructions: send at least one"),
    (["a", 3], {}, "row 1: instruction is a number"),
    (["a"], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    (["a"], {"max_new_tokens": 60}, "max_new_tokens must be at most"),
    (["a"], {"top_p": 2}, "top_p must be a number from 0 to 1, got 2"),
])
def test_predict_rejects_what_it_cannot_answer(wrapped, data, params, message):
    with pytest.raises(MlflowException, match=message) as e:
        wrapped.predict(data, params)
    assert e.value.get_http_status_code() == 400


# --- issue 23: blank means nothing visible; invalid text is refused before the model runs -------

GREEDY = {"max_new_tokens": 3, "do_sample": False}


def test_invisible_instructions_are_answered_without_running_the_model(wrapped):
    rows = ["\u200b", "\ufeff\u2060", "\u00ad", " \u3000\u200d\t", "\x00"]
    with SeenPrompts(wrapped.pipeline.model) as seen:
        out = wrapped.predict(rows, GREEDY)
    assert out == ["", "", "", "", ""]
    assert seen.prompts == []  # model.generate was never called
    with SeenPrompts(wrapped.pipeline.model) as seen:
        out = wrapped.predict(["\u200b", "Greet Mo."], GREEDY)
    assert out[0] == "" and len(seen.prompts) == 1  # only the visible one was generated


def test_an_invisible_input_is_no_input(wrapped):
    tok = wrapped.pipeline.tokenizer
    with SeenPrompts(wrapped.pipeline.model) as seen:
        out = wrapped.predict([{"instruction": "Greet Mo.", "input": "\u200b"},
                               {"instruction": "Greet Mo.", "input": "\ufeff \u2060"}], GREEDY)
    no_input = tok(prompts.format_prompt("Greet Mo."), add_special_tokens=False)["input_ids"]
    assert seen.prompts == [no_input, no_input]
    assert out == wrapped.predict([{"instruction": "Greet Mo."}] * 2, GREEDY)


@pytest.mark.parametrize("data, message", [
    (pd.DataFrame({"instruction": ["Greet \ud800 Mo."]}, dtype=object),
     "row 0: instruction is not valid Unicode text (a lone surrogate \\ud800 at character 6)"),
    (pd.DataFrame({"instruction": ["Greet Mo.", "Count."], "context": ["", "ma \udfff"]},
                  dtype=object),
     "row 1: input is not valid Unicode text (a lone surrogate \\udfff at character 3)"),
    (pd.DataFrame([["a", "x", "y"]], columns=["instruction", "input", "input"]),
     'the column "input" is given 2 times: name each column once'),
])
def test_invalid_text_is_refused_before_the_model_runs(wrapped, data, message):
    with SeenPrompts(wrapped.pipeline.model) as seen, pytest.raises(MlflowException) as e:
        wrapped.predict(data, GREEDY)
    assert (e.value.error_code, e.value.message) == ("INVALID_PARAMETER_VALUE", message)
    assert seen.prompts == []


def test_a_temperature_too_small_to_divide_by_is_greedy(wrapped):
    rows = ["Greet Mo.", "Repeat the word bada."]
    # 1e-320 made the logits infinite: torch.multinomial raised a RuntimeError (a 500)
    for temperature in (1e-320, 1e-6):
        assert wrapped.predict(rows, {"max_new_tokens": 3, "temperature": temperature,
                                      "do_sample": True}) == wrapped.predict(rows, GREEDY)


def test_the_default_max_new_tokens_is_fitted_to_a_small_context(wrapped):
    # a request without params (as every CSV request is) is answered by a model whose context
    # (64 tokens here) is smaller than the default 256 new tokens; a caller's 60 is refused
    out = wrapped.predict(["Greet Mo."])
    assert len(out) == 1 and isinstance(out[0], str)
    with pytest.raises(MlflowException) as e:
        wrapped.predict(["Greet Mo."], {"max_new_tokens": 60})
    assert e.value.message == ("max_new_tokens must be at most 40 for this model (context 64 "
                               "tokens, prompt template 23), got 60")


def test_the_model_is_loaded_in_a_thread_that_has_ended_and_its_errors_reach_the_caller():
    """With batching on, _load_pyfunc loads through dolly.serve.pyfunc._in_ended_thread, so the server's
    own thread starts no OpenMP pool that would slow the batcher's worker (see _load_pyfunc)."""
    import contextvars
    import threading

    var = contextvars.ContextVar("dolly_test_var", default="unset")
    var.set("caller's")
    seen = {}

    def load():
        seen["thread"] = threading.current_thread()
        seen["var"] = var.get()
        return "model"

    assert pyfunc._in_ended_thread(load) == "model"
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["var"] == "caller's"

    def broken():
        raise OSError("no such model")

    with pytest.raises(OSError, match="no such model"):
        pyfunc._in_ended_thread(broken)


# --- what the logged model ships: the serving code, enough to answer without the project -------

SHIPPED_RUN = """
import importlib.util, json, sys

found = importlib.util.find_spec("dolly")
before = None if found is None else found.origin or f"namespace {found.submodule_search_locations}"
import mlflow

model = mlflow.pyfunc.load_model(sys.argv[1])
answers = model.predict(["Say hello to Mo."], params={"max_new_tokens": 4, "do_sample": False})
loaded = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
          if name == "dolly" or name.startswith("dolly.")}
print("RESULT " + json.dumps({"before": before, "answers": answers, "loaded": loaded}))
"""


@pytest.mark.timeout(600)
def test_the_logged_model_ships_only_the_serving_code_and_answers_without_the_project(
        tiny_model, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import mlflow

    with tracking_to(tiny_model.tracking_uri):
        local = mlflow.artifacts.download_artifacts(tiny_model.model_uri,
                                                    dst_path=str(tmp_path / "model"))
    code = Path(local) / "code" / "dolly"
    shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    package = ROOT / "dolly"
    want = sorted(str(p.relative_to(package)) for name in pyfunc.SHIPPED_CODE
                  for p in ([package / name] if (package / name).is_file()
                            else (package / name).glob("*.py")))
    assert set(pyfunc.SHIPPED_CODE) == {"__init__.py", "prompts.py", "generation.py", "serve"}
    assert shipped == want and "serve/pyfunc.py" in shipped, shipped
    assert not [p for p in code.rglob("*") if "__pycache__" in p.parts or p.suffix == ".pyc"]

    # A fresh interpreter outside the repository, where only the model's own code is dolly.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", SHIPPED_RUN, local], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines())
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["before"] is None, f"dolly importable before loading: {result['before']}"
    answers = result["answers"]
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str), answers
    loaded = result["loaded"]
    assert {"dolly", "dolly.prompts", "dolly.generation", "dolly.serve.pyfunc"} <= set(loaded)
    others = [name for name in loaded if name not in ("dolly", "dolly.prompts", "dolly.generation",
                                                     "dolly.serve")
              and not name.startswith("dolly.serve.")]
    assert not others, f"the served model loaded {others}"
    outside = {name: f for name, f in loaded.items()
               if f is None or not Path(f).resolve().is_relative_to(code.resolve())}
    assert not outside, f"loaded from outside the model's code: {outside}"
