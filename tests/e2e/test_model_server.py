"""`mlflow models serve -m models:/dolly@champion` over real HTTP on loopback."""
import json
import os
import re
import time

import mlflow
import pandas as pd
import pytest
import requests

from helpers import TEMPLATE_BITS, start_server, stop_server, tracking_to
from dolly import prompts


@pytest.fixture(scope="module")
def server(tiny_model, champion):
    proc, url = start_server("models:/dolly@champion", tiny_model.env(),
                             tiny_model.root / "serve-invocations.log")
    try:
        yield url
    finally:
        stop_server(proc)


def _answers(resp, n):
    assert resp.status_code == 200, resp.text[:2000]
    preds = resp.json()["predictions"]
    assert isinstance(preds, list) and len(preds) == n
    assert all(isinstance(p, str) for p in preds)
    assert not any(bit in p for p in preds for bit in TEMPLATE_BITS)
    return preds


@pytest.mark.timeout(300)
def test_batch_request_with_params(server):
    body = {"inputs": ["Repeat the word bada.", "Greet Kalo.", "Count the words in the input."],
            "params": {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9}}
    _answers(requests.post(f"{server}/invocations", json=body, timeout=120), 3)


@pytest.mark.timeout(300)
def test_dataframe_split_request(server):
    body = {"dataframe_split": {"columns": ["instruction"],
                                "data": [["Repeat the word bada."], ["Greet Kalo."]]},
            "params": {"max_new_tokens": 4, "do_sample": False}}
    _answers(requests.post(f"{server}/invocations", json=body, timeout=120), 2)


@pytest.mark.timeout(120)
def test_malformed_body_is_a_4xx(server):
    resp = requests.post(f"{server}/invocations", data=b"{not json",
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= resp.status_code < 500, resp.status_code
    # and the server keeps serving
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200


# --- issue 6: too-long, blank and bad requests; load -------------------------------------------

def _still_serving(url):
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    body = {"inputs": ["Greet Kalo."], "params": {"max_new_tokens": 3, "do_sample": False}}
    _answers(requests.post(f"{url}/invocations", json=body, timeout=120), 1)


@pytest.mark.timeout(300)
def test_too_long_and_blank_instructions(server):
    # ~40x the tiny model's 256-token context, in a batch with ordinary and blank instructions.
    long = "Count the words in the input: " + "lapo " * 10_000
    body = {"inputs": ["Greet Kalo.", long, "", "  \n\t "],
            "params": {"max_new_tokens": 6, "do_sample": False}}
    preds = _answers(requests.post(f"{server}/invocations", json=body, timeout=120), 4)
    assert preds[2:] == ["", ""]
    _still_serving(server)


BAD_REQUESTS = {
    "malformed json": b'{"inputs": ["Greet Kalo."',
    "wrong input type": {"inputs": [1, 2]},
    "wrong param type": {"inputs": ["Greet Kalo."], "params": {"max_new_tokens": "many"}},
    "unknown param": {"inputs": ["Greet Kalo."], "params": {"max_new_token": 5}},
    "empty list": {"inputs": []},
    "too many rows": {"inputs": ["Greet Kalo."] * 257},  # serve_max_rows defaults to 256
    "oversized body": {"inputs": ["lapo " * 500_000]},  # 2.5 MB > serve_max_chars (2,000,000)
    "no room for a prompt": {"inputs": ["Greet Kalo."], "params": {"max_new_tokens": 250}},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_4xx_with_a_message(server, case):
    body = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        resp = requests.post(f"{server}/invocations", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    else:
        resp = requests.post(f"{server}/invocations", json=body, timeout=60)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:500])
    assert resp.json().get("message"), resp.text[:500]
    _still_serving(server)


@pytest.mark.timeout(300)
def test_load_8_clients(server):
    """8 concurrent clients for LOAD_SECONDS (default 30): no 5xx, every answer well-formed."""
    import statistics
    import threading

    seconds = float(os.environ.get("DOLLY_LOAD_SECONDS", "30"))
    instructions = ["Greet Kalo.", "Repeat the word bada.", "Count the words in the input.",
                    "Say hello to Mo."]
    latencies, failures, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k):
        with requests.Session() as http:
            i = 0
            while time.monotonic() < stop_at:
                batch = [instructions[(k + i + j) % 4] for j in range(1 + (k + i) % 3)]
                body = {"inputs": batch, "params": {"max_new_tokens": 8, "do_sample": i % 2 == 0}}
                t0 = time.perf_counter()
                try:
                    resp = http.post(f"{server}/invocations", json=body, timeout=120)
                    ok = resp.status_code == 200 and _well_formed(resp.json(), len(batch))
                    problem = None if ok else f"{resp.status_code}: {resp.text[:200]}"
                except requests.RequestException as e:
                    problem = repr(e)
                with lock:
                    (failures.append(problem) if problem
                     else latencies.append(time.perf_counter() - t0))
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert not failures, failures[:5]
    assert len(latencies) >= 8
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: 8 clients, {wall:.1f} s, {len(latencies)} requests, "
          f"{len(latencies) / wall:.2f} req/s, p50 {1000 * q[49]:.0f} ms, "
          f"p99 {1000 * q[98]:.0f} ms, 0 errors")


