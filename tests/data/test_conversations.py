"""dolly.data.conversations: chat records in the messages and ShareGPT layouts, normalised to
role/content turns; one exact reason for each way a conversation is unusable."""
import pytest

from dolly.data.conversations import (CONVERSATION_REASONS, ROLES, dolly_pair,
                                      instruction_messages, is_conversation, parse_conversation)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def test_messages_layout_single_exchange():
    rec = {"messages": [U("Name a color."), A("Blue.")]}
    assert is_conversation(rec)
    assert parse_conversation(rec) == ([U("Name a color."), A("Blue.")], None, "messages")


def test_sharegpt_layout_multi_turn_with_system():
    rec = {"id": "x1", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Red."}]}
    assert is_conversation(rec)
    assert parse_conversation(rec) == (
        [S("Answer briefly."), U("Name a color."), A("Blue."), U("Another?"), A("Red.")],
        None, "sharegpt")


def test_messages_multi_turn_with_system_and_ignored_keys():
    rec = {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello.", "weight": 1},
        {"role": "user", "content": "Bye", "tool_calls": None},
        {"role": "assistant", "content": "Bye.", "tool_calls": [], "function_call": None}],
        "source": "ignored"}
    assert parse_conversation(rec) == (
        [S("Be terse."), U("Hi"), A("Hello."), U("Bye"), A("Bye.")], None, "messages")


@pytest.mark.parametrize("name, role", [
    ("human", "user"), ("Human", "user"), ("USER", "user"), ("user", "user"),
    ("gpt", "assistant"), ("GPT", "assistant"), ("assistant", "assistant"),
    ("chatgpt", "assistant"), ("bing", "assistant"), ("Bard", "assistant"),
    ("system", "system"), ("System", "system")])
