"""Per-answer and per-family metrics of evaluation: pure functions of text and tables.

- exact_match: normalised answer == normalised reference (case, whitespace, trailing punctuation)
- rouge_l: ROUGE-L F1 (the rouge_score package, offline)
- category_metrics: the mean of each per-answer metric per task family (the split's `category`)
"""
from __future__ import annotations

import re
import string

import pandas as pd

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
