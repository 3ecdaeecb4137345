"""The request contract of the registered model, one rule set for every path (in-process
`predict`, `spark_udf`, `mlflow models serve`): what a request holds and what is refused.

- Records have an `instruction` (string) and an optional `input` (`context`, as dolly-15k names
  it, is its alias), taken *by name*, in any case as Spark finds columns (`Instruction`,
  `Context`; two names that differ only in case are refused), from a DataFrame, records (a
  list of dicts), a dict of columns or a Spark struct; other columns are ignored. A bare string, a list of strings or one
  unnamed column are instructions.
- Null, NaN and pandas' NA mean "missing": a missing instruction gets "" without running the
  model, a missing input means "no input".
- Refused with one line (MlflowException INVALID_PARAMETER_VALUE, HTTP 400 when served), naming
  the row, the column or the param: a non-string instruction or input, one that is not valid
  Unicode text (a lone surrogate such as "\\ud800", which no tokenizer takes), a column name given
  twice, a param the model does not know (MLflow itself would warn and drop it), of the wrong type
  or outside its range (a number too large for a float included).
- `signature()` states the same contract in MLflow's terms for the logged model.
"""
from __future__ import annotations

from typing import Any

from dolly import prompts

METADATA_KEY = "dolly_serving"
INSTRUCTION = "instruction"
INPUT = "input"
INPUT_ALIASES = ("input", "context")  # dolly-15k calls a record's input its context
MESSAGES = "messages"  # a record's conversation: a list of {role, content}, the last the user's
ROLES = ("system", "user", "assistant")


def json_kind(value) -> str:
    """What a non-string value is, in JSON's words (as batch_score's `error` column says it):
    'a number', 'a boolean', 'a list', 'an object', 'a string', 'null', else 'a <Python type>'."""
    import numbers

    import numpy as np

    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, numbers.Number):  # numpy's numbers register as Numbers
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def bad_input(message: str):
    """The error a caller sees for input the model cannot answer (HTTP 400 when serving): one
    line, at most 300 characters, so that a huge request is never echoed back."""
    from mlflow.exceptions import MlflowException

    line = " ".join(printable(str(message)).split())
    return MlflowException.invalid_parameter_value(line[:297] + "..." if len(line) > 300 else line)


def printable(text: str) -> str:
    """`text` with each lone surrogate written as its escape (`\\ud800`): a message that quotes
    invalid text can still be encoded (UTF-8 log, JSON body)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_fault(text: str) -> str | None:
    """Why `text` (a str) is not valid Unicode text, or None when it is: a lone surrogate
    (U+D800..U+DFFF not in a pair, e.g. JSON's "\\ud800"), which cannot be encoded and which the
    tokenizer refuses."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return (f"a lone surrogate {text[e.start].encode('unicode_escape').decode('ascii')} at "
                f"character {e.start}")


def is_missing(x) -> bool:
    """None, NaN (a null cell of pandas or Spark) or pandas' NA: a value that is not there."""
    import pandas as pd

    return x is None or x is pd.NA or (isinstance(x, float) and x != x)


def _field(names: list[str], wanted: tuple[str, ...], record: int | None = None) -> str | None:
    """The one name in `names` that is one of `wanted`, compared ignoring case as Spark does by
    default (spark.sql.caseSensitive=false: `Instruction`, `Context` and `INPUT` are found), or
    None. Raises MlflowException (400) when two names match: two spellings of one field
    (`input` and `Input`) or both aliases (`input` and `context`)."""
    found = [n for n in names if n.lower() in wanted]
    if len(found) > 1:
        a, b = (f"'{printable(n)[:40]}'" for n in found[:2])
        if found[0].lower() == found[1].lower():
            where = "columns" if record is None else f"record {record}: fields"
            raise bad_input(f"{where} {a} and {b} differ only in case: they name one field (as "
                            "in Spark); send one of them")
        if record is None:
            raise bad_input(f"both {a} and {b} columns: '{INPUT_ALIASES[1]}' is another name "
                            f"for '{INPUT}'; send one of them")
        raise bad_input(f"record {record} has both {a} and {b}: send one of them")
    return found[0] if found else None


