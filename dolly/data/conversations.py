"""Conversation records: chats read, checked and normalised to `[{"role", "content"}, ...]`; every
record that is not a usable chat gets one reason (nothing silent). Pure: no files, no tokenizer.

Two layouts, told apart by the record's key (`is_conversation`):

- "messages" (OpenAI / Hugging Face chat format): a list of `{"role", "content"}`, role exactly
  "system", "user" or "assistant" (the format's own names, case as written):
      {"messages": [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Name a color."},
                    {"role": "assistant", "content": "Blue."}]}
  `content` may also be a list of text parts, `[{"type": "text", "text": "..."}, ...]`: the
  texts are joined with "\\n" (as vLLM's OpenAI server joins them); any other part (image_url,
  input_audio, ...) is `non_string_content`, since only text can be trained on here.
- "sharegpt" (ShareGPT, FastChat, Vicuna): a list of `{"from", "value"}` under `conversations`:
      {"conversations": [{"from": "human", "value": "Name a color."},
                         {"from": "gpt", "value": "Blue."}]}
  `from`, in any case: "system"; "human" or "user" -> user; "gpt", "assistant", "chatgpt",
  "bing" or "bard" -> assistant (ShareGPT dumps name the chatbot that answered; every one of
  them is the assistant's turn). Any other name ("observation", "function_call", ...) is
  `unknown_role`. A ShareGPT turn written with role/content keys is `malformed_conversation`.

The list may also be given as its JSON text (a CSV cell: `"[{""role"": ""user"", ...}]"`); text
that is not JSON is `malformed_conversation`. A record holding both keys (not null) is
`malformed_conversation`: which chat is meant is not
clear. A null `messages`/`conversations` is no conversation (Arrow gives every row of a Parquet
file every column, null where a row has none: an instruction row beside chat rows).

Rules, checked in this order, the first that fails being the reason:
1. `malformed_conversation`: the list is not a list, a turn is not an object, or a turn lacks
   its role key or its content key (role/content; from/value). Keys decide the shape; what
   they hold (null too) is checked by the rules after.
2. `unsupported_field`: a turn carries what a text chat cannot hold and dropping it would
   change what is trained: `tool_calls`, `function_call` or `tool_call_id` (not null or
   empty), or a `weight` other than 1 (OpenAI's fine-tuning: weight 0 = do not train on that
   turn). Other extra keys (`name`, `id`, `weight: 1`, ...) are ignored.
3. `unknown_role`: a role that is not one of the layout's names above (tool/function turns too).
4. `roles_out_of_order`: not [system] user assistant user assistant ...: one optional system
   turn, first only; then user and assistant strictly alternating, starting with user.
5. `no_assistant_turn`: nothing to learn from (also an empty list).
6. `not_ending_with_assistant`: a last user turn would have no answer to train on.
7. Content, turn by turn: `non_string_content` (not a string or a list of text parts: null,
   a number, an image part), `blank_content` (`dolly.prompts.is_blank`: empty, whitespace or
   invisible-only; an empty part list too), `encoding` (a lone surrogate: an invalid byte or a
   "\\ud800" escape; the reason validation.REASONS already has).
A blank system turn is no system prompt and is dropped, as a blank input means "no input" in
an instruction record; any other blank turn is `blank_content`.

Kept content has its line ends normalised (`\\r\\n`, `\\r` -> `\\n`) and is otherwise as written.
"""
from __future__ import annotations

import json
import re

from dolly import prompts

ROLES = ("system", "user", "assistant")
# Reasons a conversation is rejected for, beyond validation.REASONS' `encoding` (lone surrogates).
CONVERSATION_REASONS = ("malformed_conversation", "unsupported_field", "unknown_role",
                        "roles_out_of_order", "no_assistant_turn", "not_ending_with_assistant",
                        "non_string_content", "blank_content")
