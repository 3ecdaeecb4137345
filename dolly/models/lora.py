"""LoRA and QLoRA adapters through peft: what trains when `finetune` is lora or qlora, how the
trained adapter is found again (its base), loaded and merged.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes each adapted
weight W (out x in) and trains B (out x r) @ A (r x in), scaled by lora_alpha / r; B starts at
zero, so the adapted model starts as the base. QLoRA (Dettmers et al. 2023) does the same on a
base stored in 4-bit NormalFloat (NF4) by bitsandbytes, computing in bf16.

An adapter folder (peft's `save_pretrained`) holds adapter_config.json and
adapter_model.safetensors; adapter_config.json's `base_model_name_or_path` names the base (a
local folder or a Hub id, with `revision`). A folder is an adapter when adapter_config.json is
in it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dolly.config import Config
from dolly.errors import ConfigError, DollyError

ADAPTER_CONFIG = "adapter_config.json"
# Written next to the adapter: the base as the train step resolved it ({"path": local folder,
# "name": what the config named, "revision": Hub commit or ""}), for the logger and the card.
BASE_REFERENCE = "base_reference.json"


def require_qlora_device(cfg: Config, cuda_available: bool) -> None:
    """Raise ConfigError (one line) when finetune=qlora cannot run: bitsandbytes' 4-bit NF4
    kernels need a CUDA GPU. Called before anything is loaded or changed on disk."""
    if cfg.finetune == "qlora" and not cuda_available:
        raise ConfigError("config key 'finetune': qlora loads the base in 4-bit NF4 with "
                          "bitsandbytes, which needs a CUDA GPU and none is visible; use "
                          "finetune=lora on CPU")


def lora_config(cfg: Config, token_ids: list[int] | None = None):
    """peft's LoraConfig for a causal LM from cfg's lora_* fields. `all-linear` is peft's rule:
    every nn.Linear (or 4-bit / 8-bit linear, GPT-2 style Conv1D) of the model except the output
    layer, found by type, so it works for any architecture. `token_ids`: embedding rows that
    train too (peft's trainable_token_indices; with tied embeddings the output rows are the
    same weights)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules.strip()
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == "all-linear"
        else [t.strip() for t in targets.split(",")],
        **({"trainable_token_indices": sorted(token_ids)} if token_ids else {}))


def control_token_ids(tokenizer, rows: int) -> list[int]:
    """The ids of the tokenizer's special tokens (the prompt format's markers: Dolly's
    `### Instruction:`, `### Response:`, `### End`, a chat template's turn tokens; bos, eos,
    pad) that have an embedding row (< `rows`), in order.

    Their rows train with the adapters: a prompt format's markers are often tokens the base never
    saw (Dolly's three are added to GPT-J's spare rows; Llama 3 base's turn tokens are
    untrained), and with a frozen embedding the model could not learn to read them or to end an
    answer. Measured on the tiny default (plain loop, lr 3e-3, 75 steps of 32 records): held-out
    loss 0.195 with these rows trainable, 0.310 without."""
    from dolly.prompts import special_token_ids

    return sorted(i for i in special_token_ids(tokenizer) if 0 <= i < rows)


