import json

import pandas as pd
import pytest

from conftest import FIXTURES
from dolly import data, prompts, readers
from dolly.config import load_config
from dolly.errors import DataError
from dolly.tokenizer import build_tokenizer, load_tokenizer, special_ids

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
    assert len(data.split_indices(100, 99, seed=3)[0]) == 1
    # a count that leaves nothing to train on is an error, not silently one record fewer
    with pytest.raises(DataError, match="test_size=100 asks for 100 held-out records but there "
                                        "are only 100 valid records"):
        data.split_indices(100, 100, seed=3)


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


# --- instruction data as people really have it (issue 13) --------------------------------------

CASES = FIXTURES / "data_cases"
NO_INPUT_RED = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\nName a primary color.\n\n"
                "### Response:\nRed.\n\n### End")


def counts_of(result):
    c = result.counts
    return (c["records_read"], c["records_kept"],
            {k[len("rejected_"):]: v for k, v in c.items() if k.startswith("rejected_") and v})


def text_of(result, instruction):
    kept = pd.concat([result.train, result.test]).set_index("instruction")
    return kept.loc[instruction, "text"]


def test_utf8_bom_before_the_first_record(tmp_path):
    result = prepare(tmp_path, CASES / "bom.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED
    assert result.summary["files"][0]["encoding"] == "utf-8-sig"


def test_nan_input_means_no_input(tmp_path):
    result = prepare(tmp_path, CASES / "nan.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED


def test_nan_where_required_and_infinity_are_rejected_by_the_usual_rules(tmp_path):
    lines = ['{"instruction": NaN, "output": "x"}', '{"instruction": "a", "output": NaN}',
             '{"instruction": "b", "input": Infinity, "output": "x"}',
             '{"instruction": "c", "output": -Infinity}', '{"instruction": "d", "output": "y"}',
             '{"instruction": "e", "input": NaN, "output": "z"}']
    result = prepare(tmp_path, write_jsonl(tmp_path / "n.jsonl", lines))
    assert counts_of(result) == (6, 2, {"missing_instruction": 1, "missing_response": 1,
                                        "non_string_field": 2})
    assert [(r["where"], r["reason"]) for r in rejected(tmp_path)] == [
        ("line 1", "missing_instruction"), ("line 2", "missing_response"),
        ("line 3", "non_string_field"), ("line 4", "non_string_field")]
    # rejected.jsonl is strict JSON (bare Infinity is not): a non-finite number is its name
    lines = (tmp_path / "prepared/rejected.jsonl").read_text().splitlines()
    strict = [json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c}")) for l in lines]
    assert [r["record"] for r in strict[2:]] == [
        {"instruction": "b", "input": "Infinity", "output": "x"},
        {"instruction": "c", "output": "-Infinity"}]


def test_json_array_under_a_jsonl_name(tmp_path):
    assert len((CASES / "array.jsonl").read_text().splitlines()) == 42
    result = prepare(tmp_path, CASES / "array.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert result.summary["files"][0]["format"] == "json"
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED


def test_mixed_layouts_are_mapped_per_record(tmp_path):
    result = prepare(tmp_path, CASES / "mixed_layout.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert result.summary["layouts"] == {"alpaca": 4, "dolly-15k": 4}
    assert text_of(result, "Capitalize the word.") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nCapitalize the word.\n\n### Input:\nparis\n\n### Response:\nParis\n\n"
        "### End")
    kept = pd.concat([result.train, result.test]).set_index("instruction")
    assert kept.loc["Capitalize the word.", "category"] == "open_qa"


def test_explicit_columns_still_win_over_the_layouts(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"instruction": "ignored", "question": "Q1?", "output": "ignored", "answer": "A1"},
        {"question": "Q2?", "answer": "A2"}, {"question": "Q3?", "output": "no answer"}])
    result = prepare(tmp_path, path, columns="instruction=question,response=answer")
    assert counts_of(result) == (3, 2, {"missing_response": 1})
    assert result.summary["layouts"] == {"columns": 2}
    assert sorted(pd.concat([result.train, result.test])["response"]) == ["A1", "A2"]


def test_cp1252_bytes_are_rejected_never_replaced(tmp_path):
    result = prepare(tmp_path, CASES / "cp1252.jsonl", test_size=2)
    assert counts_of(result) == (8, 5, {"encoding": 3})
    rej = rejected(tmp_path)
    assert [(r["where"], r["reason"]) for r in rej] == [
        ("line 1", "encoding"), ("line 2", "encoding"), ("line 3", "encoding")]
    assert rej[0]["record"] == ('{"instruction": "Translate to French: How are you? Very well.", '
                                '"input": "", "output": "Bonjour, \\xe7a va ? Tr\\xe8s bien."}')
    kept = pd.concat([result.train, result.test])
    assert not kept["text"].str.contains("\ufffd").any()


@pytest.mark.parametrize("tokenizer", ["corpus-bpe", "gpt-j"])
def test_endoftext_text_in_a_response_is_a_reserved_marker(tmp_path, tokenizer):
    result = prepare(tmp_path, CASES / "endoftext.jsonl", test_size=2, tokenizer=tokenizer)
    assert counts_of(result) == (8, 6, {"reserved_marker": 2})
    assert [(r["where"], r["reason"]) for r in rejected(tmp_path)] == [
        ("line 7", "reserved_marker"), ("line 8", "reserved_marker")]
    tok = load_tokenizer(str(tmp_path / "prepared/tokenizer"))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for ids in pd.concat([result.train, result.test])["input_ids"]:
        assert eos not in list(ids)
    # Not only Dolly's markers: every control text of the tokenizer is reserved.
    assert "<|endoftext|>" in data.control_texts(tok)


def test_marker_formed_across_a_field_edge_is_reserved(tmp_path):
    # "### Response:" ending the input meets the template's "\n": Dolly's response key token
    # before the real one would move the loss mask.
    lines = [{"instruction": "a", "input": "Say ### Response:", "output": "x"},
             {"instruction": "b ### Instruction:", "output": "y"},
             {"instruction": "c", "output": "## Notes\n### Summary"}, GOOD[0]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "m.jsonl", lines))
    assert counts_of(result) == (4, 2, {"reserved_marker": 2})
    assert [r["where"] for r in rejected(tmp_path)] == ["line 1", "line 2"]


