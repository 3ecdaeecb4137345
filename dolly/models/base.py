"""Base models: the tiny GPT-J (pretrained on the built-in corpus, or randomly initialised),
or a GPT-J-class model from the Hub or a folder."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPTJConfig, GPTJForCausalLM, PreTrainedModel

from dolly.config import TINY_BASE_MODEL, Config
from dolly.errors import DollyError


def tiny_config(cfg: Config, tokenizer) -> GPTJConfig:
    """A GPTJConfig of the tiny_* sizes whose vocabulary fits `tokenizer`."""
    return GPTJConfig(
        vocab_size=len(tokenizer),
        n_positions=cfg.tiny_n_positions,
        n_embd=cfg.tiny_n_embd,
        n_layer=cfg.tiny_n_layer,
        n_head=cfg.tiny_n_head,
        rotary_dim=cfg.tiny_rotary_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Tied input/output embeddings (GPT-J 6B unties them): with a vocabulary this small the
        # tiny model learns to copy words far sooner, and it has fewer weights to train.
        tie_word_embeddings=cfg.tiny_tie_embeddings,
    )


def build_tiny(cfg: Config, tokenizer) -> GPTJForCausalLM:
    """The tiny GPT-J: same config, tokenizer and seed give bit-identical weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = GPTJForCausalLM(tiny_config(cfg, tokenizer))
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def load_base_model(cfg: Config, tokenizer, dtype: torch.dtype | None = None,
                    pretrain_missing: bool = True) -> PreTrainedModel:
    """The base model `cfg.base_model` names, its embeddings large enough for `tokenizer`.

    The tiny GPT-J with `pretrain_steps > 0` is the one pretrained on the built-in corpus, read
    from its cache (dolly.pretraining); when it is not cached yet this process pretrains it, or,
    with `pretrain_missing=False` (a training rank: pretraining belongs to one process, the train
    step's parent), raises DollyError."""
    if cfg.base_model == TINY_BASE_MODEL:
        if cfg.pretrain_steps > 0:
            from dolly import pretraining

            folder = (pretraining.ensure_base(cfg, tokenizer) if pretrain_missing
                      else pretraining.cached_base(cfg, tokenizer))
            if folder is None:
                raise DollyError(f"the pretrained tiny base {pretraining.base_key(cfg, tokenizer)} "
                                 f"is not in {pretraining.cache_root()} (the train step builds it "
                                 "before starting its ranks)")
            return GPTJForCausalLM.from_pretrained(folder, dtype=dtype)
        model = build_tiny(cfg, tokenizer)
        return model.to(dtype) if dtype is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # offline, missing folder, no safetensors: say which model
        raise DollyError(f"cannot load base model '{cfg.base_model}': {str(e).splitlines()[0]}") from None
    # GPT-J pads its embedding to 50,400 rows, which already holds Dolly's 3 extra tokens.
    weight = model.get_input_embeddings().weight
    # Under ZeRO-3 a loaded weight is an empty placeholder; ds_shape is its real shape.
    if getattr(weight, "ds_shape", weight.shape)[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model
