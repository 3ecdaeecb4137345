"""Which records become training text: each record mapped by its own layout, checked, normalised
and formatted in Dolly's template; every other record rejected with a reason (nothing silent).

Rules (README, data_prep):
- Layout per record: Alpaca (`instruction`, `input`, `output`) or databricks-dolly-15k
  (`instruction`, `context`, `response`, `category`); `columns=` mappings win for their fields.
- instruction and response must be strings that are not blank (`dolly.prompts.is_blank`: nothing
  visible, only whitespace and invisible format characters such as U+200B or U+FEFF); input may
  be missing, null, NaN or blank, all meaning "no input" (Alpaca's no-input template); any other
  non-string is rejected.
- Line endings inside fields become `\\n` (what the served prompts use).
- Text that the tokenizer would encode as a control id (its eos/bos/pad, Dolly's markers: see
  `dolly.tokenizer.control_texts`) is rejected as `reserved_marker`, also when it only forms
  across a field's edge and the template (an input ending in "### Response:").
- Invalid bytes or lone surrogates in a used field are rejected as `encoding`.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from dolly import prompts
from dolly.errors import DataError
from dolly.data.conversations import CONVERSATION_REASONS, is_conversation, parse_conversation
from dolly.data.readers import Raw, show

CANONICAL = ("instruction", "input", "response")
# Auto-detected layouts: canonical field -> accepted column names, in order of preference.
LAYOUT = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "response": ("output", "response"),
    "category": ("category",),
}
# What the summary calls a record's layout, by the column its response came from.
LAYOUT_NAMES = {"output": "alpaca", "response": "dolly-15k"}

REASONS = ("malformed_json", "malformed_csv", "encoding", "not_an_object", "missing_instruction",
           "missing_response", "non_string_field", "blank_instruction", "blank_response",
           "reserved_marker", "duplicate", "too_long", *CONVERSATION_REASONS,
           "multi_turn_for_dolly", "template_refused", "prompt_tokens_differ")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_columns(spec: str) -> dict[str, str]:
    """'instruction=q,response=a' -> {'instruction': 'q', 'response': 'a'}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or key not in (*CANONICAL, "category") or not col:
            raise DataError(
                f"columns: bad entry '{part}' (expected field=column with field one of "
                f"instruction, input, response, category)")
        mapping[key] = col
    return mapping


class ControlText:
    """Finds control-token text in a formatted record. Fast path: each distinct 3-character
    prefix of the control texts occurs exactly as often as in the bare template (one
    `str.count` each); only otherwise is every control text counted."""

    def __init__(self, texts: Iterable[str]):
        self.texts = tuple(sorted(set(filter(None, texts))))
        self.prefixes = tuple(sorted({t[:3] for t in self.texts}))
        self.expected = {}
        for has_input in (False, True):
            bare = prompts.format_record("x", "x" if has_input else None, "x")
            self.expected[has_input] = (tuple(bare.count(p) for p in self.prefixes),
                                        tuple(bare.count(t) for t in self.texts))

    def found(self, text: str, has_input: bool) -> bool:
        prefixes, texts = self.expected[has_input]
        if tuple(map(text.count, self.prefixes)) == prefixes:
            return False
        return tuple(map(text.count, self.texts)) != texts


def _newlines(s: str) -> str:
    return s if "\r" not in s else s.replace("\r\n", "\n").replace("\r", "\n")


def _norm(s: str) -> str:
    return " ".join(s.split())