def _well_formed(payload, n):
    preds = payload.get("predictions")
    return (isinstance(preds, list) and len(preds) == n and all(isinstance(p, str) for p in preds)
            and not any(bit in p for p in preds for bit in TEMPLATE_BITS))


# --- issue 11: the registered model's contract -------------------------------------------------

GREEDY = {"max_new_tokens": 4, "do_sample": False}
RECORDS = [{"category": "open_qa", "context": "ma ko li",
            "instruction": "Count the words in the input.", "response": "three"},
           {"category": "brainstorming", "context": "", "instruction": "Greet Kalo.",
            "response": "Hello, Kalo!"},
           {"category": "closed_qa", "context": "lapo bada",
            "instruction": "Repeat the first word.", "response": "lapo"}]


@pytest.fixture(scope="module")
def in_process(tiny_model, champion):
    """`mlflow.pyfunc.load_model("models:/dolly@champion")` in this process."""
    with tracking_to(tiny_model.tracking_uri):
        return mlflow.pyfunc.load_model("models:/dolly@champion")


@pytest.mark.timeout(300)
def test_in_process_answers_instructions_with_their_contexts(in_process):
    frame = pd.DataFrame({k: [r[k] for r in RECORDS] for k in ("category", "context",
                                                              "instruction")})
    pipeline = in_process.get_raw_model()
    tok, model = pipeline.tokenizer, pipeline.model
    seen = []

    def spy(input_ids=None, attention_mask=None, **kw):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seen.append([t for t, m in zip(ids, mask) if m])
        return type(model).generate(model, input_ids=input_ids, attention_mask=attention_mask,
                                    **kw)

    model.generate = spy
    try:
        out = in_process.predict(frame, GREEDY)
    finally:
        del model.generate
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # the prompt the model saw is the training prompt of that record (dolly.prompts), token for
    # token: the ids training tokenized up to and including the response key
    key = tok.convert_tokens_to_ids(prompts.RESPONSE_KEY_NL)
    train = [tok(prompts.format_record(r["instruction"], r["context"], r["response"]),
                 add_special_tokens=False)["input_ids"] for r in RECORDS]
    assert sorted(seen) == sorted(ids[:ids.index(key) + 1] for ids in train)
    assert tok.decode(train[0][:train[0].index(key) + 1]) == (
        prompts.INTRO_WITH_INPUT + "\n\n### Instruction:\nCount the words in the input.\n\n"
        "### Input:\nma ko li\n\n### Response:\n")
    assert out == in_process.predict([{"instruction": r["instruction"], "input": r["context"]}
                                      for r in RECORDS], GREEDY)
    # by name, whatever the column order: a number as category is ignored, as context refused
    assert in_process.predict(pd.DataFrame({"category": [5], "context": ["x"],
                                            "instruction": ["Greet Kalo."]}), GREEDY) == \
        in_process.predict([{"instruction": "Greet Kalo.", "input": "x"}], GREEDY)
    with pytest.raises(mlflow.exceptions.MlflowException,
                       match=r"^row 0: input is a number, expected a string"):
        in_process.predict(pd.DataFrame({"category": ["c"], "context": [5],
                                         "instruction": ["Greet Kalo."]}), GREEDY)


def _post(server, body, **kw):
    return requests.post(f"{server}/invocations", json=body, timeout=120, **kw)


