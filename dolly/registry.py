"""How the tuned model is packaged for MLflow (transformers flavor) and moved through the registry.

The logged model answers like Dolly: the pyfunc wraps each instruction in Dolly's no-input prompt,
stops at `### End`, and returns only the response. Generation defaults come from dolly.prompts.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from dolly import prompts
from dolly.config import Config

# What the model needs at serving time, pinned to what trained it (a logged torch model's
# inferred requirements would drag in torchvision; see the notes).
_SERVING_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate",
                     "pandas", "numpy")


def pip_requirements() -> list[str]:
    reqs = []
    for name in _SERVING_PACKAGES:
        try:
            version = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


def signature():
    """Input: instructions (strings); output: responses; params: Dolly's generation defaults."""
    from mlflow.models import infer_signature

    return infer_signature(["instruction"], ["response"], params=dict(prompts.GENERATION_DEFAULTS))


def log_model(model_dir: str | Path, cfg: Config, name: str = "model") -> str:
    """Log the saved model folder (weights + tokenizer) to the active run; returns its model URI.

    The folder is logged as is, without loading the weights: the low-memory way for a 6B model.
    """
    import mlflow

    info = mlflow.transformers.log_model(
        transformers_model=str(model_dir),
        name=name,
        task="text-generation",
        prompt_template=prompts.PROMPT_TEMPLATE,
        model_config={"return_full_text": False},
        signature=signature(),
        pip_requirements=pip_requirements(),
        metadata={"base_model": cfg.base_model, "dataset": cfg.dataset,
                  "prompt_format": "dolly-v1", "end_key": prompts.END_KEY},
    )
    return info.model_uri
