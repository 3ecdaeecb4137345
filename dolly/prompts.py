"""Dolly v1's prompt format, special tokens and generation defaults: the one source of truth.

Training text, evaluation prompts and the served model's prompts all come from here (one rule,
`has_input`, picks the template), so the model is always asked in exactly the format it was
trained on.
"""
from __future__ import annotations

import unicodedata

INTRO_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INTRO_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "### Input:"
RESPONSE_KEY = "### Response:"
# Dolly adds the response key *with* its newline as one token, so masking can never miss it.
RESPONSE_KEY_NL = RESPONSE_KEY + "\n"
END_KEY = "### End"
# Order matters only for readability; these are added as additional special tokens.
SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)

# Dolly v1 generation defaults (training/generate.py): sampled with nucleus 0.92, top_k off.
GENERATION_DEFAULTS = {
    "do_sample": True,
    "top_p": 0.92,
    "top_k": 0,
    "max_new_tokens": 256,
    "temperature": 1.0,
}

# The no-input prompt as MLflow's transformers flavor records it (`{prompt}` = the instruction):
# logged with the model for `mlflow.transformers.load_model` users; dolly.serve.pyfunc formats each
# record itself, with or without input.
PROMPT_TEMPLATE = (INTRO_NO_INPUT + "\n\n" + INSTRUCTION_KEY + "\n{prompt}\n\n"
                   + RESPONSE_KEY_NL)
END_SUFFIX = "\n\n" + END_KEY


# Code points that show nothing beyond str.isspace() and Unicode's format (Cf) and control (Cc)
# categories: the rest of Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties
# .txt: combining grapheme joiner, Hangul fillers, Khmer inherent vowels, Mongolian free
# variation selectors, variation selectors 1-256) and U+2800 BRAILLE PATTERN BLANK.
_INVISIBLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0"
    + "".join(map(chr, range(0xFE00, 0xFE10))) + "".join(map(chr, range(0xE0100, 0xE01F0))))


def is_blank(text: str) -> bool:
    """Whether `text` (a str) shows nothing: every character is whitespace (`str.isspace`: spaces,
    tabs, line ends, U+0085, U+2028/2029, U+3000...), a Unicode format or control character
    (categories Cf, Cc: U+200B ZERO WIDTH SPACE, U+200D, U+2060 WORD JOINER, U+FEFF BOM, U+00AD
    SOFT HYPHEN, NUL...) or another default-ignorable code point (variation selectors, Hangul
    fillers). A blank instruction or response is rejected by data_prep; a blank input means "no
    input"; the served model answers "" to a blank instruction without running the model."""
    for ch in text:  # stops at the first visible character: the first, for almost any text
        if not (ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc")):
            return False
    return True


def has_input(input) -> bool:
    """Whether a record's input selects the with-input template: a string that is not blank
    (`is_blank`). None, "", whitespace and invisible-only text mean "no input". Training,
    evaluation and the served model all decide with this one rule."""
    return isinstance(input, str) and not is_blank(input)


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt up to and including the response key: what generation continues from.

    Dolly v1 / Alpaca's with-input template when `has_input(input)`, else the no-input one.
    """
    return "".join(text for _, text in prompt_parts(instruction, input))


def prompt_parts(instruction: str, input: str | None = None) -> list[tuple[str, str]]:
    """Dolly's prompt for a record as pieces (kind, text), kind "template", "instruction" or
    "input"; joined, the texts are `format_prompt(instruction, input)`. Shortening a prompt
    (dolly.generation.shorten_prompt_ids) needs to know which text is the user's."""
    if has_input(input):
        return [("template", INTRO_WITH_INPUT + "\n\n" + INSTRUCTION_KEY + "\n"),
                ("instruction", instruction), ("template", "\n\n" + INPUT_KEY + "\n"),
                ("input", input), ("template", "\n\n" + RESPONSE_KEY_NL)]
    return [("template", INTRO_NO_INPUT + "\n\n" + INSTRUCTION_KEY + "\n"),
            ("instruction", instruction), ("template", "\n\n" + RESPONSE_KEY_NL)]


def format_record(instruction: str, input: str | None, response: str) -> str:
    """Byte-identical to Dolly v1's training text: Alpaca's `text` column + "\\n\\n### End"."""
    return format_prompt(instruction, input) + response + END_SUFFIX


def special_ids(tok) -> tuple[int, int]:
    """(response key id, end key id) in `tok` (a Hugging Face tokenizer with Dolly's markers added
    as special tokens): the two tokens the label mask and generation's stop depend on."""
    return tok.convert_tokens_to_ids(RESPONSE_KEY_NL), tok.convert_tokens_to_ids(END_KEY)


def parse_response(generated: str) -> str:
    """The answer in generated text: what follows the response key, up to `### End`, stripped."""
    start = generated.find(RESPONSE_KEY_NL)
    if start >= 0:
        generated = generated[start + len(RESPONSE_KEY_NL):]
    end = generated.find(END_KEY)
    if end >= 0:
        generated = generated[:end]
    return generated.strip()
