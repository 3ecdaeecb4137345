"""dolly.data.readers: datasets read exactly as they are: JSON, JSON lines, CSV, Parquet, folders
and the Hub; byte order marks and encodings; what a file holds decides how it is read; an unusable
file is refused in one line naming it; bytes that are no text are rejected per record."""
import json

import pandas as pd
import pytest

import helpers
from helpers import CASES, GOOD, NO_INPUT_RED, counts_of, prepare, rejected, text_of, write_jsonl
from dolly import data, prompts
from dolly.data import readers
from dolly.errors import DataError


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
    assert ("b.csv", "line 3") in {(r["source"].split("/")[-1], r["where"]) for r in rejected(tmp_path)}


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


def test_utf8_bom_before_the_first_record(tmp_path):
    result = prepare(tmp_path, CASES / "bom.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED
    assert result.summary["files"][0]["encoding"] == "utf-8-sig"


def test_nan_input_means_no_input(tmp_path):
    result = prepare(tmp_path, CASES / "nan.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED


def test_json_array_under_a_jsonl_name(tmp_path):
    assert len((CASES / "array.jsonl").read_text().splitlines()) == 42
    result = prepare(tmp_path, CASES / "array.jsonl", test_size=2)
    assert counts_of(result) == (8, 8, {})
    assert result.summary["files"][0]["format"] == "json"
    assert text_of(result, "Name a primary color.") == NO_INPUT_RED


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
        ("line 3", "Say very well.,Tr\\xe8s bien")]
    arr = tmp_path / "fr.json"
    arr.write_bytes(b'[{"instruction": "Say yes.", "output": "Oui"},\n'
                    b' {"instruction": "Say very well.", "output": "Tr\xe8s bien"},\n'
                    b' {"instruction": "Say no.", "output": "Non"}]')
    result = prepare(tmp_path / "b", arr)
    assert counts_of(result) == (3, 2, {"encoding": 1})
    assert [r["where"] for r in rejected(tmp_path / "b")] == ["item 2"]


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


# --- issue 23: nothing lost, nothing mislabelled ------------------------------------------------

def case_file(tmp_path, name):
    """One of issue 23's case files, alone in a folder with GOOD (4 records) beside it, so that
    the step has records to split whatever the case keeps."""
    from helpers import write_case_files

    cases = write_case_files(tmp_path / "cases")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / name).write_bytes((cases / name).read_bytes())
    write_jsonl(folder / "good.jsonl", GOOD)
    return folder


def of_file(result, tmp_path, name):
    """(records read, kept, {reason: count}) of one file of a prepare() over a folder."""
    from collections import Counter

    kept = pd.concat([result.train, result.test])
    mine = [r for r in rejected(tmp_path) if r["source"].endswith(name)]
    n_kept = int(kept["source"].str.endswith(name).sum())
    return n_kept + len(mine), n_kept, dict(Counter(r["reason"] for r in mine))


def test_cr_only_json_lines_are_four_records(tmp_path):
    # wardi/jsonlines #3: classic Mac OS and some exporters end lines with a lone \r.
    result = prepare(tmp_path, case_file(tmp_path, "cr.jsonl"))
    assert of_file(result, tmp_path, "cr.jsonl") == (4, 4, {})
    raws = readers.read_file(tmp_path / "data/cr.jsonl").records
    assert [(r.locator, r.value) for r in raws] == [
        (f"line {n}", rec) for n, rec in enumerate(helpers.CR_RECORDS, start=1)]


