"""Conversations as data: every layout mixed in one folder, each rejection named with its file and
line, one prompt format per run (Dolly's refuses what it cannot hold), loss spans from the
rendered text."""
import json

import pytest
from helpers import mixed_chat_folder

from dolly import prompts
from dolly.config import load_config
from dolly.data import prepare

REJECTED = [("b_mixed.jsonl", "line 4", "unknown_role"),
            ("b_mixed.jsonl", "line 5", "roles_out_of_order"),
            ("b_mixed.jsonl", "line 6", "blank_content"),
            ("b_mixed.jsonl", "line 7", "non_string_content"),
            ("b_mixed.jsonl", "line 8", "no_assistant_turn"),
            ("b_mixed.jsonl", "line 9", "not_ending_with_assistant")]


def _prepare(tmp_path, fmt):
    data = mixed_chat_folder(tmp_path / "data")
    cfg = load_config(None, {"dataset": str(data), "prompt_format": fmt, "test_size": 1,
                             "tokenizer_vocab_size": 300})
    out = tmp_path / f"prepared_{fmt}"
    result = prepare(cfg, out, progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return result, [(r["source"].rsplit("/", 1)[-1], r["where"], r["reason"]) for r in rejected]


def test_every_layout_mixed_in_one_folder_with_the_chat_template(tmp_path):
    result, rejected = _prepare(tmp_path, "chat_template")
    assert result.summary["prompt_format"] == "chat_template"
    assert result.summary["layouts"] == {"alpaca": 2, "dolly-15k": 1, "messages": 3, "sharegpt": 2}
    assert result.counts["records_read"] == 14 and result.counts["records_kept"] == 8
    assert rejected == REJECTED
    records = {r.text: r for r in [*result.train.itertuples(), *result.test.itertuples()]}
    # the multi-turn record: both answers carry the loss, each with its <|im_end|>
    text = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nMy name is Ada."
            "<|im_end|>\n<|im_start|>assistant\nHello, Ada!<|im_end|>\n<|im_start|>user\nWhat is "
            "my name?<|im_end|>\n<|im_start|>assistant\nAda<|im_end|>\n")
    assert text in records
    # an instruction record with an input is one user turn: instruction, blank line, input
    assert ("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5"
            "<|im_end|>\n") in records
    # JSON text in a CSV cell is a conversation too
    assert "<|im_start|>user\nSpell cat.<|im_end|>\n<|im_start|>assistant\nc-a-t<|im_end|>\n" in records


def test_dolly_format_takes_one_turn_conversations_and_rejects_longer_ones(tmp_path):
    result, rejected = _prepare(tmp_path, "dolly")
    assert result.summary["prompt_format"] == "dolly"
    assert result.summary["layouts"] == {"alpaca": 2, "dolly-15k": 1, "messages": 2, "sharegpt": 1}
    assert rejected == [("b_mixed.jsonl", "line 2", "multi_turn_for_dolly"), *REJECTED,
                        ("c_sharegpt.parquet", "row 2", "multi_turn_for_dolly")]
    texts = [*result.train["text"], *result.test["text"]]
    assert prompts.format_record("Say hi.", None, "Hi!") in texts  # byte-identical Dolly text


def test_chat_template_spans_cover_each_answer_and_its_end_of_turn():
    fmt = prompts.ChatTemplateFormat(prompts.CHATML_TEMPLATE)
    messages = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "first?"}, {"role": "assistant", "content": "a"}]
    text, spans = fmt.render(None, None, None, messages)
    assert [text[s:e] for s, e in spans] == ["ok<|im_end|>", "a<|im_end|>"]
    assert text[:spans[-1][0]] == fmt.prompt(messages=messages[:-1])
    assert fmt.end_of_turn() == "<|im_end|>"


def test_dolly_spans_are_the_response_and_end_key():
    text, spans = prompts.DollyFormat().render("Say hi.", None, "Hi!")
    assert text == prompts.format_record("Say hi.", None, "Hi!")
    assert [text[s:e] for s, e in spans] == ["Hi!\n\n### End"]


def test_a_template_that_renders_history_differently_is_refused():
    # drops earlier assistant answers from the history (as some reasoning templates do)
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    fmt = prompts.ChatTemplateFormat(template)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(prompts.TemplateError, match="renders turn 2 differently"):
        fmt.render(None, None, None, messages)