def test_sharegpt_role_mapping(name, role):
    first = {"from": name, "value": "t"}
    turns = {"user": [first, {"from": "gpt", "value": "a"}],
             "assistant": [{"from": "human", "value": "q"}, first],
             "system": [first, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    messages, reason, layout = parse_conversation({"conversations": turns[role]})
    assert reason is None and layout == "sharegpt"
    assert {"role": role, "content": "t"} in messages


def test_line_ends_are_normalised_and_text_parts_joined():
    rec = {"messages": [
        {"role": "system", "content": "a\r\nb"},
        {"role": "user", "content": [{"type": "text", "text": "one\rtwo"},
                                     {"type": "text", "text": "three"}]},
        {"role": "assistant", "content": "x\r\ny\rz\n"}]}
    assert parse_conversation(rec) == (
        [S("a\nb"), U("one\ntwo\nthree"), A("x\ny\nz\n")], None, "messages")


def test_blank_system_turn_means_no_system_prompt():
    rec = {"conversations": [{"from": "system", "value": " \u200b"},
                             {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert parse_conversation(rec) == ([U("Q"), A("A")], None, "sharegpt")


# One record per reason; the exact reason and layout.
REJECTED = [
    ({"messages": "hello"}, "malformed_conversation"),
    ({"messages": {"role": "user", "content": "x"}}, "malformed_conversation"),
    ({"messages": [U("q"), "Blue."]}, "malformed_conversation"),
    ({"messages": [U("q"), {"role": "assistant"}]}, "malformed_conversation"),
    ({"messages": [U("q"), {"content": "a"}]}, "malformed_conversation"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "malformed_conversation"),
    ({"messages": [U("q"), A("a")], "conversations": [{"from": "human", "value": "q"},
                                                      {"from": "gpt", "value": "a"}]},
     "malformed_conversation"),
    ({"messages": [U("q"), {"role": "assistant", "content": None,
                            "tool_calls": [{"id": "c1", "type": "function"}]}]},
     "unsupported_field"),
    ({"messages": [U("q"), {"role": "assistant", "content": "a", "weight": 0}]},
     "unsupported_field"),
    ({"messages": [U("q"), {"role": "tool", "content": "42", "tool_call_id": "c1"}, A("a")]},
     "unsupported_field"),
    ({"messages": [U("q"), {"role": "tool", "content": "42"}, A("a")]}, "unknown_role"),
    ({"messages": [{"role": "User", "content": "q"}, A("a")]}, "unknown_role"),
    ({"messages": [{"role": None, "content": "q"}, A("a")]}, "unknown_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "a"}]},
     "unknown_role"),
    ({"messages": [A("a"), U("q"), A("a")]}, "roles_out_of_order"),
    ({"messages": [U("q"), U("q2"), A("a")]}, "roles_out_of_order"),
    ({"messages": [U("q"), S("s"), A("a")]}, "roles_out_of_order"),
    ({"messages": [S("s"), S("t"), U("q"), A("a")]}, "roles_out_of_order"),
    ({"messages": [U("q"), A("a"), A("b")]}, "roles_out_of_order"),
    ({"messages": []}, "no_assistant_turn"),
    ({"messages": [S("s"), U("q")]}, "no_assistant_turn"),
    ({"messages": [U("q"), A("a"), U("q2")]}, "not_ending_with_assistant"),
    ({"messages": [U("q"), A(None)]}, "non_string_content"),
    ({"messages": [U(7), A("a")]}, "non_string_content"),
    ({"messages": [U([{"type": "image_url", "image_url": {"url": "x"}}]), A("a")]},
     "non_string_content"),
    ({"messages": [U(["plain string part"]), A("a")]}, "non_string_content"),
    ({"messages": [U("q"), A("")]}, "blank_content"),
    ({"messages": [U("\u200b\ufeff \n"), A("a")]}, "blank_content"),
    ({"messages": [U([]), A("a")]}, "blank_content"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
     "blank_content"),
    ({"messages": [U("q\udc80"), A("a")]}, "encoding"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\ud800"}]},
     "encoding"),
]


@pytest.mark.parametrize("rec, reason", REJECTED)
def test_each_reason(rec, reason):
    assert is_conversation(rec)
    layout = "sharegpt" if "messages" not in rec else "messages"
    assert parse_conversation(rec) == (None, reason, layout)


def test_every_reason_is_covered_and_distinct():
    assert len(set(CONVERSATION_REASONS)) == len(CONVERSATION_REASONS)
    assert {r for _, r in REJECTED} == set(CONVERSATION_REASONS) | {"encoding"}
    assert "encoding" not in CONVERSATION_REASONS  # validation.REASONS already has it
    assert ROLES == ("system", "user", "assistant")


def test_is_conversation():
    assert not is_conversation({"instruction": "q", "output": "a"})
    assert not is_conversation(["messages"])
    assert not is_conversation("messages")
    # A Parquet row beside chat rows: every column present, null where the row has none.
    assert not is_conversation({"instruction": "q", "output": "a", "messages": None})
    assert is_conversation({"instruction": None, "output": None, "messages": [U("q"), A("a")]})
    assert is_conversation({"conversations": "not a list"})


def test_dolly_pair():
    assert dolly_pair([U("q"), A("a")]) == ("q", "a")
    assert dolly_pair([S("s"), U("q"), A("a")]) is None
    assert dolly_pair([U("q"), A("a"), U("q2"), A("a2")]) is None
    messages, _, _ = parse_conversation({"conversations": [
        {"from": "system", "value": ""}, {"from": "human", "value": "Q\r\n"},
        {"from": "gpt", "value": "A"}]})
    assert dolly_pair(messages) == ("Q\n", "A")


def test_instruction_messages():
    assert instruction_messages("Summarise.", "Long text.", "Short.") == [
        {"role": "user", "content": "Summarise.\n\nLong text."},
        {"role": "assistant", "content": "Short."}]
    for no_input in (None, "", "  \n", "\u200b"):
        assert instruction_messages("Name a color.", no_input, "Blue.") == [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."}]


def test_instruction_messages_parse_back():
    rec = {"messages": instruction_messages("Q", "ctx", "A")}
    assert parse_conversation(rec) == ([U("Q\n\nctx"), A("A")], None, "messages")
