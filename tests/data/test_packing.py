"""Packed rows (dolly/data/packing.py): which records share a row, and the exact tensors a row
holds (labels, restarting positions, padding), as literals."""
import numpy as np
import pytest
import torch

from dolly.data.collator import IGNORE_INDEX, CompletionCollator
from dolly.data.packing import PackingCollator, pack_rows, packed_efficiency

pytestmark = pytest.mark.timeout(60)
X = IGNORE_INDEX
RESP, PAD = 7, 0


def rec(ids, start, spans=None):
    f = {"input_ids": ids, "response_start": start}
    if spans is not None:
        f["label_spans"] = spans
    return f


def test_rows_are_the_fewest_that_fit_and_near_equal():
    # 7 records, 23 tokens, rows of 10: best fit needs 3 rows; spread longest first into the
    # emptiest row: 6 -> r0, 5 -> r1, 4 -> r2, 3 -> r2 (7), 2 -> r1 (7), 2 -> r0 (8), 1 -> r1 (8)
    assert pack_rows([6, 2, 5, 1, 4, 3, 2], 10) == [[0, 6], [1, 2, 3], [4, 5]]
    assert pack_rows([10, 10, 10], 10) == [[0], [1], [2]]
    assert pack_rows([3], 10) == [[0]]
    assert pack_rows([], 10) == []


def test_rows_fall_back_to_best_fit_when_spreading_overflows():
    # [9, 5, 5, 1] in 10: best fit needs 2 rows; spread longest first: 9 | 5, 5 -> r1 (10),
    # 1 -> r0 (10): every row fits, so the spread rows are kept
    assert pack_rows([9, 5, 5, 1], 10) == [[0, 3], [1, 2]]
    # [4, 5, 3, 4, 3, 1, 10] in 10: best fit needs 3 rows (10 | 4+5+1 | 3+4+3); spread longest
    # first into the emptiest row: 10 | 5+3+3 | 4+4+1, and 11 > 10, so best fit's rows are used
    assert pack_rows([4, 5, 3, 4, 3, 1, 10], 10) == [[6], [0, 1, 5], [2, 3, 4]]


def test_a_record_longer_than_a_row_is_refused_by_pack_rows():
    with pytest.raises(ValueError, match="a record of 11 tokens cannot be packed into rows of 10"):
        pack_rows([3, 11], 10)


def test_a_packed_row_literally():
    a = rec([1, 2, RESP, 3, 4], 3)          # response 3, 4
    b = rec([5, RESP, 6], 2)                # one-token response
    c = rec([8, 9, 10, RESP, 11, 12], 4)    # response 11, 12
    batch = PackingCollator(PAD, RESP, max_length=8)([a, b, c])
    # 14 tokens in rows of 8: 2 rows; c (6) -> r0, a (5) -> r1, b (3) -> r1 (8)
    assert batch["input_ids"].tolist() == [[8, 9, 10, RESP, 11, 12, PAD, PAD],
                                           [1, 2, RESP, 3, 4, 5, RESP, 6]]
    assert batch["labels"].tolist() == [[X, X, X, X, 11, 12, X, X],
                                        [X, X, X, 3, 4, X, X, 6]]
    # positions restart at each record; the padding tail counts from 0 as a segment of its own
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1],
                                              [0, 1, 2, 3, 4, 0, 1, 2]]
    assert "attention_mask" not in batch
    assert batch["num_real_tokens"].item() == 14 and batch["num_records"].item() == 3


def test_labels_are_each_records_own_and_a_labelled_record_start_is_masked():
    # a conversation record whose label span starts at its first token: packed, that token has
    # nothing before it in its record, so its label is -100 (the row's previous record must not
    # learn to predict it)
    conv = rec([20, 21, 22, 23], 1, spans=[0, 2, 3, 4])
    plain = rec([30, 31, RESP, 32], 3)
    batch = PackingCollator(PAD, None, max_length=16)([plain, conv])
    alone = CompletionCollator(PAD, None)([conv])["labels"][0].tolist()
    assert alone == [20, 21, X, 23]
    assert batch["labels"].tolist() == [[X, X, X, 32, X, 21, X, 23]]


def test_a_record_longer_than_max_length_gets_a_row_of_its_own():
    long = rec(list(range(1, 11)), 5)
    short = rec([1, RESP, 2], 2)
    batch = PackingCollator(PAD, None, max_length=8)([long, short])
    assert batch["input_ids"].shape == (2, 10)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]


def test_a_record_whose_response_does_not_follow_the_key_is_refused_as_unpacked():
    with pytest.raises(ValueError, match="does not follow the response-key token"):
        PackingCollator(PAD, RESP, max_length=8)([rec([1, 2, 3], 2)])


def test_packed_efficiency_counts_the_row_tensor():
    # micro-batches of 3: [4, 4, 4] in rows of 8 -> 2 rows of width 8 (12 / 16);
    # [2, 2] -> one row of 4 (4 / 4)
    assert packed_efficiency([4, 4, 4, 2, 2], np.arange(5), 3, 8) == pytest.approx(16 / 20)
    assert packed_efficiency([], [], 3, 8) == 1.0


def test_the_collated_rows_hold_every_token_once():
    rng = np.random.default_rng(0)
    feats = []
    for n in rng.integers(3, 40, size=16):
        start = int(rng.integers(1, n))
        ids = rng.integers(1, 100, size=n).tolist()
        feats.append(rec(ids, start))
    batch = PackingCollator(PAD, None, max_length=64)(feats)
    starts = (batch["position_ids"] == 0).nonzero().tolist()
    got = []
    for r, c in starts:
        row = batch["position_ids"][r]
        end = c + 1
        while end < row.numel() and row[end] != 0:
            end += 1
        got.append(batch["input_ids"][r, c:end].tolist())
    want = [f["input_ids"] for f in feats]
    assert sorted(g for g in got if g in want) == sorted(want)
    assert int(batch["num_real_tokens"]) == sum(len(w) for w in want)
    assert torch.all(batch["position_ids"] < 64)
