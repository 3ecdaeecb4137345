"""What the registry says about a version: its licence (from the base model's and the training
data's), the model card (the version's description: the evaluation against its base) and the
registered model's description."""
from __future__ import annotations

from dolly.config import TINY_BASES, Config
from dolly.eval.report import by_family, md_cell, what_it_shows

_LICENCE_UNKNOWN = "unknown: check the licence of the training data"
PROJECT_DATA = "project-generated data (built-in synthetic tasks, no third-party licence)"


def data_licence(dataset: str) -> str:
    """The licence the training data puts on the tuned weights (Dolly v1: CC BY-NC 4.0)."""
    d = dataset.strip().lower()
    if d == "builtin":
        return PROJECT_DATA
    if "alpaca" in d:
        return "CC BY-NC 4.0"  # Stanford Alpaca's data (OpenAI-generated): non-commercial
    if "dolly-15k" in d or "databricks-dolly" in d:
        return "CC BY-SA 3.0"
    return f"{_LICENCE_UNKNOWN} ({dataset})"


def merge_licences(existing: str | None, new: str) -> str:
    """The registered model's licence tag: every licence one of its versions carries."""
    parts = [p.strip() for p in (existing or "").split(";") if p.strip()]
    if new not in parts:
        parts.append(new)
    return "; ".join(sorted(parts))


def base_licence(base_model: str) -> str:
    """The base model's licence, where the project knows it."""
    b = base_model.strip().lower()
    if b == "tiny-gptj":
        return "none: a model initialised and pretrained by this project (no third-party weights)"
    if "gpt-j" in b or "gptj" in b:
        return "Apache-2.0 (EleutherAI's GPT-J 6B)"
    return "unknown: check the base model's own licence"


def license_note(base_model: str, dataset: str) -> str:
    """LICENSE.txt of a logged model: the licences of its base weights and of its training data
    (the tuned weights carry both; Dolly v1, tuned on Alpaca, was CC BY-NC 4.0)."""
    return "\n".join([
        "Licence information for this fine-tuned model",
        "",
        f"Base model: {base_model}",
        f"  licence: {base_licence(base_model)}",
        f"Training data: {dataset}",
        f"  licence: {data_licence(dataset)}",
        "",
        "Use of the tuned weights must respect both. Where either says 'unknown', check it with",
        "whoever provided the base model or the data before using or sharing this model.",
        "",
    ])


_CARD_METRICS = ("exact_match", "exact_match_unseen", "rouge_l", "response_perplexity",
                 "eval_loss", "stop_rate", "empty_rate")


def model_card(*, name: str, version: str, base_model: str, dataset: str, data_hash: str,
               licence: str, metrics: dict[str, float], train_run: str, eval_run: str,
               primary_metric: str, pretrain_steps: int = 0, prompt_format: str = "dolly-v1",
               weights: dict | None = None) -> str:
    """A short Markdown model card for the version description. `pretrain_steps`: how long the
    tiny base was pretrained on the built-in corpus (0: a randomly initialised base);
    `prompt_format`: what the logged model records (`dolly-v1` or `chat_template`); `weights`:
    what the logged weights are (dolly.registry.gate.logged_weights: full, merged LoRA, or a
    LoRA adapter and the base it needs)."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}"

    rows = []
    for m in _CARD_METRICS:
        b, t = metrics.get(f"base/{m}"), metrics.get(f"tuned/{m}")
        if b is None and t is None:
            continue
        rows.append(f"| {m}{' (gate)' if m == primary_metric else ''} | {fmt(b)} | {fmt(t)} |")
    n = metrics.get("eval_records")
    base, tuned = by_family(metrics, "base"), by_family(metrics, "tuned")
    family_rows = [f"| {md_cell(family)} | {fmt(base.get(family))} | {fmt(tuned.get(family))} |"
                   for family in sorted(base.keys() | tuned.keys())]
    return "\n".join([
        f"# Model card: {name}, version {version} (fine-tuned from {base_model})",
        "",
        f"Instruction-following model fine-tuned from **{base_model}** with this project's "
        + ("pipeline, in the prompt format of Databricks' Dolly v1 (Alpaca-style instruction "
           "template, stops at `### End`). " if prompt_format in ("dolly", "dolly-v1") else
           "pipeline, in its tokenizer's chat template (logged with the model; generation stops "
           "at the template's end of turn). ")
        + "It is not Databricks' Dolly model. The pyfunc takes "
        "records with an `instruction` and an optional `input` (or `context`) by column name (a "
        "string or a list of strings are instructions) and returns only the responses; "
        "generation params default to Dolly's (do_sample, top_p 0.92, top_k 0, "
        "max_new_tokens 256).",
        "",
        *([what_it_shows(base_model), ""] if base_model not in TINY_BASES or pretrain_steps > 0
          else [f"**The base is a randomly initialised {base_model}** (`pretrain_steps=0`): the "
                "base column shows an untrained model, so the comparison only shows that "
                "training happened, not that instruction tuning improved a pretrained model.",
                ""]),
        f"- Base model: {base_model}",
        f"- Weights: {weights_line(weights or {})}",
        f"- Training data: {dataset} (data hash {data_hash[:12] or 'unknown'})",
        f"- Licence: {licence}",
        f"- Train run: {train_run}; evaluation run: {eval_run}",
        "",
        f"Held-out evaluation ({int(n) if n else '?'} records, greedy decoding):",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        *rows,
        *(["", "Exact match by task family:", "", "| family | base | tuned |", "|---|---|---|",
            *family_rows] if family_rows else []),
        "",
        "Limitations: answers are only as good as the training data; not for factual or "
        "safety-critical use.",
    ])


def weights_line(weights: dict) -> str:
    """The model card's line on what the version's artifacts hold."""
    kind = weights.get("finetune", "full")
    if kind in ("lora", "qlora"):
        base = weights.get("adapter_base", "?")
        rev = weights.get("adapter_base_revision")
        return (f"a {'QLoRA' if kind == 'qlora' else 'LoRA'} adapter only (r={weights.get('lora_r')}, "
                f"alpha={weights.get('lora_alpha')}, on {weights.get('lora_target_modules')}); "
                f"loading it needs its base **{base}**{f' at revision {rev}' if rev else ''}, "
                f"read from `{weights.get('adapter_base_path', '?')}` (MLflow's "
                "`base_model_path`; `mlflow.transformers.load_model(uri, base_model_path=...)` "
                "takes another copy)")
    if "merged" in kind:
        return "full weights: a LoRA adapter merged into its base (`merge=true`)"
    return "full weights (every parameter fine-tuned)"


def registered_model_description(name: str, cfg: Config) -> str:
    """What the registered model is and how to call it (the registry's model page)."""
    return "\n".join([
        f"# {name}: an instruction-following model fine-tuned with the dolly pipeline",
        "",
        "Each version is a causal language model fine-tuned on instruction records in the prompt "
        "format of Databricks' Dolly v1 (this project reproduces that recipe; it is not "
        "Databricks' model). Its version description is a model card with the evaluation of "
        f"that version against its base model; `@{cfg.champion_alias}` is the version that "
        "passed the promotion gate.",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f"model = mlflow.pyfunc.load_model('models:/{name}@{cfg.champion_alias}')",
        "model.predict(pd.DataFrame({'instruction': ['Name a primary color.']}))",
        "```",
        "",
        f"Served: `mlflow models serve -m models:/{name}@{cfg.champion_alias} --env-manager local "
        "-h 127.0.0.1 -p 5001`, then POST `{\"inputs\": [\"...\"]}` to /invocations.",
    ])
