"""`mlflow models serve -m models:/dolly@champion` over real HTTP on loopback."""
import os
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import BIN, ROOT

TEMPLATE_BITS = ("Below is an instruction", "### Instruction", "### Response", "### End")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
