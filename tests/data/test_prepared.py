"""dolly.data.prepared: tokenizing with the length policy, the seeded split, the content hash, and
what prepared/ holds (also after a failed prepare)."""
import json

import pandas as pd
import pytest

from helpers import GOOD, prepare, rejected, write_jsonl
from dolly import data
from dolly.config import load_config
from dolly.data.validation import REASONS
from dolly.errors import DataError
from dolly.prompts import special_ids
from dolly.tokenizer import build_tokenizer


def test_truncate_policy_keeps_prompt_response_key_and_end(tmp_path):
    long = {"instruction": "Write a lot.", "input": "", "output": "word " * 400}
    result = prepare(tmp_path, write_jsonl(tmp_path / "l.jsonl", [long] + GOOD),
                     too_long="truncate", max_length=64)
    df = pd.concat([result.train, result.test])
    row = df[df.instruction == "Write a lot."].iloc[0]
    tok = build_tokenizer(load_config(None, {"tokenizer": "gpt-j"}))
    resp, end = special_ids(tok)
    ids = list(row.input_ids)
    assert row.truncated and len(ids) == 64
    assert ids[row.response_start - 1] == resp and ids[-1] == end
    assert result.counts["records_truncated"] == 1 and result.counts["records_rejected"] == 0


def test_every_kept_record_has_its_response_key(tmp_path):
    result = prepare(tmp_path, write_jsonl(tmp_path / "g.jsonl", GOOD))
    tok = build_tokenizer(load_config(None, {"tokenizer": "gpt-j"}))
    resp, end = special_ids(tok)
    assert (len(result.train), len(result.test)) == (3, 1)
    for df in (result.train, result.test):
        for ids, start, text in zip(df.input_ids, df.response_start, df.text):
            assert list(ids).count(resp) == 1 and ids[start - 1] == resp and ids[-1] == end
            assert tok.decode(ids) == text


def test_split_is_seeded_and_deterministic():
    a = data.split_indices(100, 0.2, seed=3)
    b = data.split_indices(100, 0.2, seed=3)
    c = data.split_indices(100, 0.2, seed=4)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[1] == c[1]).all()
    assert len(a[1]) == 20 and sorted([*a[0], *a[1]]) == list(range(100))
    assert len(data.split_indices(100, 7, seed=3)[1]) == 7
    assert len(data.split_indices(100, 99, seed=3)[0]) == 1
    # a count that leaves nothing to train on is an error, not silently one record fewer
    with pytest.raises(DataError, match="test_size=100 asks for 100 held-out records but there "
                                        "are only 100 valid records"):
        data.split_indices(100, 100, seed=3)


def test_alpaca_sample_fixture_prepares(tmp_path, alpaca_sample):
    result = prepare(tmp_path, alpaca_sample, test_size=0.25)
    assert result.counts["records_kept"] == 16 and len(result.test) == 4
    assert len(result.data_hash) == 64
    for name in ("train.parquet", "test.parquet", "rejected.jsonl", "summary.json", "lengths.png",
                 "config.yaml", "tokenizer/tokenizer_config.json"):
        assert (tmp_path / "prepared" / name).exists(), name


def test_content_hash_changes_with_data_and_config(tmp_path, alpaca_sample):
    h1 = prepare(tmp_path / "a", alpaca_sample).data_hash
    h2 = prepare(tmp_path / "b", alpaca_sample).data_hash
    h3 = prepare(tmp_path / "c", alpaca_sample, max_length=200).data_hash
    assert h1 == h2 != h3


def test_a_failed_prepare_still_writes_its_counts_and_rejections(tmp_path):
    lines = [{"instruction": "a", "output": "b <|endoftext|>"}, '{"instruction": "x",',
             {"instruction": "Name a color.", "output": "Blue."}]
    with pytest.raises(data.PrepareFailed) as e:
        prepare(tmp_path, write_jsonl(tmp_path / "few.jsonl", lines))
    assert str(e.value) == ("only 1 valid record(s): need at least 2 to make a train/test split "
                            "(2 rejected: see prepared/rejected.jsonl)")
    assert e.value.counts == {"records_read": 3, "records_kept": 1, "records_rejected": 2,
                              **{f"rejected_{r}": 0 for r in REASONS},
                              "rejected_reserved_marker": 1, "rejected_malformed_json": 1}
    assert [(r["where"], r["reason"]) for r in rejected(tmp_path)] == [
        ("line 1", "reserved_marker"), ("line 2", "malformed_json")]
    summary = json.loads((tmp_path / "prepared/summary.json").read_text())
    assert summary["counts"] == e.value.counts and summary["error"].startswith("only 1 valid")
