"""`mlflow models serve -m models:/dolly@champion` over real HTTP on loopback."""
import os
import signal
import subprocess
import time

import pytest
import requests

from conftest import BIN, ROOT, TEMPLATE_BITS, free_port


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
