"""The tiny GPT-J of the offline default, built from the config's tiny_* fields: a leaf module
(pretraining and base loading both build on it)."""
from __future__ import annotations

import torch
from transformers import GPTJConfig, GPTJForCausalLM

from dolly.config import Config


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