@pytest.mark.timeout(300)
def test_two_column_requests_are_answered_by_name(server, in_process):
    want = in_process.predict([{"instruction": r["instruction"], "input": r["context"]}
                               for r in RECORDS], GREEDY)
    cols = ["category", "context", "instruction", "response"]
    bodies = [
        {"dataframe_split": {"columns": cols, "data": [[r[c] for c in cols] for r in RECORDS]}},
        {"dataframe_records": RECORDS},
        {"inputs": [{"input": r["context"], "instruction": r["instruction"]} for r in RECORDS]},
        {"inputs": {"instruction": [r["instruction"] for r in RECORDS],
                    "context": [r["context"] for r in RECORDS]}},
    ]
    for body in bodies:
        assert _answers(_post(server, {**body, "params": GREEDY}), 3) == want, body
    # observable whatever the untrained model answers: which column is taken as what
    cols = ["category", "context", "instruction"]
    ok = _post(server, {"dataframe_split": {"columns": cols, "data": [[5, "x", "Greet Kalo."]]},
                        "params": GREEDY})
    assert ok.status_code == 200, ok.text[:300]  # a number as category: ignored
    bad = _post(server, {"dataframe_split": {"columns": cols, "data": [["c", 5, "Greet Kalo."]]},
                         "params": GREEDY})
    assert bad.status_code == 400
    assert bad.json()["message"].startswith("row 0: input is a number, expected a string")


@pytest.mark.timeout(300)
def test_null_and_blank_instructions_get_an_empty_answer(server):
    body = {"inputs": [None, " \t\n", "", float("nan"), "Greet Kalo."], "params": GREEDY}
    resp = _post(server, None, data=json.dumps(body),  # json.dumps writes NaN as JSON's NaN
                 headers={"Content-Type": "application/json"})
    assert _answers(resp, 5)[:4] == ["", "", "", ""]
    body = {"dataframe_records": [{"instruction": None, "input": None}, {"input": "x",
                                                                       "instruction": "\t"}]}
    assert _answers(_post(server, {**body, "params": GREEDY}), 2) == ["", ""]


