"""Loading the base model a config names: a tiny base (the one pretrained on the built-in corpus,
from its cache, or randomly initialised), or any causal LM from the Hub or a folder."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dolly.config import TINY_BASES, Config
from dolly.errors import DollyError
from dolly.models.pretrain import base_key, cache_root, cached_base, ensure_base
from dolly.models.tiny import build_tiny


def load_base_model(cfg: Config, tokenizer, dtype: torch.dtype | None = None,
                    pretrain_missing: bool = True, grow_embeddings: bool = True,
                    quantize_4bit: bool = False) -> PreTrainedModel:
    """The base model `cfg.base_model` names, its embeddings large enough for `tokenizer`.

    The tiny GPT-J with `pretrain_steps > 0` is the one pretrained on the built-in corpus, read
    from its cache (dolly.models.pretrain); when it is not cached yet this process pretrains it, or,
    with `pretrain_missing=False` (a training rank: pretraining belongs to one process, the train
    step's parent), raises DollyError.

    grow_embeddings=False (adapters train, the embedding stays frozen): raises DollyError
    instead of adding embedding rows that nothing would train. quantize_4bit: the weights of
    the blocks' linear layers in 4-bit NF4 with double quantization, computing in `dtype`
    (bitsandbytes, QLoRA's storage; CUDA only)."""
    if cfg.base_model in TINY_BASES:
        if cfg.pretrain_steps > 0:
            folder = (ensure_base(cfg, tokenizer) if pretrain_missing
                      else cached_base(cfg, tokenizer))
            if folder is None:
                raise DollyError(f"the pretrained tiny base {base_key(cfg, tokenizer)} "
                                 f"is not in {cache_root()} (the train step builds it "
                                 "before starting its ranks)")
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                        **_quantization(quantize_4bit, dtype))
        model = build_tiny(cfg, tokenizer)
        return model.to(dtype) if dtype is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, **_quantization(quantize_4bit, dtype))
    except Exception as e:  # offline, missing folder, no safetensors: say which model
        raise DollyError(f"cannot load base model '{cfg.base_model}': {str(e).splitlines()[0]}") from None
    if not grow_embeddings:
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise DollyError(
                f"the tokenizer has {len(tokenizer)} tokens but the base's embedding has {rows} "
                f"rows: with finetune={cfg.finetune} the embedding is frozen, so the "
                f"{len(tokenizer) - rows} new rows would never train; use finetune=full, or a "
                "prompt format that adds no tokens (chat_template on a base that has one)")
        return model
    return fit_embeddings(model, tokenizer)


def _quantization(on: bool, dtype: torch.dtype | None) -> dict:
    """from_pretrained's quantization_config for QLoRA's 4-bit NF4 base (Dettmers et al. 2023:
    NormalFloat4 with double quantization of the scales), computing in `dtype` (bf16 default)."""
    if not on:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or torch.bfloat16)}


def base_location(cfg: Config, tokenizer) -> tuple[str, str, str]:
    """(local folder, name, revision) of the base `cfg.base_model` names, what a LoRA adapter
    logged from this run refers to: the pretrained tiny base's cache folder, a local folder as
    given, or a Hub model's snapshot in the local Hugging Face cache (its folder is named after
    the commit, the revision). A randomly initialised tiny base (pretrain_steps=0) has no folder:
    it is built and cached here (dolly.models.pretrain.ensure_base).
    Raises DollyError when the base cannot be found."""
    if cfg.base_model in TINY_BASES:
        folder = ensure_base(cfg, tokenizer)
        if folder is None:
            raise DollyError("a LoRA adapter needs its base saved in a folder; the tiny base "
                             "with pretrain_steps=0 is not")
        return str(folder), cfg.base_model, ""
    if Path(cfg.base_model).is_dir():
        return str(Path(cfg.base_model).resolve()), cfg.base_model, ""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(cfg.base_model, local_files_only=True)
    except Exception as e:
        raise DollyError(f"base model '{cfg.base_model}' is not in the local Hugging Face "
                         f"cache: {str(e).splitlines()[0]}") from None
    return folder, cfg.base_model, Path(folder).name


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
