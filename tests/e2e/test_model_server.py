"""`mlflow models serve -m models:/dolly@champion` over real HTTP on loopback."""
import json
import os
import re
import signal
import subprocess
import time

import mlflow
import pandas as pd
import pytest
import requests

from helpers import BIN, ROOT, TEMPLATE_BITS, free_port, tracking_to
from dolly import prompts


@pytest.fixture(scope="module")
def server(tiny_model, champion):
    port = free_port()
    log = open(tiny_model.root / f"serve-{port}.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/dolly@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=tiny_model.env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: "
                            f"{(tiny_model.root / f'serve-{port}.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /ping within 180 s")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group only
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


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