REFUSED = {
    "numbers": ({"inputs": [1, 2]},
                "row 0: instruction is a number, expected a string (or null for no answer)"),
    "a boolean record": ({"dataframe_records": [{"instruction": "Greet Kalo."},
                                                {"instruction": True}]},
                         "row 1: instruction is a boolean, expected a string (or null for no answer)"),
    "a list": ({"inputs": [{"instruction": ["Greet Mo."]}]},
               "row 0: instruction is a list, expected a string (or null for no answer)"),
    "a number input": ({"inputs": [{"instruction": "Greet Mo.", "context": 3}]},
                       "row 0: input is a number, expected a string (or null for no input)"),
    "temperature 0 with sampling is greedy, negative is not": (
        {"inputs": ["Greet Kalo."], "params": {"temperature": -0.5, "do_sample": True}},
        "temperature must be a number >= 0 (0 = greedy), got -0.5"),
    "top_p above 1": ({"inputs": ["Greet Kalo."], "params": {"top_p": 1.5}},
                      "top_p must be a number from 0 to 1, got 1.5"),
    "top_p below 0": ({"inputs": ["Greet Kalo."], "params": {"top_p": -0.1}},
                      "top_p must be a number from 0 to 1, got -0.1"),
    "top_k negative": ({"inputs": ["Greet Kalo."], "params": {"top_k": -1}},
                       "top_k must be an integer >= 0 (0 = off), got -1"),
    "max_new_tokens a string": ({"inputs": ["Greet Kalo."], "params": {"max_new_tokens": "many"}},
                                'max_new_tokens must be an integer >= 1, got "many"'),
    "10 MB": ({"inputs": ["lapo " * 2_000_000]},
              "request too large: 10000000 characters of instructions and inputs, the server "
              "takes at most 2000000 per request"),
    "an unknown field": ({"input": ["Greet Kalo."]}, "the body must be a JSON object with "
                         "exactly one of ['inputs', 'instances', 'dataframe_split', "
                         "'dataframe_records'] (and optionally params)"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_are_400_with_a_short_one_line_body(server, case):
    body, message = REFUSED[case]
    resp = _post(server, body)
    assert resp.status_code == 400, (resp.status_code, resp.text[:500])
    assert resp.json() == {"error_code": "INVALID_PARAMETER_VALUE", "message": message}
    assert len(resp.content) < 400


@pytest.mark.timeout(300)
def test_error_bodies_carry_no_traceback_path_or_echo(server, tiny_model):
    bodies = [b'{"inputs": ["Greet Kalo."', b"\xff\xfe", b"[1, 2]",
              json.dumps({"dataframe_split": {"data": [[1]], "columns": ["a", "b"]}}).encode()]
    for data in bodies:
        resp = requests.post(f"{server}/invocations", data=data, timeout=60,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (resp.status_code, resp.text[:300])
        assert len(resp.content) < 400 and "Traceback" not in resp.text
        assert not re.search(r"/[\w.-]+/[\w.-]+", resp.text), resp.text
    resp = requests.post(f"{server}/invocations", data="instruction\n" + "x" * 100,
                         headers={"Content-Type": "text/csv; charset=latin-1"}, timeout=60)
    assert resp.status_code == 415 and len(resp.content) < 400
    # the detail goes to the server's log instead
    log = "".join(p.read_text() for p in tiny_model.root.glob("serve-*.log"))
    assert "refused a request (INVALID_PARAMETER_VALUE)" in log


@pytest.mark.timeout(300)
def test_a_request_without_content_type_is_a_415_naming_the_types(server):
    resp = requests.post(f"{server}/invocations", data=json.dumps({"inputs": ["Greet Kalo."]}),
                         timeout=60)
    assert resp.status_code == 415, (resp.status_code, resp.text[:300])
    assert resp.json() == {"error_code": "BAD_REQUEST", "message": (
        "no Content-Type header: send application/json, text/csv, "
        "application/vnd.apache.parquet")}
    _still_serving(server)


@pytest.mark.timeout(300)
def test_null_params_mean_the_default_and_temperature_0_is_greedy(server):
    rows = ["Greet Kalo.", "Repeat the word bada."]
    greedy = _answers(_post(server, {"inputs": rows, "params": GREEDY}), 2)
    zero = _answers(_post(server, {"inputs": rows, "params": {"max_new_tokens": 4,
                                                               "temperature": 0}}), 2)
    assert zero == greedy
    _answers(_post(server, {"inputs": rows, "params": {"max_new_tokens": 4, "do_sample": None,
                                                        "top_p": None}}), 2)


# --- issue 23: every malformed request is a 400; CSV cells are text; invisible text is blank ---

MALFORMED = {
    "nested 1,000 deep": (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                          "the body is nested too deeply: at most 32 levels of arrays and objects"),
    "an integer of 5,000 digits": (b'{"inputs": [' + b"7" * 5000 + b"]}",
                                   "the body holds an integer of 5000 digits: at most 100"),
    "a lone surrogate in an instruction": (
        b'{"inputs": ["Greet \\ud800 Kalo."]}',
        "the body is not valid Unicode text: a lone surrogate \\ud800 at character 6 of inputs[0]"),
    "a lone surrogate in a column name": (
        b'{"dataframe_split": {"columns": ["instruction", "cat\\udc00"], "data": [["a", "b"]]}}',
        "the body is not valid Unicode text: a lone surrogate \\udc00 at character 3 of "
        "dataframe_split.columns[1]"),
    "a surrogate as raw bytes": (b'{"inputs": ["a\xed\xa0\x80"]}',
                                 "the body is not valid UTF-8 (byte 14)"),
    "input named twice": (
        json.dumps({"dataframe_split": {"columns": ["instruction", "input", "input"],
                                        "data": [["Greet Kalo.", "a", "b"]]}}).encode(),
        'the column "input" is given 2 times: name each column once'),
    "a record key given twice": (
        b'{"dataframe_records": [{"instruction": "a", "instruction": "b"}]}',
        'the body gives the key "instruction" twice in one object: send each key once'),
    "a param given twice": (
        b'{"inputs": ["Greet Kalo."], "params": {"max_new_tokens": 3, "max_new_tokens": 300}}',
        'the body gives the key "max_new_tokens" twice in one object: send each key once'),
    "a float too large": (b'{"inputs": ["Greet Kalo."], "params": {"temperature": 1e999}}',
                          "the body holds a number too large for a float: 1e999"),
    "an integer param too large for 64 bits": (
        b'{"inputs": ["Greet Kalo."], "params": {"top_k": 100000000000000000000000000000}}',
        "top_k must be an integer >= 0 (0 = off), got 100000000000000000000000000000"),
    "dataframe_split rows of strings": (
        b'{"dataframe_split": {"columns": ["instruction"], "data": ["Greet Kalo."]}}',
        "dataframe_split data must be a list of rows (arrays): row 0 is a string"),
    "dataframe_records of strings": (
        b'{"dataframe_records": ["Greet Kalo."]}',
        "dataframe_records must be a list of records (objects): record 0 is a string"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_is_a_400_naming_the_fault_and_the_server_keeps_serving(server,
                                                                                   case):
    body, message = MALFORMED[case]
    resp = requests.post(f"{server}/invocations", data=body, timeout=60,
                         headers={"Content-Type": "application/json"})
    assert (resp.status_code, resp.json()) == (400, {"error_code": "INVALID_PARAMETER_VALUE",
                                                     "message": message})
    _still_serving(server)


@pytest.mark.timeout(300)
def test_malformed_input_in_process_is_an_invalid_parameter_value(in_process):
    cases = [
        (pd.DataFrame({"instruction": ["Greet \ud800 Kalo."]}, dtype=object), GREEDY,
         "row 0: instruction is not valid Unicode text (a lone surrogate \\ud800 at character 6)"),
        ([{"instruction": "Greet Kalo.", "context": "x\udfff"}], GREEDY,
         "row 0: input is not valid Unicode text (a lone surrogate \\udfff at character 1)"),
        (pd.DataFrame([["Greet Kalo.", "a", "b"]], columns=["instruction", "input", "input"]),
         GREEDY, 'the column "input" is given 2 times: name each column once'),
        (["Greet Kalo."], {"max_new_tokens": 10 ** 5000},
         "max_new_tokens must be an integer >= 1, got an integer of over 40 digits"),
        (["Greet Kalo."], {"temperature": 10 ** 400},
         "temperature must be a number >= 0 (0 = greedy), got an integer of over 40 digits"),
    ]
    for data, params, message in cases:
        with pytest.raises(mlflow.exceptions.MlflowException) as e:
            in_process.predict(data, params)
        assert (e.value.error_code, e.value.message) == ("INVALID_PARAMETER_VALUE", message)


def _csv(server, text):
    return requests.post(f"{server}/invocations", data=text.encode("utf-8"), timeout=120,
                         headers={"Content-Type": "text/csv"})


@pytest.mark.timeout(300)
def test_a_csv_request_is_text_as_the_same_records_in_json(server):
    # MLflow's own CSV parse made `0042` the number 42.0 (a 400: "input is a number") and `NA`
    # a missing value (answered "" without running the model)
    cells = ["NA,0042", "null,", "NaN,1e5", "True,NA"]
    copies = 4  # two batches of 8 rows
    resp = _csv(server, "instruction,context\n" + "".join(f"{c}\n" for c in cells) * copies
                + ",ma ko\n")
    preds = _answers(resp, len(cells) * copies + 1)
    assert preds[-1] == ""  # an empty cell is a blank instruction: "" without running the model
    # A CSV request carries no params, so the model samples (do_sample=true by default) and a
    # run may end at once ("", about 1 in 300 for the untrained tiny model). A value taken as
    # missing would be "" in every copy; each instruction got a non-empty answer in some copy.
    for k, cell in enumerate(cells):
        assert any(preds[k::len(cells)][:copies]), (cell, preds[k::len(cells)][:copies])
    resp = _csv(server, "instruction,input,input\nGreet Kalo.,a,b\n")
    assert (resp.status_code, resp.json()) == (400, {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": 'the column "input" is given 2 times: name each column once'})
    _still_serving(server)


@pytest.mark.timeout(300)
def test_invisible_instructions_are_blank_and_an_invisible_input_is_no_input(server):
    preds = _answers(_post(server, {"inputs": ["\u200b", "\ufeff\u2060", "Greet Kalo."],
                                    "params": GREEDY}), 3)
    assert preds[:2] == ["", ""]
    with_invisible = _post(server, {"inputs": [{"instruction": "Count the words in the input.",
                                                "input": "\u200b"}], "params": GREEDY})
    without = _post(server, {"inputs": [{"instruction": "Count the words in the input."}],
                             "params": GREEDY})
    assert _answers(with_invisible, 1) == _answers(without, 1)
