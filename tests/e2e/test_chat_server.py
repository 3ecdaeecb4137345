"""The chat demo (`configs/tiny-chat.yaml`) trained and registered by `mlflow run .`, then asked
over the OpenAI API with the official `openai` client: a multi-turn conversation whose answer
is in an earlier turn, the streamed answer equal to the whole one at temperature 0, usage equal
to the chat template's token counts, the same answer as `predict` in process, and the example
docs/serving.md prints."""
from __future__ import annotations

import json
import os
import re

import mlflow
import openai
import pytest
from transformers import AutoTokenizer

from helpers import ROOT, free_port, mlflow_run, project_copy, runs_in, start_server, stop_server

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """`mlflow run . -P config=configs/tiny-chat.yaml` into a fresh store (evaluation limited to
    120 held-out records, which keeps its multi-turn family)."""
    root = tmp_path_factory.mktemp("chat_run")
    project = project_copy(root / "project")
    uri = f"sqlite:///{root}/mlflow.db"
    proc = mlflow_run("main", {"config": "configs/tiny-chat.yaml", "eval_limit": 120,
                               "master_port": free_port()}, uri, timeout=1500, project=project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, uri


@pytest.fixture(scope="module")
def chat_served(chat_run):
    from helpers import project_env

    root, uri = chat_run
    log = root / "serve.log"
    proc, url = start_server("models:/dolly@champion", project_env(uri), log)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(chat_served):
    return openai.OpenAI(base_url=chat_served + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tokenizer(chat_run):
    root, uri = chat_run
    mlflow.set_tracking_uri(uri)
    try:
        path = mlflow.artifacts.download_artifacts("models:/dolly@champion",
                                                   dst_path=str(root / "champion"))
    finally:
        mlflow.set_tracking_uri(None)
    return AutoTokenizer.from_pretrained(os.path.join(path, "components", "tokenizer"))


def docs_conversation() -> tuple[list[dict], str]:
    """The multi-turn example of docs/serving.md: (messages, the answer it prints)."""
    text = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    block = re.search(r"messages=\[\n(.*?)\]\)\nprint\(r\.choices\[0\]\.message\.content\)\s*"
                      r"# ([^\n]+)\n", text, re.S)
    assert block, "docs/serving.md has no multi-turn example"
    messages = json.loads("[" + block.group(1).strip().rstrip(",") + "]")
    return messages, block.group(2).strip()


def test_the_chat_run_learned_its_multi_turn_family(chat_run):
    _, uri = chat_run
    evaluate = next(r for r in runs_in(uri) if r.info.run_name.startswith("evaluate")
                    and "tuned/exact_match" in r.data.metrics)
    m = evaluate.data.metrics
    assert m["base/exact_match"] <= 0.05
    assert m["tuned/exact_match"] >= 0.8 and m["tuned/exact_match/recall"] >= 0.8, m


def test_a_multi_turn_answer_comes_from_an_earlier_turn(client):
    messages, answer = docs_conversation()
    assert len(messages) == 3 and answer in messages[0]["content"]
    r = client.chat.completions.create(model="dolly", messages=messages, temperature=0)
    assert r.choices[0].message.content == answer and r.choices[0].finish_reason == "stop"
    # the same question after another name: the answer follows the earlier turn
    other = [{"role": "user", "content": "My name is Kelo."},
             {"role": "assistant", "content": "Nice to meet you, Kelo!"}, messages[2]]
    assert client.chat.completions.create(model="dolly", messages=other,
                                          temperature=0).choices[0].message.content == "Kelo"
    words = [{"role": "user", "content": "zabo moss lamp"},
             {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": "What was the first word I said?"}]
    assert client.chat.completions.create(model="dolly", messages=words,
                                          temperature=0).choices[0].message.content == "zabo"


def test_stream_usage_and_predict_agree_with_the_whole_answer(client, tokenizer, chat_run):
    messages, answer = docs_conversation()
    whole = client.chat.completions.create(model="dolly", messages=messages, temperature=0)
    chunks = list(client.chat.completions.create(
        model="dolly", messages=messages, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == answer
    # usage: the chat template's tokens for the prompt (transformers' own rendering), the
    # answer and its end of turn for the completion
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    generated = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt),
                                                                          len(generated))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    _, uri = chat_run
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
    finally:
        mlflow.set_tracking_uri(None)
    local = model.predict({"messages": messages, "temperature": 0})[0]
    assert local["choices"][0]["message"]["content"] == answer
    import pandas as pd

    assert model.predict(pd.DataFrame({"messages": [messages]}),
                         params={"temperature": 0.0}) == [answer]
