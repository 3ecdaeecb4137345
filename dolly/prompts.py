"""Dolly v1's prompt format, special tokens and generation defaults: the one source of truth.

Training text, evaluation prompts and the registered model's prompt template all come from here,
so the model is always asked questions in exactly the format it was trained on.
"""
from __future__ import annotations

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

_PROMPT_NO_INPUT = INTRO_NO_INPUT + "\n\n" + INSTRUCTION_KEY + "\n{instruction}\n\n" + RESPONSE_KEY_NL
_PROMPT_WITH_INPUT = (
    INTRO_WITH_INPUT + "\n\n" + INSTRUCTION_KEY + "\n{instruction}\n\n"
    + INPUT_KEY + "\n{input}\n\n" + RESPONSE_KEY_NL
)
# The registered model's prompt template (MLflow fills `{prompt}` with the user's instruction).
PROMPT_TEMPLATE = _PROMPT_NO_INPUT.replace("{instruction}", "{prompt}")
END_SUFFIX = "\n\n" + END_KEY


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The prompt up to and including the response key: what generation continues from."""
    if input:
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT_NO_INPUT.format(instruction=instruction)


def format_record(instruction: str, input: str | None, response: str) -> str:
    """Byte-identical to Dolly v1's training text: Alpaca's `text` column + "\\n\\n### End"."""
    return format_prompt(instruction, input) + response + END_SUFFIX


def parse_response(generated: str) -> str:
    """The answer in generated text: what follows the response key, up to `### End`, stripped."""
    start = generated.find(RESPONSE_KEY_NL)
    if start >= 0:
        generated = generated[start + len(RESPONSE_KEY_NL):]
    end = generated.find(END_KEY)
    if end >= 0:
        generated = generated[:end]
    return generated.strip()
