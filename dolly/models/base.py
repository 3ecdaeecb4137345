"""Loading the base model a config names: a tiny base (the one pretrained on the built-in corpus,
from its cache, or randomly initialised), or any causal LM from the Hub or a folder."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dolly.config import TINY_BASES, Config
from dolly.errors import DollyError
from dolly.models.pretrain import base_key, cache_root, cached_base, ensure_base
from dolly.models.tiny import build_tiny


def load_base_model(cfg: Config, tokenizer, dtype: torch.dtype | None = None,
                    pretrain_missing: bool = True) -> PreTrainedModel:
    """The base model `cfg.base_model` names, its embeddings large enough for `tokenizer`.

    The tiny GPT-J with `pretrain_steps > 0` is the one pretrained on the built-in corpus, read
    from its cache (dolly.models.pretrain); when it is not cached yet this process pretrains it, or,
    with `pretrain_missing=False` (a training rank: pretraining belongs to one process, the train
    step's parent), raises DollyError."""
    if cfg.base_model in TINY_BASES:
        if cfg.pretrain_steps > 0:
            folder = (ensure_base(cfg, tokenizer) if pretrain_missing
                      else cached_base(cfg, tokenizer))
            if folder is None:
                raise DollyError(f"the pretrained tiny base {base_key(cfg, tokenizer)} "
                                 f"is not in {cache_root()} (the train step builds it "
                                 "before starting its ranks)")
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model = build_tiny(cfg, tokenizer)
        return model.to(dtype) if dtype is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # offline, missing folder, no safetensors: say which model
        raise DollyError(f"cannot load base model '{cfg.base_model}': {str(e).splitlines()[0]}") from None
    return fit_embeddings(model, tokenizer)


def fit_embeddings(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """Grow the embedding (and an untied LM head) to `len(tokenizer)` rows only when it has
    fewer: a model whose embedding has spare rows (GPT-J 6B: 50,400 rows for 50,257 tokens,
    room for Dolly's 3 markers; Pythia: 50,688 rows) keeps its shape and uses them for the added
    tokens. New rows are initialised by transformers' `resize_token_embeddings` (the mean and
    covariance of the old rows)."""
    weight = model.get_input_embeddings().weight
    # Under ZeRO-3 a loaded weight is an empty placeholder; ds_shape is its real shape.
    if getattr(weight, "ds_shape", weight.shape)[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model
