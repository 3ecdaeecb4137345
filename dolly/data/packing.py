"""Packed rows: the records of a micro-batch laid end to end in a few rows, kept apart.

With `batching=packed` the Trainer draws the same random micro-batches of
`per_device_batch_size` records as `batching=random` (Dolly v1's sampler), so every optimizer
step sees the same records and the loss normalisation (the Trainer's count of labelled tokens)
is unchanged; only the tensors differ. `PackingCollator` places the records in the fewest rows
of at most `max_length` tokens (`pack_rows`), each record with its own `position_ids` starting
at 0 and its first label -100, pads the rows to the longest row, and returns no
`attention_mask`: the model's mask code (transformers' `masking_utils.find_packed_sequence_indices`)
then reads the record boundaries from the restarting positions and lets no record attend to
another. An all-ones attention mask, or a cache, would undo that silently (measured on GPT-J:
loss off by 8.6e-2), so the model must be called through `dolly.models.labelled_loss` (no mask,
no cache) and never with an attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dolly.data.collator import IGNORE_INDEX, CompletionCollator


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens.

    The number of rows is the fewest that best-fit decreasing needs (each record, longest first,
    into the fullest row it still fits; a new row when none does); the records are then spread
    over that many rows longest first into the emptiest row (Graham's LPT rule), which keeps the
    rows near equal so the padded row tensor wastes little, and kept only when every row fits
    (otherwise the best-fit rows are used). Within a row records keep their order in `lengths`.
    Deterministic. Raises ValueError for a record longer than `capacity` or of length < 1.
    """
    lengths = [int(n) for n in lengths]
    bad = [n for n in lengths if n < 1 or n > capacity]
    if bad:
        raise ValueError(f"a record of {bad[0]} tokens cannot be packed into rows of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    best: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        fits = [r for r in range(len(best)) if fill[r] + lengths[i] <= capacity]
        if fits:
            r = max(fits, key=lambda r: (fill[r], -r))
            best[r].append(i)
            fill[r] += lengths[i]
        else:
            best.append([i])
            fill.append(lengths[i])
    k = len(best)
    spread: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in order:
        r = min(range(k), key=lambda r: (load[r], r))
        spread[r].append(i)
        load[r] += lengths[i]
    rows = spread if max(load, default=0) <= capacity else best
    return [sorted(row) for row in rows]


@dataclass
class PackingCollator:
    """Packs a micro-batch's records into rows (see the module docstring).

    Features as for `CompletionCollator` (`input_ids`, `response_start`, optional
    `label_spans`); labels are exactly that collator's, record by record, with the first token
    of each record -100 (nothing before a record predicts it). Calling it on n features returns
    `input_ids: (rows, width) int64` (padded with pad_token_id), `labels: (rows, width) int64`
    (-100 on prompts, record starts and padding), `position_ids: (rows, width) int64` (0, 1, ...
    within each record; the padding tail of a row counts from 0 as a segment of its own, so it
    is apart from the records too), `num_real_tokens: () int64` and `num_records: () int64`
    (the records' tokens and count, for throughput figures; dolly.train's trainer removes both
    before the model sees the batch), where rows <= n and width <= max_length. When a record is
    longer than max_length (prepared under another max_length), that record's length is the
    row capacity of the whole micro-batch, so width is at most the longest record's, as padding
    would make it. Raises ValueError as CompletionCollator does.
    """

    pad_token_id: int
    response_key_id: int | None
    max_length: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        single = CompletionCollator(self.pad_token_id, self.response_key_id)
        lengths = [len(f["input_ids"]) for f in features]
        rows = pack_rows(lengths, max(self.max_length, *lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                one = single([features[i]])  # the record's own labels, checked as unpacked
                n = lengths[i]
                input_ids[r, at:at + n] = one["input_ids"][0]
                labels[r, at:at + n] = one["labels"][0]
                labels[r, at] = IGNORE_INDEX
                position_ids[r, at:at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "num_real_tokens": torch.tensor(int(np.sum(lengths)), dtype=torch.long),
                "num_records": torch.tensor(len(features), dtype=torch.long)}


def take_counts(batch: dict) -> tuple[Any, int, Any]:
    """(real tokens, tokens computed, records) of a collated training batch, with a packed
    batch's count keys removed from `batch` (the model must not get them). Packed
    (PackingCollator): `num_real_tokens`, `input_ids`' size, `num_records`; padded
    (CompletionCollator): the attention mask's ones, its size, its rows. The real-token and
    record counts stay 0-dim int64 tensors where the batch has them (no device sync); int()
    reads them."""
    if "num_real_tokens" in batch:
        real, records = batch.pop("num_real_tokens"), batch.pop("num_records")
        return real, batch["input_ids"].numel(), records
    mask = batch["attention_mask"]
    return mask.sum(), mask.numel(), mask.shape[0]


def packed_efficiency(lengths: Sequence[int], order: Sequence[int], batch_size: int,
                      capacity: int) -> float:
    """Real tokens / tokens computed when `order` is cut into micro-batches of `batch_size`
    records and each is packed by `pack_rows` into rows padded to its longest row."""
    lengths = np.asarray(lengths)
    order = np.asarray(order)
    real = computed = 0
    for s in range(0, len(order), batch_size):
        b = lengths[order[s:s + batch_size]]
        rows = pack_rows(b.tolist(), capacity)
        real += int(b.sum())
        computed += len(rows) * max(int(b[row].sum()) for row in rows)
    return real / computed if computed else 1.0


def train_collator_for(cfg, fmt, tokenizer):
    """The training batches' collator of a run: PackingCollator (rows of at most
    `cfg.max_length`) for `batching=packed`, else the padded CompletionCollator
    (dolly.data.collator.collator_for). Evaluation's loss always uses the padded one."""
    from dolly.data.collator import collator_for

    padded = collator_for(fmt, tokenizer)
    if cfg.batching != "packed":
        return padded
    return PackingCollator(padded.pad_token_id, padded.response_key_id, cfg.max_length)