LAYOUTS = {"messages": ("role", "content"), "conversations": ("from", "value")}
LAYOUT_NAMES = {"messages": "messages", "conversations": "sharegpt"}
# ShareGPT's `from`, lower-cased -> role.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}
# Turn keys whose content a text chat cannot hold: a non-empty value rejects the record.
UNSUPPORTED = ("tool_calls", "function_call", "tool_call_id")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _newlines(s: str) -> str:
    return s if "\r" not in s else s.replace("\r\n", "\n").replace("\r", "\n")


def _keys(value: dict) -> list[str]:
    """The conversation keys a record holds a value for: not null and not an empty text (a CSV
    row has every column, "" where it has none)."""
    return [k for k in LAYOUTS if value.get(k) is not None and value.get(k) != ""]


def is_conversation(value) -> bool:
    """Whether a record is a chat: an object with a `messages` or `conversations` key that is not
    null, whatever it holds (a bad one is then rejected by `parse_conversation` with its reason,
    not taken for an instruction record missing its instruction)."""
    return isinstance(value, dict) and bool(_keys(value))


def _role(raw, key: str):
    if key == "messages":
        return raw if raw in ROLES else None
    return SHAREGPT_ROLES.get(raw.lower()) if isinstance(raw, str) else None


def _text(content) -> str | None:
    """A turn's content as text: a string, or the texts of a list of text parts joined with
    "\\n"; None when it is neither."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            return None
        texts.append(part["text"])
    return "\n".join(texts)


def _order(roles: list[str]) -> str | None:
    start = 1 if roles[:1] == ["system"] else 0
    for i, role in enumerate(roles[start:]):
        if role != ("user", "assistant")[i % 2]:
            return "roles_out_of_order"
    if "assistant" not in roles:
        return "no_assistant_turn"
    if roles[-1] != "assistant":
        return "not_ending_with_assistant"
    return None


def parse_conversation(value: dict) -> tuple[list[dict] | None, str | None, str]:
    """(messages, reason, layout) for a record that `is_conversation`: messages as
    `[{"role", "content"}, ...]` (roles from ROLES, content text with `\\n` line ends, a blank
    system turn dropped) and reason None, or None and the reason (CONVERSATION_REASONS or
    `encoding`); layout "messages" or "sharegpt". The rules are the module's docstring."""
    keys = _keys(value) if isinstance(value, dict) else []
    key = keys[0] if keys else "messages"
    layout = LAYOUT_NAMES[key]
    turns = value.get(key) if len(keys) == 1 else None
    if isinstance(turns, str):  # a CSV cell (or any text field) holding the turns as JSON text
        try:
            turns = json.loads(turns)
        except ValueError:
            return None, "malformed_conversation", layout
    role_key, content_key = LAYOUTS[key]
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and role_key in t and content_key in t for t in turns):
        return None, "malformed_conversation", layout
    for t in turns:
        if any(t.get(k) not in (None, [], {}, "") for k in UNSUPPORTED) or (
                t.get("weight") is not None and t["weight"] != 1):
            return None, "unsupported_field", layout
    roles = [_role(t[role_key], key) for t in turns]
    if None in roles:
        return None, "unknown_role", layout
    reason = _order(roles)
    if reason:
        return None, reason, layout
    messages = []
    for role, t in zip(roles, turns):
        text = _text(t[content_key])
        if text is None:
            return None, "non_string_content", layout
        if prompts.is_blank(text):
            if role == "system":
                continue
            return None, "blank_content", layout
        if not text.isascii() and _SURROGATE.search(text):
            return None, "encoding", layout
        messages.append({"role": role, "content": _newlines(text)})
    return messages, None, layout


def dolly_pair(messages: list[dict]) -> tuple[str, str] | None:
    """(instruction, response) when `messages` (as `parse_conversation` returns them) is one user
    turn and one assistant turn, nothing else; else None: Dolly's prompt format has no system
    prompt and no earlier turns."""
    if [m["role"] for m in messages] != ["user", "assistant"]:
        return None
    return messages[0]["content"], messages[1]["content"]


# An instruction record as a chat (one user turn: instruction, blank line, input): defined with
# the formats, which serving ships.
instruction_messages = prompts.instruction_messages