def encoded_file(tmp_path, name, encoding, text):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("name, encoding, bom", [
    ("u16le.jsonl", "utf-16-le", "\ufeff"), ("u16be.jsonl", "utf-16-be", "\ufeff"),
    ("u16.jsonl", "utf-16-le", ""),  # no BOM: the NUL pattern of '{"' tells UTF-16
    ("u32le.json", "utf-32-le", "\ufeff"), ("u32be.json", "utf-32-be", "\ufeff"),
    ("u8bom.csv", "utf-8", "\ufeff"), ("u16bom.csv", "utf-16-le", "\ufeff")])
def test_every_reader_honours_a_bom(tmp_path, name, encoding, bom):
    recs = [{"instruction": "Greet in French.", "input": "", "output": "Ça va ? Très bien."},
            {"instruction": "Name a primary color.", "input": "", "output": "Red."}]
    if name.endswith(".csv"):
        body = "instruction,input,output\r\n" + "".join(
            f'{r["instruction"]},,"{r["output"]}"\r\n' for r in recs)
    elif name.endswith(".json"):
        body = json.dumps(recs, ensure_ascii=False, indent=1)
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    result = prepare(tmp_path, encoded_file(tmp_path, name, encoding, bom + body))
    assert counts_of(result) == (2, 2, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED
    assert text_of(result, "Greet in French.").endswith("### Response:\nÇa va ? Très bien.\n\n### End")


def test_invalid_utf16_refuses_the_file_in_one_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes("\ufeff{\"instruction\": \"a\", \"output\": \"b\"}\n".encode("utf-16-le") + b"\x00")
    with pytest.raises(DataError, match=r"odd.jsonl: not valid UTF-16-LE \(at byte 74\)$"):
        prepare(tmp_path, path)


def test_cp1252_in_csv_and_in_a_json_array_are_rejected_per_row_and_item(tmp_path):
    csv_path = tmp_path / "fr.csv"
    csv_path.write_bytes(b"instruction,output\r\nSay yes.,Oui\r\nSay very well.,Tr\xe8s bien\r\n"
                         b"Say no.,Non\r\n")
    result = prepare(tmp_path / "a", csv_path)
    assert counts_of(result) == (3, 2, {"encoding": 1})
    assert [(r["where"], r["record"]) for r in rejected(tmp_path / "a")] == [
        ("row 2", "Say very well.,Tr\\xe8s bien")]
    arr = tmp_path / "fr.json"
    arr.write_bytes(b'[{"instruction": "Say yes.", "output": "Oui"},\n'
                    b' {"instruction": "Say very well.", "output": "Tr\xe8s bien"},\n'
                    b' {"instruction": "Say no.", "output": "Non"}]')
    result = prepare(tmp_path / "b", arr)
    assert counts_of(result) == (3, 2, {"encoding": 1})
    assert [r["where"] for r in rejected(tmp_path / "b")] == ["item 2"]


def test_an_escaped_lone_surrogate_is_no_text(tmp_path):
    lines = ['{"instruction": "a", "output": "half an emoji \\ud83d"}', GOOD[0], GOOD[1]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "s.jsonl", lines))
    assert counts_of(result) == (3, 2, {"encoding": 1})
    assert rejected(tmp_path)[0]["record"]["output"] == "half an emoji \ud83d"


