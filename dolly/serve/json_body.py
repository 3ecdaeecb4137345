"""A JSON request body parsed strictly, for every route of the served model (`/invocations` and
the OpenAI routes): one rule set, so that any body that is not well-formed is a 400 with one line
naming the fault, never a 500 and never a silent reinterpretation.

Python's `json.loads` (what MLflow's server uses) would raise RecursionError (a 500) on nesting
deeper than the recursion limit, ValueError (a 500) on an integer of more than 4,300 digits,
keep the last of a key given twice, and pass a lone surrogate ("\\ud800") on to the tokenizer.
"""
from __future__ import annotations

import json

from dolly.serve.contract import _short, bad_input, printable, text_fault

MAX_DEPTH = 32  # arrays and objects inside one another (a documented request needs at most 4)
MAX_DIGITS = 100  # in an integer of a JSON body


def request_text(body: bytes | str) -> str:
    """The body as text: UTF-8 (a leading byte-order mark is skipped), else a 400."""
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise bad_input(f"the body is not valid UTF-8 (byte {e.start})") from None


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise bad_input(f"the body gives the key {_short(twice)} twice in one object: send each "
                        "key once")
    return obj


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise bad_input(f"the body holds an integer of {digits} digits: at most {MAX_DIGITS}")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise bad_input(f"the body holds a number too large for a float: {_short_text(text)}")
    return value


def _short_text(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _where(path) -> str:
    """A JSON path (`inputs[0].instruction`) from the walk's linked (parent, key) pairs."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    out = ""
    for key in reversed(keys):
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            name = printable(key)
            out += ("." if out else "") + (name if len(name) <= 40 else name[:37] + "...")
    return out or "the top level"


def _check_tree(payload) -> None:
    """Refuses a parsed body nested more than MAX_DEPTH deep, or holding a string or key that is
    not valid Unicode text (a lone surrogate), naming where."""
    stack = [(payload, 1, None)]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if fault := text_fault(value):
                raise bad_input(f"the body is not valid Unicode text: {fault} of {_where(path)}")
            continue
        if depth > MAX_DEPTH and isinstance(value, (dict, list)):
            raise bad_input(f"the body is nested too deeply: at most {MAX_DEPTH} levels of arrays "
                            "and objects")
        if isinstance(value, dict):
            for key, item in value.items():
                if fault := text_fault(key):
                    raise bad_input(f"the body is not valid Unicode text: {fault} of a key in "
                                    f"{_where(path)}")
                if isinstance(item, (str, dict, list)):
                    stack.append((item, depth + 1, (path, key)))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, (path, i)) for i, item in enumerate(value)
                         if isinstance(item, (str, dict, list)))


def loads(body: bytes | str):
    """The parsed JSON value of a request body. Raises MlflowException (400, one line): text that
    is not UTF-8 or not JSON, nesting deeper than MAX_DEPTH, an integer of more than MAX_DIGITS
    digits or a number a float cannot hold, a lone surrogate in any string or key, a key given
    twice in one object. NaN, Infinity and -Infinity are taken (NaN is a missing value)."""
    text = request_text(body)
    try:
        payload = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_integer,
                             parse_float=_float)
    except json.JSONDecodeError as e:
        raise bad_input(f"the body is not valid JSON: {e.msg} (line {e.lineno}, column "
                        f"{e.colno})") from None
    except RecursionError:
        raise bad_input(f"the body is nested too deeply: at most {MAX_DEPTH} levels of arrays and "
                        "objects") from None
    _check_tree(payload)
    return payload
