"""The whole pipeline (`mlflow run . -e main`: data_prep, ZeRO-3 training on 2 CPU ranks,
evaluate, register; Llama's through the Spark launcher) on a tiny randomly initialised model of
each architecture (tests/families.py: GPT-J, GPT-NeoX, Llama, Qwen2, Mistral), from a local
Hugging Face folder, with the base's own
tokenizer and `prompt_format=auto`: Dolly's format where the tokenizer has no chat template
(GPT-J, GPT-NeoX), the base's template where it has one. One dataset for all: the built-in
tasks and every conversation layout mixed in one folder. Then the registered model: it
generates from the very token ids training saw up to the last answer, and stops at the format's
end of turn."""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
import torch
from helpers import (free_port, mixed_chat_folder, mlflow_run, project_copy, runs_in,
                     tracking_to)

from dolly import generation, prompts
from dolly.data import builtin_tasks

FAMILIES = ("gptj", "gpt_neox", "llama", "qwen2", "mistral")
FORMAT = {"gptj": "dolly", "gpt_neox": "dolly", "llama": "chat_template",
          "qwen2": "chat_template", "mistral": "chat_template"}
# Embedding rows after training: the tokens a format adds fit the spare rows, none is resized
ROWS = {"gptj": 488, "gpt_neox": 512, "llama": 480, "qwen2": 512, "mistral": 600}
PARAMS = {"test_size": 0.2, "max_steps": 3, "eval_limit": 8, "eval_max_new_tokens": 4,
          "eval_batch_size": 8, "per_device_batch_size": 4, "tokenizer": "",
          "prompt_format": "auto", "max_length": 128, "eval_steps": 0}
# One family trains through the Spark launcher (a barrier job on a local session), the others
# through the DeepSpeed launcher: the ranks run the same code either way.
LAUNCHER = {"llama": {"launcher": "spark", "spark_master": "local[2]"}}
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hello, Ada!"},
                {"role": "user", "content": "What is my name?"},
                {"role": "assistant", "content": "Ada"}]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One project copy and one dataset folder (60 built-in records + every chat layout)."""
    root = tmp_path_factory.mktemp("architectures")
    data = mixed_chat_folder(root / "data")
    (data / "e_builtin.json").write_text(json.dumps(builtin_tasks.generate(60, seed=3)))
    return project_copy(root / "project"), data


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_on_each_architecture(family, family_folders, shared, tmp_path):
    project, data = shared
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {**PARAMS, "base_model": family_folders[family], "dataset": data,
              "output_dir": tmp_path / "train", "master_port": free_port(),
              **LAUNCHER.get(family, {})}
    proc = mlflow_run("main", params, uri, timeout=800, project=project)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = {r.data.tags.get("mlflow.project.entryPoint"): r for r in runs_in(uri)}
    assert {"data_prep", "train", "evaluate", "register"} <= set(runs)
    assert runs["train"].data.params.get("launcher", "deepspeed") == LAUNCHER.get(
        family, {}).get("launcher", "deepspeed")
    prep = runs["data_prep"]
    assert prep.data.metrics["records_read"] == 74
    # Dolly's format cannot hold the two multi-turn conversations; a template can
    assert prep.data.metrics["rejected_multi_turn_for_dolly"] == (
        2 if FORMAT[family] == "dolly" else 0)
    assert prep.data.metrics["rejected_prompt_tokens_differ"] == 0
    with tracking_to(uri):
        prepared = mlflow.artifacts.download_artifacts(
            f"runs:/{prep.info.run_id}/prepared", dst_path=str(tmp_path / "prepared"))
        summary = json.loads(open(f"{prepared}/summary.json").read())
        assert summary["prompt_format"] == FORMAT[family]
        model = mlflow.pyfunc.load_model("models:/dolly/1")
    served = model._model_impl
    assert served.fmt.name == FORMAT[family]
    pipe = served.pipeline
    assert pipe.model.get_input_embeddings().weight.shape[0] == ROWS[family]
    assert len(model.predict(["Say hello to Ada."])) == 1

    tok = pipe.tokenizer
    frame = pd.concat([pd.read_parquet(f"{prepared}/train.parquet"),
                       pd.read_parquet(f"{prepared}/test.parquet")])
    if FORMAT[family] == "chat_template":
        # the served model generates from the ids training saw up to the last answer
        row = frame[frame["messages"] == json.dumps(CONVERSATION, ensure_ascii=False)].iloc[0]
        start = int(row["response_start"])
        assert served.prompt_ids(messages=CONVERSATION[:-1]) == list(row["input_ids"][:start])
        conversation = CONVERSATION[:-1]
    else:
        row = frame[frame["instruction"] == "Name a color."].iloc[0]
        assert served.prompt_ids("Name a color.") == list(
            row["input_ids"][:int(row["response_start"])])
        conversation = [{"role": "user", "content": "Name a color."}]
    # generation stops at the format's end of turn: force that token and see it stop there
    end = served.fmt.end_ids(tok)[0]
    hook = pipe.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([end]), 1e4))
    try:
        run = generation.generate(pipe.model, tok, [""], fmt=served.fmt,
                                  conversations=[conversation], max_new_tokens=8)
    finally:
        hook.remove()
    g = run.generations[0]
    assert (g.response, g.stopped, g.new_tokens) == ("", True, 1)
    assert tok.convert_ids_to_tokens(end) == {
        "dolly": prompts.END_KEY, "chat_template": {"llama": "<|eot_id|>", "qwen2": "<|im_end|>",
                                                    "mistral": "</s>"}.get(family)}[FORMAT[family]]
