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


def special_token_ids(tokenizer) -> set[int]:
    """Every special token id of a Hugging Face tokenizer: `all_special_ids` and the added tokens
    marked special (Dolly's markers, ChatML's), which `all_special_ids` may not list. What
    `decode(..., skip_special_tokens=True)` leaves out."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items()
                                             if getattr(t, "special", False)}


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


# --- conversations and the chat template --------------------------------------------------------

ROLES = ("system", "user", "assistant")
# The template a tokenizer without one gets when `prompt_format=chat_template` (and the tiny-chat
# profile's): ChatML, the form Qwen and many open chat models use (also TRL's
# `setup_chat_format`). Its two markers are added as special tokens.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class TemplateError(ValueError):
    """A chat template that cannot be trained on faithfully: it renders an earlier turn
    differently once later turns follow, so no assistant span of the text is the same in training
    and serving."""


def instruction_messages(instruction: str, input: str | None = None,
                         response: str | None = None) -> list[dict[str, str]]:
    """An instruction record as a conversation: one user turn whose content is the instruction,
    then, when `has_input(input)`, a blank line ("\\n\\n") and the input; then the assistant
    turn with `response` when one is given. How `prompt_format=chat_template` renders Alpaca and
    dolly-15k records (and instruction requests to a chat model)."""
    user = instruction + ("\n\n" + input if has_input(input) else "")
    turns = [{"role": "user", "content": user}]
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


class NotDollyShape(TemplateError):
    """A conversation that Dolly's format cannot hold (more than one user turn and its answer,
    or a system turn)."""


class DollyFormat:
    """Dolly v1's format (`format_record`): an instruction (and input) and one response. A
    conversation maps onto it only as one user turn then one assistant turn."""

    name = "dolly"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def render(self, instruction: str, input: str | None, response: str,
               messages: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(training text, [(start, end)] character spans that carry the loss): the response
        and `\\n\\n### End`. Raises TemplateError for a conversation Dolly cannot represent."""
        if messages is not None:
            instruction, input, response = self._pair(messages, with_answer=True)
        prompt = format_prompt(instruction, input)
        text = prompt + response + END_SUFFIX
        return text, [(len(prompt), len(text))]

    def prompt(self, instruction: str | None = None, input: str | None = None,
               messages: list[dict] | None = None) -> str:
        """The text generation continues from, ending with the response key."""
        if messages is not None:
            instruction, input, _ = self._pair(messages, with_answer=False)
        return format_prompt(instruction, input)

    def prompt_pair(self, messages: list[dict]) -> tuple[str, None]:
        """(instruction, input) of a conversation of one user turn (its answer to come)."""
        instruction, input, _ = self._pair(messages, with_answer=False)
        return instruction, input

    @staticmethod
    def _pair(messages, with_answer: bool):
        roles = [m["role"] for m in messages]
        want = ["user", "assistant"] if with_answer else ["user"]
        if roles != want:
            raise NotDollyShape(
                "prompt_format=dolly holds one user turn and one answer; this conversation has "
                f"{len(messages)} turns ({', '.join(roles)}): use prompt_format=chat_template")
        return messages[0]["content"], None, messages[1]["content"] if with_answer else None

    def stop_ids(self, tokenizer) -> list[int]:
        """`### End`, and the tokenizer's eos (a base model's own end of text)."""
        _, end_id = special_ids(tokenizer)
        return sorted({end_id} | ({tokenizer.eos_token_id}
                                  if tokenizer.eos_token_id is not None else set()))

    def end_ids(self, tokenizer) -> list[int]:
        """The ids that mean "the answer is complete" (`### End`)."""
        return [special_ids(tokenizer)[1]]

    def answer(self, text: str) -> str:
        return parse_response(text)


