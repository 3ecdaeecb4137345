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