def _columns_of(frame) -> tuple[list, list | None, list | None]:
    """(instructions, inputs or None, conversations or None) from a DataFrame, by column name (in
    any case)."""
    names = [str(c) for c in frame.columns]
    if len(set(names)) < len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise bad_input(f"the column {_short(twice)} is given {names.count(twice)} times: name "
                        "each column once")
    instruction = _field(names, (INSTRUCTION,))
    messages = _field(names, (MESSAGES,))
    convs = frame[frame.columns[names.index(messages)]].tolist() if messages is not None else None
    if instruction is not None:
        ins = frame[frame.columns[names.index(instruction)]].tolist()
    elif convs is not None:  # conversations only
        ins = [None] * len(convs)
    elif len(names) == 1 and names[0].lower() not in INPUT_ALIASES:  # one column: instructions
        ins = frame.iloc[:, 0].tolist()
    else:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise bad_input(f"no '{INSTRUCTION}' column among the {len(names)} columns ({shown}); "
                        f"name the columns '{INSTRUCTION}' and optionally '{INPUT}' (or send "
                        f"conversations in a '{MESSAGES}' column)")
    given = _field(names, INPUT_ALIASES)
    inputs = frame[frame.columns[names.index(given)]].tolist() if given is not None else None
    return ins, inputs, convs


def _record(row: dict, i: int) -> tuple[Any, Any, Any]:
    keys = [str(k) for k in row]
    values = list(row.values())
    instruction = _field(keys, (INSTRUCTION,), i)
    messages = _field(keys, (MESSAGES,), i)
    if instruction is None and messages is None:
        raise bad_input(f"record {i} has no '{INSTRUCTION}' field (fields: "
                        f"{', '.join(keys[:8]) or 'none'})")
    given = _field(keys, INPUT_ALIASES, i)
    return (values[keys.index(instruction)] if instruction is not None else None,
            values[keys.index(given)] if given is not None else None,
            values[keys.index(messages)] if messages is not None else None)


def records_of(data) -> tuple[list, list, list | None]:
    """(instructions, inputs, conversations or None) of a pyfunc input, values as given (checked
    by `as_frame`).

    Named columns from a DataFrame (also what `spark_udf` passes, struct or columns), a dict of
    columns, or a list of records (dicts); a string, a list of strings, a Series, a 1-D array or
    a single column: instructions without input. Raises MlflowException (400) on other shapes.
    """
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        return [data], [None], None
    if isinstance(data, pd.DataFrame):
        if data.shape[1] == 0:
            raise bad_input(f"the input has no columns: send an '{INSTRUCTION}' column")
        ins, inputs, convs = _columns_of(data)
        return ins, inputs if inputs is not None else [None] * len(ins), convs
    if isinstance(data, pd.Series):
        return data.tolist(), [None] * len(data), None
    if isinstance(data, np.ndarray):
        if data.ndim == 2 and data.shape[1] == 1:
            data = data[:, 0]
        if data.ndim > 1:
            raise bad_input(f"an array of shape {data.shape}: send named columns "
                            f"('{INSTRUCTION}', '{INPUT}') or one column of instructions")
        values = data.tolist() if data.ndim else [data.item()]
        return values, [None] * len(values), None
    if isinstance(data, dict):
        only = str(next(iter(data))) if len(data) == 1 else None
        if (only is not None and only.lower() not in (INSTRUCTION, MESSAGES)
                and only.lower() not in INPUT_ALIASES):
            # {"anything": [instructions]}
            return records_of(pd.Series(_as_list(next(iter(data.values()))), dtype=object))
        try:
            frame = pd.DataFrame({k: _as_list(v) for k, v in data.items()}, dtype=object)
        except ValueError:
            raise bad_input("the columns of the input differ in length") from None
        return records_of(frame)
    if isinstance(data, (list, tuple)):
        ins, inputs, convs = [], [], []
        for i, row in enumerate(data):
            if isinstance(row, dict):
                a, b, c = _record(row, i)
            else:
                a = row[0] if isinstance(row, (list, tuple)) and len(row) == 1 else row
                b = c = None
            ins.append(a)
            inputs.append(b)
            convs.append(c)
        return ins, inputs, (convs if any(c is not None for c in convs) else None)
    raise bad_input(f"expected records or instructions, got {json_kind(data)}")


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else [v]


