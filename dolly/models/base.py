"""Loading the base model a config names: the tiny GPT-J (the one pretrained on the built-in corpus,
from its cache, or randomly initialised), or a GPT-J-class model from the Hub or a folder."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPTJForCausalLM, PreTrainedModel

from dolly.config import TINY_BASE_MODEL, Config
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
    if cfg.base_model == TINY_BASE_MODEL:
        if cfg.pretrain_steps > 0:
            folder = (ensure_base(cfg, tokenizer) if pretrain_missing
                      else cached_base(cfg, tokenizer))
            if folder is None:
                raise DollyError(f"the pretrained tiny base {base_key(cfg, tokenizer)} "
                                 f"is not in {cache_root()} (the train step builds it "
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
