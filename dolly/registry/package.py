"""How the tuned model is packaged for MLflow: MLflow's transformers flavor, logged from the saved
folder without loading the weights, with dolly.serve.pyfunc as its pyfunc loader.

The logged model answers like Dolly: the pyfunc takes records by column name (`instruction`,
optional `input`), wraps each in Dolly's prompt, stops at `### End`, and returns only the
response. Generation defaults come from dolly.prompts; the request contract and signature from
dolly.serve.contract.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from dolly import prompts
from dolly.config import Config
from dolly.models import lora
from dolly.digests import WEIGHTS_TAG, weights_digest
from dolly.registry.card import license_note
from dolly.tracking import without_log_lines
from dolly.serve import pyfunc, signature

# What the model needs at serving time, pinned to what trained it: MLflow 3.17's inferred
# requirements for a logged torch model include torchvision, and logging fails where it is not
# installed (measured with torch 2.13.0 CPU, no torchvision).
_SERVING_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate",
                     "pandas", "numpy", "lazy_loader")


def pip_requirements(adapter: bool = False) -> list[str]:
    """`name==version` of the packages serving needs, pinned to the ones installed here; with
    `adapter`, peft too (it applies a logged LoRA adapter to its base)."""
    reqs = []
    for name in _SERVING_PACKAGES + (("peft",) if adapter else ()):
        try:
            version = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def logged_model_name(cfg: Config) -> str:
    """`dolly-<base>`: the name of the model the train step logs, after the base it was tuned
    from: the last path component of cfg.base_model (the rule of dolly.pipeline.run_name), with
    each run of characters other than letters, digits, `_` and `-` made one `-` (MLflow refuses
    `/ : . % " '` in a logged model's name). 'EleutherAI/gpt-j-6b' -> 'dolly-gpt-j-6b'."""
    short = cfg.base_model.rstrip("/").rsplit("/", 1)[-1]
    return "dolly-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", short).strip("-") or "model")


def log_model(model_dir: str | Path, cfg: Config, name: str | None = None) -> str:
    """Log the saved model folder (weights + tokenizer) to the active run as the logged model
    `name` (default `logged_model_name(cfg)`); returns its model URI (`models:/m-<id>`; the
    run's `runs:/<run id>/<name>` names it too).

    A transformers-flavor model whose pyfunc is dolly.serve.pyfunc's wrapper of MLflow's (it
    shortens too-long instructions and checks requests). The folder is logged as is, without loading the
    weights: the low-memory way for a 6B model.
    """
    import mlflow

    # MLflow's transformers flavor warns that a local folder has no Hub model card and no
    # licence; this project writes both itself (license_text here, the card at register).
    with without_log_lines("mlflow.transformers",
                           "The model card could not be retrieved from the hub",
                           "Unable to find license information"):
        info = _log(model_dir, cfg, name)
    # The weights' fingerprint: register refuses to make a second version of the same weights.
    # An adapter's is its own weights' and its base's: the same adapter on another base is
    # another model.
    digest = weights_digest(model_dir)
    if lora.is_adapter(model_dir):
        ref = lora.base_reference(model_dir)
        digest = hashlib.sha256(f"{digest}|{ref['name']}|{ref['revision']}|{ref['path']}"
                                .encode()).hexdigest()
    mlflow.set_logged_model_tags(info.model_id, {WEIGHTS_TAG: digest})
    return info.model_uri


def logged_format(model_dir: str | Path, cfg: Config) -> str:
    """The prompt format (`dolly` or `chat_template`) of the model saved in `model_dir`:
    cfg.prompt_format, with `auto` resolved by the saved tokenizer (a chat template or not)."""
    if cfg.prompt_format != "auto":
        return cfg.prompt_format
    from transformers import AutoTokenizer

    return prompts.resolve_format("auto", AutoTokenizer.from_pretrained(str(model_dir)))


def adapter_pipeline_parts(model_dir: str | Path) -> tuple[dict, dict[str, str]]:
    """What MLflow's transformers flavor logs for a LoRA adapter folder: ({"model": the peft model
    on its base, "tokenizer": ...}, the base reference). The flavor writes the adapter (peft/)
    and the tokenizer, and records the base as `base_model_path` (a local folder, loaded again
    by `mlflow.transformers.load_model` and by the pyfunc; its size is not in the artifact).

    Passing `base_model_path` matters: without it MLflow 3.17 saves the wrapped base's weights
    under peft's module names and reloads a base whose adapted layers are re-initialised
    (measured: max logit difference 0.44 to 0.62 on tiny bases), with no error."""
    from transformers import AutoTokenizer

    ref = lora.base_reference(model_dir)
    base_path = lora.resolve_base_path(ref)
    model = lora.load_with_adapter(model_dir, base_path)
    return ({"model": model, "tokenizer": AutoTokenizer.from_pretrained(str(model_dir))},
            {**ref, "path": base_path})


def _log(model_dir: str | Path, cfg: Config, name: str | None):
    from mlflow.models import Model

    fmt = logged_format(model_dir, cfg)
    transformers_model: Any = str(model_dir)
    adapter: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if lora.is_adapter(model_dir):
        transformers_model, ref = adapter_pipeline_parts(model_dir)
        extra["base_model_path"] = ref["path"]
        conf = json.loads(Path(model_dir, lora.ADAPTER_CONFIG).read_text())
        adapter = {"finetune": cfg.finetune, "adapter_base": ref["name"],
                   "adapter_base_path": ref["path"],
                   **({"adapter_base_revision": ref["revision"]} if ref["revision"] else {}),
                   "lora_r": conf.get("r"), "lora_alpha": conf.get("lora_alpha"),
                   "lora_target_modules": sorted(conf.get("target_modules") or [])
                   if isinstance(conf.get("target_modules"), (list, set)) else
                   conf.get("target_modules")}
    else:
        adapter = {"finetune": f"{cfg.finetune}, merged" if cfg.merge else "full"}
    return Model.log(
        artifact_path=None,  # MLflow 3: `name` names a logged model
        name=name or logged_model_name(cfg),
        flavor=pyfunc,
        transformers_model=transformers_model,
        **extra,
        task="text-generation",
        # the transformers flavor's own pipeline: Dolly's no-input prompt, or the chat template
        # that the logged tokenizer holds
        **({"prompt_template": prompts.PROMPT_TEMPLATE} if fmt == "dolly" else {}),
        # batch_size: without it the pipeline generates one row at a time (measured: 1.3x
        # Dolly's loop unbatched, 3.7x at 8); MLflow only accepts it at logging time.
        model_config={"return_full_text": False, "batch_size": cfg.eval_batch_size},
        signature=signature(),
        pip_requirements=pip_requirements(adapter=bool(extra)),
        # As mlflow.transformers.log_model does for a folder: checking a serving example would
        # load the whole model into memory.
        validate_serving_input=False,
        license_text=license_note(cfg.base_model, cfg.dataset),
        serving_limits={"serve_max_rows": cfg.serve_max_rows,
                        "serve_max_chars": cfg.serve_max_chars,
                        "serve_batch_wait_ms": cfg.serve_batch_wait_ms,
                        "prompt_format": fmt},
        metadata={"base_model": cfg.base_model, "dataset": cfg.dataset, **adapter,
                  "prompt_format": "dolly-v1" if fmt == "dolly" else fmt,
                  **({"end_key": prompts.END_KEY} if fmt == "dolly" else {})},
    )