def _conversation(value, i: int) -> list[dict] | None:
    """A record's conversation, checked: a list (or array, as Spark passes an array of structs)
    of {role, content} with roles system, user, assistant, string contents, the last turn the
    user's; None for a missing or empty one. Raises MlflowException (400) naming the row."""
    import numpy as np

    if is_missing(value):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise bad_input(f"row {i}: {MESSAGES} is {json_kind(value)}, expected a list of "
                        "{role, content} messages (or null)")
    if not value:
        return None
    turns = []
    for j, m in enumerate(value):
        if hasattr(m, "asDict"):  # a Spark Row
            m = m.asDict()
        if not isinstance(m, dict):
            raise bad_input(f"row {i}: {MESSAGES}[{j}] is {json_kind(m)}, expected an object "
                            "with role and content")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role  # OpenAI's newer name for system
        if role not in ROLES:
            raise bad_input(f"row {i}: {MESSAGES}[{j}].role must be one of {', '.join(ROLES)}, "
                            f"got {_short(role) if not is_missing(role) else 'null'}")
        if not isinstance(content, str):
            raise bad_input(f"row {i}: {MESSAGES}[{j}].content is "
                            f"{json_kind(None if is_missing(content) else content)}, expected a "
                            "string")
        if fault := text_fault(content):
            raise bad_input(f"row {i}: {MESSAGES}[{j}].content is not valid Unicode text ({fault})")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user":
        raise bad_input(f"row {i}: the last message must be the user's, got "
                        f"{turns[-1]['role']}: the model answers the user's last turn")
    return turns


def as_frame(data):
    """The checked records of a pyfunc input: a DataFrame with string columns `instruction` and
    `input` ("" where missing or null), one row per record, in order, plus a `messages` column
    (each a checked list of {role, content}, or None) when the input has conversations.

    Raises MlflowException (400) naming the first row whose instruction or input is present but
    not a string (a number, a boolean, a list, ...), or whose conversation is malformed.
    """
    import pandas as pd

    if isinstance(data, pd.DataFrame) and list(data.columns) in (
            [INSTRUCTION, INPUT], [INSTRUCTION, INPUT, MESSAGES]) \
            and data.attrs.get(METADATA_KEY):
        return data  # already checked
    ins, inputs, convs = records_of(data)
    for name, values in ((INSTRUCTION, ins), (INPUT, inputs)):
        for i, v in enumerate(values):
            if is_missing(v):
                values[i] = ""
            elif not isinstance(v, str):
                raise bad_input(f"row {i}: {name} is {json_kind(v)}, expected a string "
                                f"(or null for {'no input' if name == INPUT else 'no answer'})")
            elif fault := text_fault(v):
                raise bad_input(f"row {i}: {name} is not valid Unicode text ({fault})")
    columns = {INSTRUCTION: [str(v) for v in ins], INPUT: [str(v) for v in inputs]}
    if convs is not None:
        columns[MESSAGES] = [_conversation(c, i) for i, c in enumerate(convs)]
    frame = pd.DataFrame(columns, dtype=object)
    frame.attrs[METADATA_KEY] = True
    return frame


# --- generation params --------------------------------------------------------------------------

def _is_long(v) -> bool:
    """An integer that fits the signature's `long` (64 bits); not a boolean."""
    return isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63


def _is_float(v) -> bool:
    """A finite number that a float holds (an int of 400 digits is not: float() overflows)."""
    import math

    if not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


# name: (type check, range check, the allowed range in words)
_PARAMS = {
    "max_new_tokens": (_is_long, lambda v: v >= 1, "an integer >= 1"),
    "temperature": (_is_float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (_is_float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "top_k": (_is_long, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "do_sample": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
}


def check_params(params, known=None) -> dict:
    """The generation params of a request, checked: unknown names, types and ranges give one
    line naming the param and its allowed range (MlflowException, 400); null means the default
    (left out). `known`: the names the model's signature declares (default: all of _PARAMS)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_input(f"params must be an object of name: value, got {json_kind(params)}")
    known = set(known if known is not None else _PARAMS)
    if unknown := sorted(str(k) for k in params if str(k) not in known):
        raise bad_input(f"unknown params {unknown}: this model takes {sorted(known)}")
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        is_type, in_range, allowed = _PARAMS.get(name, (lambda v: True, lambda v: True, ""))
        if not is_type(value) or (isinstance(value, bool) and name != "do_sample") \
                or not in_range(value):
            raise bad_input(f"{name} must be {allowed}, got {_short(value)}")
        out[name] = value
    return out


def _short(value) -> str:
    import json

    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 40:
        return "an integer of over 40 digits"  # str() of one over 4300 digits would raise
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def signature():
    """Input: named columns `instruction` (string, required) and `input` (string, optional;
    `context` is also taken for it); output: one response string per record; params: Dolly's
    generation defaults (dolly.prompts.GENERATION_DEFAULTS)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    params = infer_signature(["x"], params=dict(prompts.GENERATION_DEFAULTS)).params
    inputs = Schema([ColSpec("string", INSTRUCTION), ColSpec("string", INPUT, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]), params=params)
