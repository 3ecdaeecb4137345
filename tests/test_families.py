"""The tiny model families of tests/families.py: each folder loads offline with the Auto classes,
runs, and has its family's tokenizer form (special tokens, chat template, embedding layout)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import families as F

ARCHITECTURES = {"gptj": "GPTJForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}
# (bos, eos, pad, unk, whether encode() adds bos)
SPECIALS = {
    "gptj": ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>", False),
    "gpt_neox": ("<|endoftext|>", "<|endoftext|>", "<|padding|>", "<|endoftext|>", False),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", None, None, True),
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", None, False),
    "mistral": ("<s>", "</s>", None, "<unk>", True),
}
TEXT = ("Below is an instruction that describes a task.\n\n### Instruction:\n"
        "Count the words in the input.\n\n### Input:\nmuzima  fazapifo kile\n\n"
        "### Response:\nthree words, 3 in all\n\n### End")
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "hi again"}]
RENDERED = {
    "llama": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nSay hi.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAgain?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nhi again<|eot_id|>"),
    "qwen2": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
              "<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n"
              "<|im_start|>assistant\nhi again<|im_end|>\n"),
    "mistral": "<s>[INST] Be brief.\n\nSay hi. [/INST]hi</s>[INST] Again? [/INST]hi again</s>",
}
GENERATION_PROMPT = {"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "qwen2": "<|im_start|>assistant\n", "mistral": ""}


@pytest.fixture(scope="module")
def folders(family_folders):
    return family_folders


@pytest.fixture(scope="module")
def loaded(folders):
    """{name: (tokenizer, model)} loaded once with the Auto classes, offline."""
    return {name: (AutoTokenizer.from_pretrained(folder, local_files_only=True),
                   AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval())
            for name, folder in folders.items()}


def test_families_are_the_five_architectures():
    assert F.FAMILIES == ("gptj", "gpt_neox", "llama", "qwen2", "mistral")
    with pytest.raises(ValueError, match="unknown family"):
        F.build_family("gpt2", Path("/nonexistent"), ["x"])


@pytest.mark.parametrize("name", F.FAMILIES)
def test_folder_holds_a_hub_style_checkpoint(name, folders):
    files = {p.name for p in folders[name].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert ("chat_template.jinja" in files) == (name in F.CHAT_TEMPLATES)
    assert not any(f.endswith(".bin") for f in files)
    config = json.loads((folders[name] / "config.json").read_text())
    assert config["model_type"] == name
    assert config["architectures"] == [ARCHITECTURES[name]]


@pytest.mark.parametrize("name", F.FAMILIES)
def test_loads_offline_and_runs_forward(name, loaded):
    tok, model = loaded[name]
    assert type(model).__name__ == ARCHITECTURES[name]
    cfg = model.config
    assert getattr(cfg, "n_positions", None) or cfg.max_position_embeddings >= 512
    assert sum(p.numel() for p in model.parameters()) < 500_000
    if name in ("llama", "qwen2", "mistral"):
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    if name == "gpt_neox":
        assert cfg.use_parallel_residual and cfg.rope_parameters["partial_rotary_factor"] == 0.25
    batch = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", F.FAMILIES)
def test_special_tokens_are_the_family_s(name, loaded):
    tok, model = loaded[name]
    bos, eos, pad, unk, adds_bos = SPECIALS[name]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (bos, eos, pad, unk)
    for token in (bos, eos, pad):  # whole, single ids, and the model's config agrees
        if token is not None:
            assert tok.convert_ids_to_tokens(tok.encode(token, add_special_tokens=False)) == [token]
    config_ids = (model.config.bos_token_id, model.config.eos_token_id)
    assert config_ids == (tok.bos_token_id, tok.eos_token_id)
    plain = tok.encode(TEXT, add_special_tokens=False)
    assert tok.encode(TEXT) == ([tok.bos_token_id] + plain if adds_bos else plain)
    assert 400 <= len(tok) <= 600


@pytest.mark.parametrize("name", F.FAMILIES)
def test_tokenizer_round_trips_text(name, loaded):
    tok, _ = loaded[name]
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    assert tok.decode(tok.encode(TEXT), skip_special_tokens=True) == TEXT
    # byte-level families keep any text (SentencePiece drops a leading space, as Llama 2 does)
    odd = "  tab\there, é and 日本\r\n"
    if name != "mistral":
        assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd
    else:
        assert tok.decode(tok.encode(odd.strip(" "), add_special_tokens=False)) == odd.strip(" ")


@pytest.mark.parametrize("name", F.FAMILIES)
def test_tied_or_untied_embeddings(name, folders, loaded):
    _, model = loaded[name]
    out_rows, in_rows = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    tied = out_rows.data_ptr() == in_rows.data_ptr()
    assert tied == F.TIED[name] == model.config.tie_word_embeddings
    with safe_open(folders[name] / "model.safetensors", "pt") as f:
        out_keys = [k for k in f.keys() if k.startswith(("lm_head.", "embed_out."))]
    assert bool(out_keys) != F.TIED[name]
    assert F.TIED["llama"] != F.TIED["qwen2"] == F.TIED["mistral"]  # both kinds covered


@pytest.mark.parametrize("name", F.FAMILIES)
def test_embedding_rows(name, loaded):
    tok, model = loaded[name]
    rows = model.get_input_embeddings().num_embeddings
    assert rows == model.config.vocab_size
    expected = {"gptj": len(tok) + F.GPTJ_SPARE_ROWS, "gpt_neox": -(-len(tok) // 128) * 128,
                "qwen2": -(-len(tok) // 64) * 64, "llama": len(tok), "mistral": len(tok)}[name]
    assert rows == expected


def test_gptj_has_spare_rows_for_added_tokens(folders):
    """GPT-J's embedding is larger than its tokenizer: Dolly's markers fit without a resize."""
    from dolly.tokenizer import add_dolly_tokens

    tok = AutoTokenizer.from_pretrained(folders["gptj"])
    config = json.loads((folders["gptj"] / "config.json").read_text())
    before = len(tok)
    add_dolly_tokens(tok)
    assert before < len(tok) <= config["vocab_size"]


@pytest.mark.parametrize("name", F.FAMILIES)
def test_chat_template(name, loaded):
    tok, _ = loaded[name]
    if name not in F.CHAT_TEMPLATES:
        assert tok.chat_template is None
        return
    render = lambda msgs, gen=False: tok.apply_chat_template(msgs, tokenize=False,
                                                            add_generation_prompt=gen)
    assert render(CONVERSATION) == RENDERED[name]
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with and without a system message
        for k in range(1, len(messages)):
            shorter, longer = render(messages[:k]), render(messages[:k + 1])
            assert longer.startswith(shorter)
            # and as tokens: the spans of the rendered prefixes are the spans of the whole
            short_ids = tok.encode(shorter, add_special_tokens=False)
            assert tok.encode(longer, add_special_tokens=False)[:len(short_ids)] == short_ids
            if messages[k]["role"] == "assistant":
                prompt = render(messages[:k], gen=True)
                assert prompt == shorter + GENERATION_PROMPT[name]
                assert longer.startswith(prompt)
    ids = tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True)["input_ids"]
    assert ids[:2] != [tok.bos_token_id] * 2  # the template's bos only (tokenized without adding)
    assert ids[-1] != tok.eos_token_id


def test_qwen2_adds_a_default_system_message(loaded):
    tok, _ = loaded["qwen2"]
    text = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False)
    assert text == (f"<|im_start|>system\n{F.QWEN2_DEFAULT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nSay hi.<|im_end|>\n")


def test_mistral_roles_must_alternate(loaded):
    tok, _ = loaded["mistral"]
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(CONVERSATION[1:2] * 2, tokenize=False)


def test_generation_config_stops_on_end_of_turn(folders):
    eos = {name: json.loads((folders[name] / "generation_config.json").read_text())["eos_token_id"]
           for name in F.FAMILIES}
    llama = AutoTokenizer.from_pretrained(folders["llama"])
    qwen2 = AutoTokenizer.from_pretrained(folders["qwen2"])
    assert eos["llama"] == llama.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert eos["qwen2"] == qwen2.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_build_is_deterministic(tmp_path):
    texts = F.default_texts(40, seed=1)
    a = F.build_family("mistral", tmp_path / "a", texts, seed=3)
    b = F.build_family("mistral", tmp_path / "b", texts, seed=3)
    files = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files(a) == files(b)
