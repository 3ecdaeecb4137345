"""Completion-only batches: labels on the response and `### End` (or on every assistant turn of a
conversation and its end-of-turn token), padding masked by length.

Dolly v1 learns only what follows the response key: every label up to and including the
`### Response:\\n` token is -100, the response tokens and the closing `### End` carry labels (so
the model learns to stop). GPT-J has no pad token and pads with its eos id, and an eos id may
also occur inside a record, so padding is never found by comparing ids with the pad id: each
record's own length decides which positions are real (attention mask 1) and which are padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class CompletionCollator:
    """Right-pads a list of records into `input_ids`, `attention_mask` and `labels` tensors.

    Each feature is a mapping with `input_ids` (a sequence of ints), `response_start` (the
    index of the first token after the response key, as `dolly.data.prepare` writes it) and,
    optionally, `label_spans` (token [start, end) pairs, flattened: the tokens that carry the loss,
    every assistant turn with its end of turn; without it, `response_start` to the end).
    Calling it on n features returns `input_ids: (n, width) int64` (padded with pad_token_id),
    `attention_mask: (n, width) int64` (1 on each record's own tokens) and
    `labels: (n, width) int64` (IGNORE_INDEX = -100 up to and including the response key and on
    padding), where width is the longest record, rounded up to `pad_to_multiple_of` when set.
    Raises ValueError for a record whose `response_start` does not follow the response key
    (`response_key_id`: Dolly's format; None for a chat template, which has no such token).
    """

    pad_token_id: int
    response_key_id: int | None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        lengths = [len(x) for x in ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for row, (x, n, f) in enumerate(zip(ids, lengths, features)):
            start = int(f["response_start"])
            # The prepared data promise: the token just before the response is the response key.
            if not 0 < start <= n or (self.response_key_id is not None
                                      and x[start - 1] != self.response_key_id):
                raise ValueError(
                    f"record {row} of the batch: response_start={start} does not follow the "
                    f"response-key token (id {self.response_key_id}); is prepared/ from another "
                    "tokenizer?")
            t = torch.from_numpy(x)
            input_ids[row, :n] = t
            attention_mask[row, :n] = 1
            spans = f.get("label_spans")
            if spans is None or len(spans) == 0:
                labels[row, start:n] = t[start:]
            else:
                for a, b in zip(spans[0::2], spans[1::2]):
                    a, b = int(a), min(int(b), n)
                    labels[row, a:b] = t[a:b]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collator_for(fmt, tokenizer) -> CompletionCollator:
    """The completion collator of a prompt format (dolly.prompts.get_format) and tokenizer:
    Dolly's checks each record's response-key token; a chat template has none to check."""
    from dolly.prompts import special_ids

    key = special_ids(tokenizer)[0] if fmt.name == "dolly" else None
    return CompletionCollator(pad_token_id=tokenizer.pad_token_id, response_key_id=key)