class Validator:
    """Sorts raw records, file after file, into `kept` (canonical dicts with their training
    `text`) and `rejected` (source, where, reason, record); duplicates are found across files."""

    def __init__(self, explicit: dict[str, str], control_texts: Iterable[str], fmt=None):
        self.explicit = explicit
        self.fmt = fmt if fmt is not None else prompts.DollyFormat()
        self.control = ControlText(control_texts)
        self._expected: dict[tuple, tuple[int, ...]] = {}
        self._detail: str | None = None  # why the last record was rejected, where a reason needs it
        self.kept: list[dict] = []
        self.rejected: list[dict] = []
        self.layouts: Counter = Counter()
        self._seen: set = set()
        self._columns = {f: (explicit[f],) if f in explicit else LAYOUT[f] for f in LAYOUT}

    def check_columns(self, name: str, raws: list[Raw]) -> None:
        """Raise DataError when no record of the file has an instruction or a response column."""
        seen: dict[str, None] = {}
        for r in raws:
            if isinstance(r.value, dict) and not is_conversation(r.value):
                seen.update(dict.fromkeys(r.value))
        if not seen:
            return  # nothing readable or conversations only: each record is checked alone
        missing = [f for f in ("instruction", "response")
                   if not any(c in seen for c in self._columns[f])]
        if missing:
            need = " and ".join(f"{f} ({'/'.join(self._columns[f])})" for f in missing)
            found = ", ".join(show(str(k)) for k in seen)
            raise DataError(f"{name}: none of the needed columns: {need}; found {found}")

    def _reject(self, r: Raw, reason: str) -> None:
        entry = {"source": r.source, "where": r.locator, "reason": reason,
                 "record": r.value if r.raw_text is None else r.raw_text}
        detail, self._detail = r.detail or self._detail, None
        if detail:
            entry["detail"] = detail
        self.rejected.append(entry)

    @staticmethod
    def _pick(v: dict, columns: tuple[str, ...]):
        for c in columns:
            if c in v:
                return v[c], c
        return None, None

    def add(self, raws: list[Raw]) -> None:
        for r in raws:
            if r.error:
                self._reject(r, r.error)
                continue
            reason = self._check(r)
            if reason:
                self._reject(r, reason)

    def _control_found(self, text: str, messages: list[dict]) -> bool:
        """Whether the rendered conversation holds control text beyond what its template writes
        for the same turns (the template rendered with "x" as every turn's content)."""
        roles = tuple(m["role"] for m in messages)
        if roles not in self._expected:
            bare = [{"role": role, "content": "x"} for role in roles]
            self._expected[roles] = tuple(self.fmt.render(None, None, None, bare)[0].count(t)
                                          for t in self.control.texts)
        return tuple(map(text.count, self.control.texts)) != self._expected[roles]

    def _render(self, ins, inp, resp, messages):
        """(text, loss spans, None) of a record in the run's format, or (None, None, reason):
        `multi_turn_for_dolly`, or `template_refused` (the template's own `raise_exception`,
        e.g. for a system turn; its message kept as the rejection's detail). Raises DataError
        for a template that renders history differently from a last turn (dolly.prompts)."""
        try:
            text, spans = self.fmt.render(ins, inp, resp, messages)
        except prompts.NotDollyShape:
            return None, None, "multi_turn_for_dolly"
        except prompts.TemplateError as e:
            raise DataError(f"prompt_format={self.fmt.name}: {e}") from None
        except Exception as e:  # the template's own refusal
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._detail = f"the chat template refused it: {why}"
            return None, None, "template_refused"
        return text, spans, None

    def _conversation(self, r: Raw) -> str | None:
        messages, reason, layout = parse_conversation(r.value)
        if reason:
            return reason
        text, spans, reason = self._render(None, None, None, messages)
        if reason:
            return reason
        cat, _ = self._pick(r.value, self._columns["category"])
        cat = cat if isinstance(cat, str) else ""
        if not (text.isascii() and cat.isascii()) and _SURROGATE.search(text + cat):
            return "encoding"
        if self.fmt.name == "dolly":
            if self.control.found(text, False):
                return "reserved_marker"
        elif self._control_found(text, messages):
            return "reserved_marker"
        key = tuple((m["role"], _norm(m["content"])) for m in messages)
        if len(messages) == 2:  # one user turn and its answer: the same as an instruction record
            key = (_norm(messages[0]["content"]), "", _norm(messages[1]["content"]))
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        self.layouts[layout] += 1
        last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        self.kept.append({"instruction": last_user, "input": "", "response": messages[-1]["content"],
                          "category": cat, "source": r.source, "where": r.locator, "text": text,
                          "messages": messages, "spans": spans})
        return None

    def _check(self, r: Raw) -> str | None:
        v = r.value
        if not isinstance(v, dict):
            return "not_an_object"
        if is_conversation(v):
            if any(isinstance(v.get(c), str) and v.get(c) != "" for f in ("instruction", "response")
                   for c in self._columns[f]):
                return "malformed_conversation"  # a chat and an instruction record in one
            return self._conversation(r)
        cols = self._columns
        ins, _ = self._pick(v, cols["instruction"])
        resp, rcol = self._pick(v, cols["response"])
        inp, _ = self._pick(v, cols["input"])
        if ins is None:
            return "missing_instruction"
        if resp is None:
            return "missing_response"
        if not (isinstance(ins, str) and isinstance(resp, str) and (inp is None or isinstance(inp, str))):
            return "non_string_field"
        if prompts.is_blank(ins):
            return "blank_instruction"
        if prompts.is_blank(resp):
            return "blank_response"
        if "\r" in ins or "\r" in resp:
            ins, resp = _newlines(ins), _newlines(resp)
        inp = _newlines(inp) if prompts.has_input(inp) else ""
        cat, _ = self._pick(v, cols["category"])
        cat = cat if isinstance(cat, str) else ""
        text, spans, reason = self._render(ins, inp, resp, None)
        if reason:
            return reason
        if not (text.isascii() and cat.isascii()) and _SURROGATE.search(text + cat):
            return "encoding"
        if (self.control.found(text, bool(inp)) if self.fmt.name == "dolly" else
                self._control_found(text, prompts.instruction_messages(ins, inp, resp))):
            return "reserved_marker"  # would break masking or stop generation early
        key = ((_norm(ins), _norm(inp), _norm(resp)) if self.fmt.name == "dolly" else
               # the chat template sees one user turn: the same text as a conversation's
               (_norm(prompts.instruction_messages(ins, inp)[0]["content"]), "", _norm(resp)))
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        self.layouts["columns" if "response" in self.explicit else LAYOUT_NAMES.get(rcol, rcol)] += 1
        self.kept.append({"instruction": ins, "input": inp, "response": resp, "category": cat,
                          "source": r.source, "where": r.locator, "text": text, "messages": None,
                          "spans": spans})
        return None
