"""dolly.data.validation: which records become training text. Every rejection is counted and
listed with its reason; layouts and column mappings; reserved markers, also across a field's edge;
blank inputs and line endings normalised."""
import json

import pandas as pd
import pytest

from helpers import CASES, GOOD, NO_INPUT_RED, counts_of, prepare, rejected, text_of, write_jsonl
from dolly.tokenizer import control_texts, load_tokenizer


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


def test_explicit_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q1?", "answer": "A1"},
                                              {"question": "Q2?", "answer": "A2"}])
    result = prepare(tmp_path, path, columns="instruction=question,response=answer")
    assert result.counts["records_kept"] == 2


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
    assert "<|endoftext|>" in control_texts(tok)


def test_marker_formed_across_a_field_edge_is_reserved(tmp_path):
    # "### Response:" ending the input meets the template's "\n": Dolly's response key token
    # before the real one would move the loss mask.
    lines = [{"instruction": "a", "input": "Say ### Response:", "output": "x"},
             {"instruction": "b ### Instruction:", "output": "y"},
             {"instruction": "c", "output": "## Notes\n### Summary"}, GOOD[0]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "m.jsonl", lines))
    assert counts_of(result) == (4, 2, {"reserved_marker": 2})
    assert [r["where"] for r in rejected(tmp_path)] == ["line 1", "line 2"]


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


def test_a_marker_inside_a_longer_word_is_still_the_marker(tmp_path):
    # The tokenizer matches "### End" inside "### Ending": that text would end the answer.
    lines = [{"instruction": "c", "output": "## Notes\n### Ending"}, GOOD[0], GOOD[1]]
    result = prepare(tmp_path, write_jsonl(tmp_path / "e.jsonl", lines))
    assert counts_of(result) == (3, 2, {"reserved_marker": 1})


def test_fields_with_nothing_visible_are_blank(tmp_path):
    # dotnet/corefx #37817: zero-width characters only; an invisible input is no input.
    from helpers import write_case_files

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "invisible.jsonl").write_bytes(
        (write_case_files(tmp_path / "cases") / "invisible.jsonl").read_bytes())
    write_jsonl(folder / "good.jsonl", GOOD)
    result = prepare(tmp_path, folder)
    assert counts_of(result) == (8, 5, {"blank_instruction": 2, "blank_response": 1})
    assert [(r["where"], r["reason"]) for r in rejected(tmp_path)] == [
        ("line 1", "blank_instruction"), ("line 2", "blank_instruction"),
        ("line 3", "blank_response")]
    assert text_of(result, "Say d.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay d.\n\n### Response:\nd\n\n### End")