class ChatTemplateFormat:
    """The tokenizer's own chat template (a Jinja template, rendered as Hugging Face's
    `apply_chat_template` renders it, special tokens passed by name). Loss spans come from the
    rendered text: for each assistant turn i, the text of turns [:i] with the generation prompt
    ends where turn i's answer starts; the text of turns [:i+1] without trailing whitespace ends
    after its end-of-turn marker. Both must be prefixes of the whole rendering (TemplateError
    otherwise: the template renders history differently from a last turn)."""

    name = "chat_template"

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None):
        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self._end_of_turn: str | None = None

    @classmethod
    def of(cls, tokenizer) -> "ChatTemplateFormat":
        template = chat_template_of(tokenizer)
        if not template:
            raise TemplateError("the tokenizer has no chat template (none, or named templates "
                                "without a 'default' one)")
        return cls(template, dict(tokenizer.special_tokens_map))

    def _render(self, messages, add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = {k: v for k, v in self.special_tokens.items() if isinstance(v, str)}
        rendered, _ = render_jinja_template(conversations=[list(messages)],
                                            chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt, **kwargs)
        return rendered[0]

    def render(self, instruction: str | None, input: str | None, response: str | None,
               messages: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """(training text, [(start, end)] character spans of every assistant turn, each from
        its first character through its end-of-turn marker)."""
        if messages is None:
            messages = instruction_messages(instruction, input, response)
        full = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            upto = full if i == len(messages) - 1 else self._render(messages[:i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(
                    f"the chat template renders turn {i + 1} differently once later turns "
                    "follow, so training and serving would see different text")
            at = upto.find(m["content"], len(before))
            content_end = at + len(m["content"]) if at >= 0 else len(before)
            spans.append((len(before), max(content_end, len(upto.rstrip()))))
        return full, spans

    def prompt(self, instruction: str | None = None, input: str | None = None,
               messages: list[dict] | None = None) -> str:
        """The rendering of the conversation so far plus the assistant's generation prompt."""
        if messages is None:
            messages = instruction_messages(instruction, input)
        return self._render(messages, True)

    def end_of_turn(self) -> str:
        """The text the template writes after an assistant answer, up to its last visible
        character (`<|im_end|>`, `<|eot_id|>`, `</s>`...); rendered once, then remembered
        (every answer is parsed with it)."""
        if self._end_of_turn is None:
            probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            text, spans = self.render(None, None, None, probe)
            start, end = spans[-1]
            at = text.find("y", start)
            self._end_of_turn = text[at + 1:end] if at >= 0 else ""
        return self._end_of_turn

    def end_ids(self, tokenizer) -> list[int]:
        """The special tokens of the end-of-turn text: generation stops at them."""
        ids = tokenizer(self.end_of_turn(), add_special_tokens=False)["input_ids"]
        special = special_token_ids(tokenizer)
        return sorted({i for i in ids if i in special})

    def stop_ids(self, tokenizer) -> list[int]:
        """End-of-turn tokens and the tokenizer's eos."""
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return sorted(set(self.end_ids(tokenizer)) | eos)

    def answer(self, text: str) -> str:
        eot = self.end_of_turn().strip()
        if eot and eot in text:
            text = text[:text.index(eot)]
        return text.strip()


def chat_template_of(tokenizer) -> str | None:
    """The tokenizer's chat template: its template, or of several named ones the 'default'; None
    when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def resolve_format(name: str, tokenizer) -> str:
    """`dolly` or `chat_template` for a `prompt_format` setting: `auto` is the chat template when
    the tokenizer has one (`chat_template_of`), else Dolly's."""
    if name == "auto":
        return "chat_template" if chat_template_of(tokenizer) else "dolly"
    return name


def get_format(name: str, tokenizer):
    """The format object of a resolved `prompt_format` for `tokenizer`."""
    name = resolve_format(name, tokenizer)
    if name == "dolly":
        return DollyFormat(tokenizer)
    if name == "chat_template":
        return ChatTemplateFormat.of(tokenizer)
    raise ValueError(f"unknown prompt format {name!r}")
