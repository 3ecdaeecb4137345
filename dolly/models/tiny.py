"""The tiny bases of the offline profiles, built from the config's tiny_* fields: a GPT-J (Dolly
v1's architecture; `tiny-gptj`) or a Llama (`tiny-llama`: pre-norm RMSNorm blocks, a gated SiLU
MLP, rotary positions over the whole head). A leaf module: pretraining and base loading both
build on it."""
from __future__ import annotations

import torch
from transformers import (GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM,
                          PretrainedConfig, PreTrainedModel)

from dolly.config import TINY_LLAMA, Config


def llama_intermediate(hidden: int) -> int:
    """A gated MLP's width with the parameters of a 4h MLP: 8h/3 (three h x i matrices instead of
    two h x 4h; the LLaMA paper's choice, Touvron et al. 2023, section 2), rounded up to 64."""
    return (8 * hidden // 3 + 63) // 64 * 64


def tiny_config(cfg: Config, tokenizer) -> PretrainedConfig:
    """The tiny base's transformers config (GPTJConfig or LlamaConfig) of the tiny_* sizes, its
    vocabulary fitting `tokenizer`."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if cfg.base_model == TINY_LLAMA:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.tiny_n_embd,
            intermediate_size=llama_intermediate(cfg.tiny_n_embd),
            num_hidden_layers=cfg.tiny_n_layer, num_attention_heads=cfg.tiny_n_head,
            num_key_value_heads=cfg.tiny_n_head, max_position_embeddings=cfg.tiny_n_positions,
            tie_word_embeddings=cfg.tiny_tie_embeddings, **ids)
    return GPTJConfig(
        vocab_size=len(tokenizer),
        n_positions=cfg.tiny_n_positions,
        n_embd=cfg.tiny_n_embd,
        n_layer=cfg.tiny_n_layer,
        n_head=cfg.tiny_n_head,
        rotary_dim=cfg.tiny_rotary_dim,
        # Tied input/output embeddings (GPT-J 6B unties them): with a vocabulary this small the
        # tiny model learns to copy words far sooner, and it has fewer weights to train.
        tie_word_embeddings=cfg.tiny_tie_embeddings,
        **ids,
    )


def build_tiny(cfg: Config, tokenizer) -> PreTrainedModel:
    """The tiny base: same config, tokenizer and seed give bit-identical weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    config = tiny_config(cfg, tokenizer)
    try:
        model = (LlamaForCausalLM if isinstance(config, LlamaConfig) else GPTJForCausalLM)(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model
