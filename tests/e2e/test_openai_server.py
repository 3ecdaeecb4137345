"""The official `openai` client against `mlflow models serve -m models:/dolly@champion` over real
HTTP: chat (plain and streamed), completions, models, usage from the tokenizer, every refusal
as the client's typed error, a deadline, an abandoned stream. The tiny champion (Dolly's format,
untrained) answers deterministically at temperature 0; tests/e2e/test_chat_server.py asks a
trained chat model a multi-turn question."""
import os
import re
import time

import mlflow
import openai
import pytest
import requests
from transformers import AutoTokenizer

from helpers import start_server, stop_server, tracking_to
from dolly import prompts

TIMEOUT_S = 6  # the server's request timeout (-t): the 504 test outlives it


@pytest.fixture(scope="module")
def served(tiny_model, champion):
    log = tiny_model.root / "openai-serve.log"
    proc, url = start_server("models:/dolly@champion", tiny_model.env(), log, TIMEOUT_S)
    try:
        yield url, log
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model, champion):
    """The registered model's own tokenizer, as logged."""
    with tracking_to(tiny_model.tracking_uri):
        path = mlflow.artifacts.download_artifacts("models:/dolly@champion",
                                                   dst_path=str(tiny_model.root / "oa-model"))
    return AutoTokenizer.from_pretrained(os.path.join(path, "components", "tokenizer"))


Q = "Say hello to Mo."
GREEDY = {"temperature": 0, "max_tokens": 12}
# The untrained champion's greedy answers are blank (it repeats tokens that decode to
# whitespace); a seeded sample is text, the same on every path (seed is honoured).
SEEDED = {"temperature": 1, "seed": 7, "max_tokens": 12}


def test_a_chat_completion_with_usage_from_the_tokenizer(client, tokenizer):
    r = client.chat.completions.create(model="dolly", messages=[{"role": "user", "content": Q}],
                                       **GREEDY)
    assert r.object == "chat.completion" and r.model == "dolly" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    prompt = tokenizer(prompts.format_prompt(Q), add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(prompt)
    # the untrained champion does not stop by itself: it writes max_tokens tokens
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 12)
    assert r.usage.total_tokens == len(prompt) + 12


@pytest.mark.parametrize("settings", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_streamed_chat_adds_up_to_the_same_answer(client, settings):
    whole = client.chat.completions.create(
        model="dolly", messages=[{"role": "user", "content": Q}], **settings)
    chunks = list(client.chat.completions.create(
        model="dolly", messages=[{"role": "user", "content": Q}], stream=True,
        stream_options={"include_usage": True}, **settings))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    if settings is SEEDED:  # text as it is generated, not one piece at the end
        assert len(pieces) > 1 and len(whole.choices[0].message.content) > 5
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_a_completion_and_the_model_list(client, served):
    r = client.completions.create(model="dolly", prompt=Q, **SEEDED)
    chat = client.chat.completions.create(model="dolly",
                                          messages=[{"role": "user", "content": Q}], **SEEDED)
    assert r.object == "text_completion" and r.choices[0].text == chat.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["dolly"]
    assert client.models.retrieve("dolly").id == "dolly"


def test_the_openai_route_answers_as_predict_in_process(client, tiny_model, served):
    """At temperature 0 the served answer is `mlflow.pyfunc` predict's, for the same request
    and for the instruction itself; /invocations takes the chat request too."""
    messages = [{"role": "user", "content": "Count the words in the input."}]
    with tracking_to(tiny_model.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    for settings in (GREEDY, SEEDED):
        served_answer = client.chat.completions.create(model="dolly", messages=messages,
                                                       **settings).choices[0].message.content
        local = model.predict({"messages": messages, **settings})
        assert local[0]["choices"][0]["message"]["content"] == served_answer
        r = requests.post(served[0] + "/invocations", json={"messages": messages, **settings},
                          timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == served_answer
    assert len(served_answer) > 5  # the seeded one: text
    assert model.predict([messages[0]["content"]],
                         params={"temperature": 0.0, "max_new_tokens": 12}) == [
        client.chat.completions.create(model="dolly", messages=messages,
                                       **GREEDY).choices[0].message.content]


U = [{"role": "user", "content": Q}]


@pytest.mark.parametrize("kw, error, param", [
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, openai.BadRequestError,
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, openai.BadRequestError,
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, openai.BadRequestError,
     "messages[0].content"),
    ({"messages": [*U, {"role": "assistant", "content": "Hi"}]}, openai.BadRequestError,
     "messages"),
    ({"messages": U, "temperature": 2.1}, openai.BadRequestError, "temperature"),
    ({"messages": U, "temperature": -1}, openai.BadRequestError, "temperature"),
    ({"messages": U, "top_p": 0}, openai.BadRequestError, "top_p"),
    ({"messages": U, "top_p": 1.01}, openai.BadRequestError, "top_p"),
    ({"messages": U, "max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"messages": U, "max_tokens": 256}, openai.BadRequestError, "max_tokens"),  # context 256
    ({"messages": U, "n": 9}, openai.BadRequestError, "n"),
    ({"messages": U, "model": "gpt-4o"}, openai.NotFoundError, "model"),
])
def test_each_refusal_is_the_clients_typed_error(client, served, kw, error, param):
    with pytest.raises(error) as e:
        client.chat.completions.create(**{"model": "dolly", **kw})
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert body["type"] == "invalid_request_error"
    assert "Traceback" not in body["message"] and not re.search(r"/\w+/", body["message"])
    assert e.value.status_code == (404 if error is openai.NotFoundError else 400)
    assert requests.get(served[0] + "/ping", timeout=5).status_code == 200


def test_a_body_over_the_limit_is_a_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(
            model="dolly", messages=[{"role": "user", "content": "x" * 9_000_000}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_malformed_json_is_a_400_in_openai_shape(served):
    r = requests.post(served[0] + "/v1/chat/completions", data=b'{"model": "dolly", "messa',
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("the body is not valid JSON")
    r = requests.post(served[0] + "/v1/embeddings", json={"model": "dolly", "input": "x"},
                      timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = requests.get(served[0] + "/v1/chat/completions", timeout=10)
    assert (r.status_code, r.json()["error"]["message"], r.headers["allow"]) == (
        405, "GET is not allowed on /v1/chat/completions: use POST", "POST")


def test_past_the_deadline_is_a_504_and_the_server_stops_working_on_it(client, served):
    """A request far beyond the server's -t: the client gets a 504 in OpenAI's shape, and the
    next request is answered at once (the rows were dropped, not left running)."""
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="dolly", prompt=["Write about lamps."] * 64, n=8,
                                  temperature=1, max_tokens=200)
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert time.monotonic() - t0 < TIMEOUT_S + 2
    t1 = time.monotonic()
    client.chat.completions.create(model="dolly", messages=U, **GREEDY)
    assert time.monotonic() - t1 < 3


def test_an_abandoned_stream_stops_generating(served):
    url, log = served
    body = {"model": "dolly", "messages": [{"role": "user", "content": "Write about lamps."}],
            "temperature": 1, "max_tokens": 200, "n": 8, "stream": True}
    with requests.post(url + "/v1/chat/completions", json=body, timeout=30, stream=True) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith(b"data: ")
    # the client has closed the connection after its first event
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.findall(r"stopped chatcmpl-\w+ after (\d+) of at most 200 new tokens: the "
                           r"client went away", log.read_text())
        if found:
            assert int(found[-1]) < 200
            return
        time.sleep(0.5)
    pytest.fail("the server did not stop the abandoned stream: " + log.read_text()[-2000:])