def test_blank_input_and_line_endings_are_normalised(tmp_path):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b'instruction,input,output\r\n"List two colors.","   ","Red\r\nBlue"\r\n'
                         b'"Name a primary color.","\t","Red."\r\n"Add.","1\r2","3"\r\n')
    result = prepare(tmp_path, csv_path)
    assert counts_of(result) == (3, 3, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED
    assert text_of(result, "List two colors.").endswith(
        "completes the request.\n\n### Instruction:\nList two colors.\n\n### Response:\nRed\nBlue"
        "\n\n### End")
    assert "### Input:\n1\n2\n\n" in text_of(result, "Add.")


def test_content_decides_in_a_folder_of_mixed_files(tmp_path):
    folder = tmp_path / "mixed"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]))
    (folder / "array.jsonl").write_text(json.dumps(GOOD[2:], indent=2))
    (folder / "wrapped.json").write_text(json.dumps({"version": 1, "data": [
        {"instruction": "Say no.", "output": "no"}]}))
    (folder / "one.json").write_text(json.dumps({"instruction": "Say yes.", "output": "yes",
                                                 "tags": ["a", "b"]}))
    (folder / "_SUCCESS").write_text("")
    (folder / "_scored_by.json").write_text("{}")
    (folder / ".ipynb_checkpoints/lines-checkpoint.json").write_text(json.dumps(GOOD))
    (folder / "notes.txt").write_text("not data")
    result = prepare(tmp_path, folder)
    assert counts_of(result) == (6, 6, {})
    assert [(f["name"].split("/")[-1], f["format"]) for f in result.summary["files"]] == [
        ("array.jsonl", "json"), ("lines.json", "json-lines"), ("one.json", "json"),
        ("wrapped.json", "json")]


