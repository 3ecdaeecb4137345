import json

import pandas as pd
import pytest

from dolly import data, prompts
from dolly.config import load_config
from dolly.errors import DataError
from dolly.tokenizer import build_tokenizer, special_ids

GOOD = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"},
    {"instruction": "Add the numbers.", "input": None, "output": "4"},
    {"instruction": "Say hi.", "output": "hi"},
]


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def prepare(tmp_path, dataset, **over):
    cfg = load_config(None, {"dataset": str(dataset), "tokenizer": "gpt-j", "test_size": 1, **over})
    return data.prepare(cfg, tmp_path / "prepared", progress=False)


def rejected(tmp_path):
    return [json.loads(l) for l in (tmp_path / "prepared/rejected.jsonl").read_text().splitlines()]


def test_bad_records_are_counted_and_listed_by_line(tmp_path):
    lines = [
        GOOD[0],
        '{"instruction": "broken", "output": ',          # line 2: malformed JSON
        {"output": "no instruction"},                     # 3
        {"instruction": "no response"},                   # 4
        {"instruction": 5, "output": "x"},                # 5: non-string
        {"instruction": "   ", "output": "x"},            # 6: blank instruction
        {"instruction": "x", "output": "  \n"},           # 7: blank response
        ["not", "an", "object"],                          # 8
        {"instruction": " Name  a color. ", "input": "", "output": "Blue."},  # 9: duplicate of 1
        "",                                               # 10: blank line, not a record
        {"instruction": "Huge", "input": "", "output": "word " * 5000},      # 11: too long
        {"instruction": "Inject", "output": "a ### End b"},                   # 12: marker
        GOOD[1], GOOD[2], GOOD[3],
    ]
    result = prepare(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", lines))
    c = result.counts
    assert (c["records_read"], c["records_kept"], c["records_rejected"]) == (14, 4, 10)
    got = [(r["where"], r["reason"]) for r in rejected(tmp_path)]
    assert sorted(got) == sorted([
        ("line 2", "malformed_json"), ("line 3", "missing_instruction"),
        ("line 4", "missing_response"), ("line 5", "non_string_field"),
        ("line 6", "blank_instruction"), ("line 7", "blank_response"),
        ("line 8", "not_an_object"), ("line 9", "duplicate"), ("line 11", "too_long"),
        ("line 12", "reserved_marker")])
    for reason in ("malformed_json", "duplicate", "too_long"):
        assert c[f"rejected_{reason}"] == 1
    kept = pd.concat([result.train, result.test])
    assert sorted(kept["instruction"]) == sorted(r["instruction"] for r in GOOD)


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


def test_dolly15k_layout_csv_parquet_and_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pd.DataFrame({"instruction": ["Who wrote Hamlet?", "Summarize."], "context": ["", "Long text."],
                  "response": ["Shakespeare.", "Short."], "category": ["open_qa", "summarization"]}
                 ).to_parquet(folder / "a.parquet")
    pd.DataFrame({"instruction": ["Name a fruit.", ""], "input": ["", ""], "output": ["Apple", "x"]}
                 ).to_csv(folder / "b.csv", index=False)
    (folder / "c.json").write_text(json.dumps(GOOD[:2]))
    result = prepare(tmp_path, folder)
    c = result.counts
    assert (c["records_read"], c["records_kept"], c["rejected_blank_instruction"]) == (6, 5, 1)
    kept = pd.concat([result.train, result.test]).set_index("instruction")
    assert kept.loc["Summarize.", "input"] == "Long text."
    assert kept.loc["Summarize.", "category"] == "summarization"
    assert kept.loc["Summarize.", "text"] == prompts.format_record("Summarize.", "Long text.", "Short.")
    assert ("b.csv", "row 2") in {(r["source"].split("/")[-1], r["where"]) for r in rejected(tmp_path)}


def test_explicit_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q1?", "answer": "A1"},
                                              {"question": "Q2?", "answer": "A2"}])
    result = prepare(tmp_path, path, columns="instruction=question,response=answer")
    assert result.counts["records_kept"] == 2


def test_hub_loader_through_a_local_dataset_folder(tmp_path):
    # The Hub code path (datasets.load_dataset) on a folder laid out like a Hub dataset repo.
    repo = tmp_path / "alpaca-like"
    (repo / "data").mkdir(parents=True)
    pd.DataFrame(GOOD[:3]).to_parquet(repo / "data/train-00000-of-00001.parquet")
    result = prepare(tmp_path, f"hf:{repo}")
    assert result.counts["records_read"] == 3 and result.counts["records_kept"] == 3


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "no such file or folder"),
    (lambda p: (p / "empty.jsonl").write_text("") and p / "empty.jsonl" or p / "empty.jsonl", "file is empty"),
    (lambda p: pd.DataFrame({"a": [1], "b": [2]}).to_csv(p / "x.csv", index=False) or p / "x.csv",
     "none of the needed columns"),
    (lambda p: (p / "bad.json").write_text("[{\"a\": 1},") and p / "bad.json", "not valid JSON"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unsupported file type"),
])
def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, path)
    assert message in str(e.value) and path.name in str(e.value) and "\n" not in str(e.value)


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