def add_adapters(model, cfg: Config, tokenizer=None):
    """`model` (a transformers causal LM, loaded in 4-bit for qlora) wrapped as a peft model
    whose only trainable parameters are the LoRA matrices and, given the `tokenizer`, the
    embedding rows of its special tokens (control_token_ids); every base weight is frozen.

    Raises ConfigError when lora_target_modules names no module of this model."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.finetune == "qlora":
        # fp32 layer norms and input grads for a 4-bit base (peft's recipe for k-bit training)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers import set_seed

    check_targets(model, cfg)

    # LoRA's A matrices start random (B at zero): seeded, so that two runs of one config start
    # from the same adapter (unseeded, a rerun of the same command trained other weights).
    set_seed(cfg.seed)
    try:
        rows = model.get_input_embeddings().weight.shape[0]
        tokens = control_token_ids(tokenizer, rows) if tokenizer is not None else None
        peft_model = get_peft_model(model, lora_config(cfg, tokens))
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise ConfigError(f"config key 'lora_target_modules': {str(e).splitlines()[0]}") from None
    if cfg.gradient_checkpointing:
        # with a frozen embedding the checkpointed blocks' inputs need grads for backward
        peft_model.enable_input_require_grads()
    return peft_model


def check_targets(model, cfg: Config) -> None:
    """Raise ConfigError (one line) unless every name of lora_target_modules matches a module of
    `model` (peft's rule: the full name, or its last parts after a dot) other than the input
    embedding or the output layer. peft itself refuses only a list of which no name matches, and
    trains the rest silently."""
    targets = cfg.lora_target_modules.strip()
    if targets == "all-linear":
        return
    edges = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    modules = list(model.named_modules())
    for name in (t.strip() for t in targets.split(",")):
        hits = [m for n, m in modules if n == name or n.endswith("." + name)]
        if not hits:
            raise ConfigError(f"config key 'lora_target_modules': {name!r} names no module of "
                              f"this model ({type(model).__name__})")
        if any(id(m) in edges for m in hits):
            raise ConfigError(f"config key 'lora_target_modules': {name!r} is the model's "
                              "embedding or output layer; adapters go on the blocks' linear "
                              "layers (the special tokens' rows train anyway)")


def trainable_counts(model) -> tuple[int, int]:
    """(trainable parameter elements, all parameter elements) of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def is_adapter(folder: str | Path) -> bool:
    """True when `folder` holds a peft adapter (adapter_config.json)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def write_base_reference(folder: str | Path, base_path: str | Path, name: str,
                         revision: str = "") -> dict[str, str]:
    """Record next to an adapter which base it was trained on: the local folder the weights
    came from, the name the config gave (Hub id, folder or tiny base) and the Hub revision."""
    ref = {"path": str(Path(base_path).resolve()), "name": name, "revision": revision}
    Path(folder, BASE_REFERENCE).write_text(json.dumps(ref, indent=2))
    return ref


def base_reference(folder: str | Path) -> dict[str, str]:
    """The base an adapter folder was trained on: its BASE_REFERENCE record, else peft's
    `base_model_name_or_path` and `revision` from adapter_config.json.

    Raises DollyError when the folder is not an adapter."""
    folder = Path(folder)
    ref_file = folder / BASE_REFERENCE
    if ref_file.is_file():
        return json.loads(ref_file.read_text())
    if not is_adapter(folder):
        raise DollyError(f"{folder}: not a peft adapter (no {ADAPTER_CONFIG})")
    conf = json.loads((folder / ADAPTER_CONFIG).read_text())
    name = conf.get("base_model_name_or_path") or ""
    return {"path": name if Path(name).is_dir() else "", "name": name,
            "revision": conf.get("revision") or ""}


def resolve_base_path(ref: dict[str, str]) -> str:
    """A local folder holding the base weights of `ref`: its recorded path when that exists,
    else the Hub snapshot of name@revision in the local Hugging Face cache (downloaded when the
    Hub is reachable). Raises DollyError naming the base when neither is there."""
    if ref.get("path") and Path(ref["path"], "config.json").is_file():
        return ref["path"]
    name, revision = ref.get("name", ""), ref.get("revision") or None
    from dolly.config import TINY_BASES

    hub_id = bool(name) and not Path(name).is_absolute() and not Path(name).exists() and \
        name not in TINY_BASES and name.count("/") == 1
    if hub_id:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, revision=revision,
                                     allow_patterns=["*.json", "*.safetensors", "*.model",
                                                     "*.txt", "*.jinja"])
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DollyError(f"the adapter's base {name}@{revision or 'main'} cannot be "
                             f"loaded: {why}") from None
    raise DollyError(f"the adapter's base model folder {ref.get('path') or name!r} does not "
                     "exist here: copy the base there or log the model with merge=true")


def load_with_adapter(adapter_dir: str | Path, base_path: str | Path, dtype=None):
    """The base from `base_path` with the adapter of `adapter_dir` applied (a peft
    PeftModelForCausalLM in eval mode, not merged), as MLflow's transformers flavor loads a
    logged PEFT model. Raises DollyError when either cannot be loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype,
                                                    use_safetensors=True)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as e:
        raise DollyError(f"cannot load the adapter {adapter_dir} on its base {base_path}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()


def merge_into_base(adapter_dir: str | Path, out_dir: str | Path, dtype=None) -> dict[str, Any]:
    """Merge the adapter of `adapter_dir` into its base (W + (alpha / r) B @ A, peft's
    merge_and_unload) and save the merged model, with the adapter folder's tokenizer and
    generation config, in `out_dir` (a new folder). Returns the base reference it merged into.

    For qlora the base is loaded unquantized (in `dtype`): merging into 4-bit weights would round
    the update away."""
    from transformers import AutoTokenizer, GenerationConfig

    import torch

    ref = base_reference(adapter_dir)
    model = load_with_adapter(adapter_dir, resolve_base_path(ref), dtype)
    head = model.get_output_embeddings()
    head_bias = None
    if type(head).__name__ == "TrainableTokensWrapper":
        # peft 0.21.2 computes an LM head tied to trainable token rows as F.linear(x, W) without
        # the head's bias (GPT-J's head has one), in training and in every unmerged forward;
        # merge_and_unload keeps the bias, and the merged model answered differently (measured
        # on the tiny GPT-J: max logit difference 3.6e-3). The merged head gets the bias the
        # unmerged forward applies: its output for a zero input.
        linear = head.token_adapter.base_layer
        with torch.no_grad():
            head_bias = head(torch.zeros(1, linear.in_features, dtype=linear.weight.dtype,
                                         device=linear.weight.device))[0].clone()
    merged = model.merge_and_unload()
    out_layer = merged.get_output_embeddings()
    if head_bias is not None and getattr(out_layer, "bias", None) is not None:
        out_layer.bias.data.copy_(head_bias)
    gen = Path(adapter_dir, "generation_config.json")
    if gen.is_file():
        merged.generation_config = GenerationConfig.from_pretrained(str(adapter_dir))
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out))
    return ref
