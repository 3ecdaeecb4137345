"""Evaluation of a causal LM on the held-out split: response-token loss and generation metrics.

Loss and perplexity are measured on response tokens only (the tokens training learns; the prompt is
masked the same way), from the prepared token ids. Generation metrics come from batched greedy
decoding in Dolly's prompt format (dolly.generation):

- exact_match: normalised answer == normalised reference (case, whitespace, trailing punctuation)
- rouge_l: ROUGE-L F1 (the rouge_score package, offline)
- stop_rate: answers that ended with `### End` before the token limit
- empty_rate: answers that are empty after parsing
- response_length: mean tokens generated per answer (`### End` included)
- tokens_per_s: generation throughput over the whole batch loop
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dolly import generation
from dolly.collator import IGNORE_INDEX, CompletionCollator
from dolly.errors import DollyError
from dolly.tokenizer import special_ids

METRICS = ("eval_loss", "perplexity", "exact_match", "rouge_l", "stop_rate", "empty_rate",
           "response_length", "tokens_per_s")
_TRAILING = string.punctuation + " \t\n"


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: 'Hello, Kalo!' == 'hello, kalo'."""
    return " ".join(str(text).lower().split()).rstrip(_TRAILING).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after `normalise`, else 0.0."""
    return float(normalise(prediction) == normalise(reference))


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (0 when either has no word)."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not re.search(r"\w", prediction or "") or not re.search(r"\w", reference or ""):
        return 0.0
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)


def response_loss(model, test: pd.DataFrame, collator: CompletionCollator,
                  batch_size: int = 8) -> float:
    """Mean cross-entropy per response token, in nats: the loss training minimises.

    Batches are padded and masked by training's own collator (dolly.collator: labels -100 up to
    and including the response key and on padding, padding found by each record's length), so
    evaluation measures what training learns. `test` needs `input_ids` and `response_start`
    (as dolly.data.prepare writes them); records are cut to the model's context. Token-weighted
    over the whole split, so long and short answers count by their tokens. Raises DollyError when
    no record has a response token.
    """
    device = next(model.parameters()).device
    context = generation.context_length(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    rows = [{"input_ids": list(ids)[:context], "response_start": int(start)}
            for ids, start in zip(test["input_ids"], test["response_start"])]
    rows.sort(key=lambda r: len(r["input_ids"]))  # similar lengths together: little padding
    try:
        for b in range(0, len(rows), batch_size):
            batch = collator(rows[b:b + batch_size])
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DollyError("the test split has no response tokens to evaluate")
    return total / count


@dataclass
class ModelEval:
    """Aggregate metrics and the per-example answers of one model."""

    metrics: dict[str, float]
    examples: pd.DataFrame  # response, exact_match, rouge_l, stopped, new_tokens


def evaluate_model(model, tokenizer, test: pd.DataFrame, *, max_new_tokens: int,
                   batch_size: int) -> ModelEval:
    """Every metric of METRICS for one model on `test` (a prepared split)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CompletionCollator(pad_token_id=pad_id, response_key_id=special_ids(tokenizer)[0])
    loss = response_loss(model, test, collator, batch_size)
    inputs = [i if isinstance(i, str) else None for i in test["input"]]
    run = generation.generate(model, tokenizer, list(test["instruction"]), inputs,
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    gens = run.generations
    refs = list(test["response"])
    ex = pd.DataFrame({
        "response": [g.response for g in gens],
        "exact_match": [exact_match(g.response, r) for g, r in zip(gens, refs)],
        "rouge_l": [rouge_l(g.response, r) for g, r in zip(gens, refs)],
        "stopped": [g.stopped for g in gens],
        "new_tokens": [g.new_tokens for g in gens],
    })
    n = max(len(gens), 1)
    metrics = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),  # capped: an untrained model's exp(loss) overflows
        "exact_match": float(ex["exact_match"].mean()) if len(ex) else 0.0,
        "rouge_l": float(ex["rouge_l"].mean()) if len(ex) else 0.0,
        "stop_rate": sum(g.stopped for g in gens) / n,
        "empty_rate": sum(not g.response for g in gens) / n,
        "response_length": sum(g.new_tokens for g in gens) / n,
        "tokens_per_s": run.tokens_per_s,
        "generation_s": run.seconds,
    }
    return ModelEval(metrics, ex)


FAMILY_METRICS = ("exact_match", "rouge_l")


def category_metrics(test: pd.DataFrame, ex: pd.DataFrame) -> dict[str, float]:
    """{'<metric>/<family>': mean over the family's records} for exact_match and rouge_l, per task
    family (the split's `category`; records without one are left out; none when the split has no
    `category` column). Family names are made metric-safe ('open qa' stays, 'a&b' -> 'a_b')."""
    if "category" not in test.columns:
        return {}
    cats = test["category"].fillna("").astype(str).to_numpy()
    out = {}
    for metric in FAMILY_METRICS:
        values = ex[metric].to_numpy()
        for cat in sorted(set(cats) - {""}):
            out[f"{metric}/{_metric_safe(cat)}"] = float(values[cats == cat].mean())
    return out


def _metric_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:100] or "_"


def select(test: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The first `limit` test records (0 = all): a fixed subset, the same on every run."""
    return test.head(limit).reset_index(drop=True) if limit > 0 else test.reset_index(drop=True)


def device() -> torch.device:
    """The device evaluation runs on: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(dev: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU (as training's 'auto')."""
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_folder(local: Path) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) inside a downloaded transformers-flavor model or a
    plain saved-model folder."""
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        import yaml

        spec: dict[str, Any] = yaml.safe_load(mlmodel.read_text()) or {}
        flavor = (spec.get("flavors") or {}).get("transformers") or {}
        weights = local / flavor.get("model_binary", "model")
        tok = local / "components" / "tokenizer"
        if not (tok / "tokenizer_config.json").is_file():
            tok = weights
        if (weights / "config.json").is_file():
            return weights, tok
        raise DollyError(f"{local}: an MLflow model without transformers weights (no {weights.name}/config.json)")
    if (local / "config.json").is_file():
        return local, local
    raise DollyError(f"{local}: neither an MLflow transformers model nor a saved model folder")


def logged_run_id(local: Path) -> str | None:
    """The run that logged a downloaded MLflow model (the train run), if it says."""
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return None
    import yaml

    return (yaml.safe_load(mlmodel.read_text()) or {}).get("run_id") or None


def base_config(cfg, train_params: dict[str, str]):
    """`cfg` with the base-model fields (Config fields declared `base=True`) that the train run
    logged: evaluating a model always compares it with the base *it* was trained from, even when
    evaluate runs with other settings. Returns (config, {field: value that differed})."""
    import dataclasses

    from dolly.config import fields_where, parse_value
    from dolly.errors import ConfigError

    changes = {}
    for name in fields_where(base=True):
        if name in train_params:
            try:
                value = parse_value(name, train_params[name])
            except ConfigError:
                continue
            if value != getattr(cfg, name):
                changes[name] = value
    return (dataclasses.replace(cfg, **changes) if changes else cfg), changes