def test_every_line_end_alone_or_mixed_and_unicode_separators_stay_text(tmp_path):
    recs = [{"instruction": "Say a\u2028b.", "output": "a\u2029b"},
            {"instruction": "Say c\u0085d.", "output": "cd"},
            {"instruction": "Say e.", "output": "e"}, {"instruction": "Say f.", "output": "f"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes((lines[0] + "\r\n" + lines[1] + "\r" + lines[2] + "\n\r\n" + lines[3]
                      + "\r").encode())
    raws = readers.read_file(path).records
    assert [(r.locator, r.value) for r in raws] == [
        ("line 1", recs[0]), ("line 2", recs[1]), ("line 3", recs[2]), ("line 5", recs[3])]
    # a broken line is located by the same count: the 3rd physical line of a \r-only file
    path.write_bytes(("\r".join([lines[0], lines[1], "{oops", lines[3]])).encode())
    assert [(r.locator, r.error) for r in readers.read_file(path).records] == [
        ("line 1", None), ("line 2", None), ("line 3", "malformed_json"), ("line 4", None)]


def test_a_cr_only_csv_gives_the_same_rows_as_the_cr_only_json_lines(tmp_path):
    path = tmp_path / "cr.csv"
    path.write_bytes(("instruction,input,output\r" + "\r".join(
        f'{r["instruction"]},,{r["output"]}' for r in helpers.CR_RECORDS)).encode())
    assert [r.value for r in readers.read_file(path).records] == helpers.CR_RECORDS


def test_pandas_string_columns_with_pd_na(tmp_path):
    # hail-is/hail PR #11424: pandas' `string` dtype holds pd.NA for a missing cell.
    result = prepare(tmp_path, case_file(tmp_path, "na.parquet"))
    assert of_file(result, tmp_path, "na.parquet") == (5, 4, {"missing_instruction": 1})
    assert [r["where"] for r in rejected(tmp_path)] == ["row 3"]
    for ins, out in (("Say one.", "one"), ("Say four.", "four")):  # no input: no-input template
        assert text_of(result, ins) == prompts.format_record(ins, None, out)
    assert text_of(result, "Say two.") == prompts.format_record("Say two.", "x", "two")


def test_every_missing_value_representation_is_missing():
    import decimal

    import numpy as np

    for missing in (None, float("nan"), np.nan, np.float32("nan"), pd.NA, pd.NaT,
                    np.datetime64("NaT"), decimal.Decimal("NaN")):
        assert readers.is_missing(missing) and readers.plain(missing) is None, repr(missing)
    for present in ("", "NA", "nan", 0, 0.0, False, [], {}, np.int64(3), b""):
        assert not readers.is_missing(present), repr(present)


def test_missing_values_of_every_columnar_kind_mean_no_input(tmp_path):
    import numpy as np

    frame = pd.DataFrame({"instruction": ["Say a.", "Say b.", "Say c.", "Say d."],
                          "input": pd.Series([None, np.nan, pd.NA, "x"], dtype=object),
                          "output": ["a", "b", "c", "d"]})
    for name, df in (("object", frame), ("string", frame.astype("string")),
                     ("arrow", frame.astype("string[pyarrow]"))):
        df.to_parquet(tmp_path / f"{name}.parquet")
        got = [r.value["input"] for r in readers.read_file(tmp_path / f"{name}.parquet").records]
        assert got == [None, None, None, "x"], name


def test_rejected_parquet_values_are_written_as_the_json_they_were(tmp_path):
    # pandas-dev/pandas #49623: a list cell came back as numpy's printout "['para one' 'para two']"
    prepare(tmp_path, case_file(tmp_path, "list.parquet"))
    assert [(r["where"], r["reason"], r["record"]) for r in rejected(tmp_path)] == [
        ("row 1", "non_string_field",
         {"instruction": "Join the paragraphs.", "input": ["para one", "para two"],
          "output": "joined"})]


def test_objects_stay_objects_and_integers_stay_integers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "good.jsonl", GOOD)
    pq.write_table(pa.table({
        "instruction": pa.array([7, None, 9], pa.int64()),
        "input": pa.array([{"a": 1, "b": [1.5, None]}, None, None]),
        "output": ["seven", "none", "nine"]}), folder / "typed.parquet")
    prepare(tmp_path, folder)
    assert [(r["where"], r["reason"], r["record"]) for r in rejected(tmp_path)] == [
        ("row 1", "non_string_field", {"instruction": 7, "input": {"a": 1, "b": [1.5, None]},
                                       "output": "seven"}),
        ("row 2", "missing_instruction", {"instruction": None, "input": None, "output": "none"}),
        ("row 3", "non_string_field", {"instruction": 9, "input": None, "output": "nine"})]
    line = (tmp_path / "prepared/rejected.jsonl").read_text().splitlines()[2]
    assert '"instruction": 9,' in line  # 9, not 9.0


def test_a_stray_csv_quote_names_the_lines_it_swallowed(tmp_path):
    # apple/turicreate #1692: one stray quote swallowed lines 3-6, reported as row 2 missing_response
    raws = readers.read_file(case_file(tmp_path, "quote.csv") / "quote.csv").records
    assert [(r.locator, r.error, r.detail) for r in raws] == [
        ("line 2", None, None),
        ("lines 3-6", "malformed_csv",
         "unclosed quote from line 3: lines 3-6, to the end of the file, read as one field")]
    result = prepare(tmp_path, tmp_path / "data")
    assert of_file(result, tmp_path, "quote.csv") == (2, 1, {"malformed_csv": 1})
    assert rejected(tmp_path)[0]["record"] == helpers.QUOTE_CSV.split("\n", 2)[2].rstrip("\n")


def test_text_after_a_closing_quote_is_one_rejection_and_reading_goes_on(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('instruction,output\r\n"Say ""hi"".",hi\r\n"Name a colour.,red\r\n'
                    'Say "bye" twice.,bye\r\nName a pet.,cat\r\n"Two\r\nlines.",ok\r\n"Open,x',
                    newline="")
    assert [(r.locator, r.error, r.detail, r.value) for r in readers.read_file(path).records] == [
        ("line 2", None, None, {"instruction": 'Say "hi".', "output": "hi"}),
        ("lines 3-4", "malformed_csv", "line 4: a closing quote is followed by text instead of "
         "',' or the line end (a quote inside a quoted field is written \"\")", None),
        ("line 5", None, None, {"instruction": "Name a pet.", "output": "cat"}),
        ("lines 6-7", None, None, {"instruction": "Two\r\nlines.", "output": "ok"}),
        ("line 8", "malformed_csv", "unclosed quote on line 8, the last line", None)]