def test_several_pretty_printed_objects_are_refused_in_one_line(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text("\n".join(json.dumps(r, indent=2) for r in GOOD[:2]))
    with pytest.raises(DataError, match="pretty.jsonl: holds several JSON values spanning lines"):
        prepare(tmp_path, path)


def test_a_failed_prepare_still_writes_its_counts_and_rejections(tmp_path):
    lines = [{"instruction": "a", "output": "b <|endoftext|>"}, '{"instruction": "x",',
             {"instruction": "Name a color.", "output": "Blue."}]
    with pytest.raises(data.PrepareFailed) as e:
        prepare(tmp_path, write_jsonl(tmp_path / "few.jsonl", lines))
    assert str(e.value) == ("only 1 valid record(s): need at least 2 to make a train/test split "
                            "(2 rejected: see prepared/rejected.jsonl)")
    assert e.value.counts == {"records_read": 3, "records_kept": 1, "records_rejected": 2,
                              **{f"rejected_{r}": 0 for r in data.REASONS},
                              "rejected_reserved_marker": 1, "rejected_malformed_json": 1}
    assert [(r["where"], r["reason"]) for r in rejected(tmp_path)] == [
        ("line 1", "reserved_marker"), ("line 2", "malformed_json")]
    summary = json.loads((tmp_path / "prepared/summary.json").read_text())
    assert summary["counts"] == e.value.counts and summary["error"].startswith("only 1 valid")


def test_resolve_source_is_the_one_listing(tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "sub/a.csv", "_SUCCESS", ".hidden.json", "README.md"):
        (folder / name).write_text("x")
    src = data.resolve_source(str(folder), "train")
    assert (src.kind, [str(f.relative_to(folder)) for f in src.files]) == (
        "folder", ["b.jsonl", "sub/a.csv"])
    assert src.fingerprint().startswith("files:")
    before = src.fingerprint()
    (folder / "README.md").write_text("changed")  # not data: the fingerprint stays
    assert data.resolve_source(str(folder), "train").fingerprint() == before
    (folder / "b.jsonl").write_text("y")
    assert data.resolve_source(str(folder), "train").fingerprint() != before
    assert data.resolve_source("builtin", "train") == readers.DataSource("builtin", "builtin", "train")
    assert data.resolve_source("builtin", "x").fingerprint() == "builtin"
    hub = data.resolve_source("tatsu-lab/alpaca", "train")
    assert (hub.kind, hub.files, hub.fingerprint()) == ("hub", (), "hub:tatsu-lab/alpaca[train]")
    assert data.resolve_source(f"hf:{folder}", "train").kind == "hub"
    assert data.resolve_source(str(folder / "b.jsonl"), "train").files == (folder / "b.jsonl",)
    with pytest.raises(DataError, match="no such file or folder"):
        data.resolve_source(str(tmp_path / "missing.jsonl"), "train")


def test_a_marker_inside_a_longer_word_is_still_the_marker(tmp_path):
    # The tokenizer matches "### End" inside "### Ending": that text would end the answer.
    lines = [{"instruction": "c", "output": "## Notes\n### Ending"}, GOOD[0], GOOD[1]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "e.jsonl", lines))
    assert counts_of(result) == (3, 2, {"reserved_marker": 1})


def test_a_broken_first_line_of_json_lines_is_one_rejection(tmp_path):
    lines = ['{"instruction": "cut off", "output": ', GOOD[0], GOOD[1]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "cut.jsonl", lines))
    assert counts_of(result) == (3, 2, {"malformed_json": 1})
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "instruction": "a",\n  "output": "b"\n  "oops": 1\n}\n')
    with pytest.raises(DataError, match=r"pretty.json: not valid JSON \(Expecting ',' delimiter "
                                        r"at line 4 column 3\)$"):
        prepare(tmp_path, pretty)


def test_nan_and_infinity_in_a_json_array_and_in_parquet(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "Name a primary color.", "input": NaN, '
                                     '"output": "Red."}, {"instruction": "b", "output": Infinity}, '
                                     '{"instruction": "Say hi.", "output": "hi"}]')
    result = prepare(tmp_path / "j", tmp_path / "a.json", test_size=0.5)
    assert counts_of(result) == (3, 2, {"non_string_field": 1})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED
    # a float input column (what pandas writes when inputs are all missing) with one infinity
    pd.DataFrame({"instruction": ["Name a primary color.", None, "c", "Say hi."],
                  "input": [float("nan"), float("nan"), float("inf"), float("nan")],
                  "output": ["Red.", "d", "e", "hi"]}).to_parquet(tmp_path / "p.parquet")
    result = prepare(tmp_path / "p", tmp_path / "p.parquet", test_size=0.5)
    assert counts_of(result) == (4, 2, {"missing_instruction": 1, "non_string_field": 1})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED


def test_json_python_cannot_read_is_a_rejection_or_one_line(tmp_path):
    """A 5000-digit number or deep nesting is valid JSON that Python refuses (ValueError,
    RecursionError): a JSON-lines record is rejected as malformed_json, an array file is refused
    with one line; neither is a traceback."""
    ok = '{"instruction": "Name a colour.", "output": "Red."}'
    lines = tmp_path / "bigint.jsonl"
    lines.write_text('{"instruction": "q", "output": "a", "n": ' + "9" * 5000 + "}\n"
                     + "[" * 100_000 + "\n" + ok + "\n")
    read = readers.read_file(lines)
    assert [(r.locator, r.error) for r in read.records] == [
        ("line 1", "malformed_json"), ("line 2", "malformed_json"), ("line 3", None)]
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    with pytest.raises(DataError, match=r"nested.json: not readable JSON \(RecursionError: "):
        readers.read_file(nested)
