"""The unseen-word probe: the built-in task families asked about words that no text the model or
its tokenizer was trained on holds, checked against those texts, not assumed.

The held-out split already uses words no fine-tuning record uses (dolly.data.builtin_tasks), but
the probe makes the claim checkable: its words come from the probe's own part of the word space
(dolly.data.words), and every one of them is looked up in the words of

- every record of the prepared data (train and test split, and every rejected record): the
  fine-tuning text, which is also the text the corpus BPE learned from;
- every text that pretrained the tiny base (dolly.models.pretraining_texts), when the base is the
  pretrained tiny GPT-J.

A record whose words occur in any of them is never made (`builtin_tasks.generate(avoid=...)`),
and `probe_records` raises if one slipped through. Words are compared lowercased, as maximal runs
of letters (dolly.data.words.words_in).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dolly.config import Config
from dolly.data import builtin_tasks, load_prepared
from dolly.data.words import PROBE, words_in
from dolly.errors import DollyError
from dolly.models import is_pretrained_tiny, pretraining_texts

# Records of the probe: 50 per family.
PROBE_RECORDS = 300


def applies(summary: dict) -> bool:
    """Whether the prepared data (its summary.json) is the built-in families: the probe asks
    those families only."""
    return summary.get("dataset") == "builtin"


def trained_words(prepared: Path, base_cfg: Config, tok) -> set[str]:
    """The lowercase words of every record in `prepared` (train, test, rejected.jsonl) and, for
    the pretrained tiny base of `base_cfg`, of every pretraining text (paragraphs and read-back
    lines, exactly as `tok` tokenized them for pretraining)."""
    train, test, _ = load_prepared(prepared)
    words: set[str] = set()
    for frame in (train, test):
        for column in ("instruction", "input", "response", "text"):
            if column in frame.columns:
                for value in frame[column]:
                    if isinstance(value, str):
                        words |= words_in(value)
    rejected = Path(prepared) / "rejected.jsonl"
    if rejected.is_file():
        for line in rejected.read_text(encoding="utf-8").splitlines():
            if line.strip():
                words |= words_in(json.dumps(json.loads(line).get("record"), ensure_ascii=False))
    if is_pretrained_tiny(base_cfg):
        paragraphs, lines = pretraining_texts(base_cfg, tok)
        for text in (*paragraphs, *lines):
            words |= words_in(text)
    return words


def checked_against(base_cfg: Config) -> str:
    """What `trained_words` covers for `base_cfg`, in words: the pretraining text is known only
    for the tiny base pretrained here."""
    if is_pretrained_tiny(base_cfg):
        return "the fine-tuning, pretraining and tokenizer texts"
    return ("the fine-tuning and tokenizer texts (the base's own pretraining text is not known "
            "here)")


def task_words(record: dict) -> set[str]:
    """The words a built-in record's skill works on (lowercase): its words less the families'
    own wording."""
    text = " ".join(str(record.get(k) or "") for k in ("instruction", "input", "output"))
    return words_in(text) - builtin_tasks.fixed_words()


def probe_records(seed: int, trained: set[str], n: int = PROBE_RECORDS) -> pd.DataFrame:
    """`n` built-in records (columns instruction, input, response, category) whose task words
    are in none of `trained`. Raises DollyError if one is (the generator avoids them; this is
    the check)."""
    records = builtin_tasks.generate(n, seed, part=PROBE, avoid=trained)
    seen = sorted(set().union(*(task_words(r) for r in records)) & trained)
    if seen:
        raise DollyError(f"the unseen-word probe holds {len(seen)} trained words, e.g. {seen[:3]}")
    return pd.DataFrame({"instruction": [r["instruction"] for r in records],
                         "input": [r["input"] for r in records],
                         "response": [r["output"] for r in records],
                         "category": [r["category"] for r in records]})