def test_a_turn_the_template_refuses_is_a_rejection_with_its_message():
    from dolly.data.readers import Raw
    from dolly.data.validation import Validator

    # a template that takes no system turn (as Gemma's raises)
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    check = Validator({}, ["</s>"], prompts.ChatTemplateFormat(template))
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    check.add([Raw("f.jsonl", "line 1", {"messages": turns}),
               Raw("f.jsonl", "line 2", {"messages": turns[1:]})])
    assert [(r["where"], r["reason"], r["detail"]) for r in check.rejected] == [
        ("line 1", "template_refused", "the chat template refused it: System role not supported")]
    assert [r["text"] for r in check.kept] == ["<user>u</s><assistant>a</s>"]


def _prep(tmp_path, files: dict, **overrides):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text, encoding="utf-8")
    cfg = load_config(None, {"dataset": str(data), "prompt_format": "chat_template",
                             "test_size": 1, "tokenizer_vocab_size": 300, **overrides})
    out = tmp_path / "prepared"
    result = prepare(cfg, out, progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return result, [(r["where"], r["reason"]) for r in rejected]


def _chat(user, answer, **extra):
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}], **extra})


def test_hostile_conversation_records_are_named_rejections(tmp_path):
    lines = [_chat("q1", "a1"),
             _chat("q2", "a2", category="\\ud800").replace("\\\\ud800", "\\ud800"),
             json.dumps({"messages": json.loads(_chat("q3", "a3"))["messages"],
                         "instruction": "also an instruction", "output": "x"}),
             _chat("Add.\n\n2 3", "5"),  # the same text as the instruction record below
             json.dumps({"instruction": "Add.", "input": "2 3", "output": "5"}),
             json.dumps({"instruction": "Name one.", "input": "", "output": "One."})]
    result, rejected = _prep(tmp_path, {"a.jsonl": "\n".join(lines) + "\n"})
    assert rejected == [("line 2", "encoding"), ("line 3", "malformed_conversation"),
                        ("line 5", "duplicate")]
    assert result.counts["records_kept"] == 3


def test_a_csv_of_chat_and_instruction_rows_keeps_both(tmp_path):
    import pandas as pd

    turns = json.loads(_chat("Spell cat.", "c-a-t"))["messages"]
    csv = pd.DataFrame({"messages": [json.dumps(turns), None, None],
                        "instruction": [None, "Say hi.", "Say bye."],
                        "output": [None, "Hi!", "Bye!"], "cat": ["spell", "greet", "greet"]})
    (tmp_path / "x").mkdir()
    csv.to_csv(tmp_path / "x" / "mixed.csv", index=False)
    result, rejected = _prep(tmp_path, {"mixed.csv": (tmp_path / "x" / "mixed.csv").read_text()},
                             columns="category=cat")
    assert rejected == []
    assert result.summary["layouts"] == {"alpaca": 2, "messages": 1}
    kept = pd.concat([result.train, result.test])
    assert sorted(kept["category"]) == ["greet", "greet", "spell"]  # columns= maps chats too


def test_a_truncated_conversation_never_labels_user_text(tmp_path):
    lines = [json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "final"}]}),
        *(_chat(f"q{i}", f"a{i}") for i in range(4))]
    result, rejected = _prep(tmp_path, {"a.jsonl": "\n".join(lines) + "\n"},
                             too_long="truncate", max_length=32)
    assert rejected == [("line 1", "too_long")]  # the last answer is past the cut: not trainable


def test_a_template_without_an_end_of_turn_or_that_does_not_compile_is_one_line(tmp_path):
    from dolly.data.prepared import record_format
    from dolly.errors import DataError

    class Tok:  # what record_format reads of a tokenizer
        special_tokens_map = {"eos_token": "</s>"}
        chat_template = None

    cfg = load_config(None, {"prompt_format": "chat_template"})
    Tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="writes nothing after an answer"):
        record_format(cfg, Tok())
    Tok.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(DataError, match="cannot render a user turn and its answer"):
        record_format(cfg, Tok())
    Tok.chat_template = {"tool_use": "{{ messages }}"}  # named templates, no default
    with pytest.raises(DataError, match="no chat template"):
        record_format(cfg, Tok())
    assert prompts.resolve_format("auto", Tok()) == "dolly"


def test_a_conversation_to_answer_must_end_with_a_user_turn():
    from dolly.generation import chat_prompt_ids

    fmt = prompts.ChatTemplateFormat(prompts.CHATML_TEMPLATE)
    with pytest.raises(prompts.TemplateError, match="must end with a user turn"):
        chat_prompt_ids(None, fmt, [{"role": "system", "content": "s"}], 30)
