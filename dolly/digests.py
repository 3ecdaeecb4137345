"""Content digests that say "the same thing": the same evaluation set, the same weights, the same
tokenizer. Pure functions over data already in hand (no MLflow, no model loading).

Where they are used: the promotion gate compares scores only on one evaluation set
(`eval_set_digest`, recorded as the tag EVAL_SET_TAG) and never registers weights that are
already a version (`weights_digest`, the tag WEIGHTS_TAG); data_prep's content hash and the
pretrained base's cache key include `tokenizer_hash`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from dolly.errors import DollyError

WEIGHTS_TAG = "weights_sha256"
EVAL_SET_TAG = "eval_set"


def eval_set_digest(data_hash: str, test: pd.DataFrame) -> str:
    """16 hex digits naming an evaluation set: the prepared data's hash plus the exact records
    evaluated (their `text` column, the training texts, in order). Equal digests = scores on the
    same records."""
    h = hashlib.sha256(data_hash.encode())
    h.update(pd.util.hash_pandas_object(test["text"].reset_index(drop=True), index=False)
             .values.tobytes())
    return h.hexdigest()[:16]


def weights_digest(folder: str | Path) -> str:
    """sha256 (64 hex digits) over a saved model's weight files (*.safetensors, names and bytes,
    sorted by name).

    Raises DollyError when the folder holds no safetensors file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise DollyError(f"{folder}: no *.safetensors weights to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_hash(tok) -> str:
    """sha256 (64 hex digits) of a Hugging Face tokenizer's full definition: the fast backend's
    JSON (vocabulary, merges, special tokens, pre-tokenizer), else its vocabulary."""
    backend = getattr(tok, "_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
