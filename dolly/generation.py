"""Batched generation in Dolly's format: left-padded prompts, stop at `### End`, parsed answers.

Evaluation and the registered model's pyfunc (dolly.serve.pyfunc) both generate with this module, so
evaluation measures what users get. Prompts come from dolly.prompts, so the model is asked in
exactly the format it was trained on. Generation never runs past the model's context: the token
budget is capped to the room left after the prompt, and a prompt too long to leave room for an
answer is shortened, keeping the template and the *end* of the instruction.
"""
from __future__ import annotations

import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import StoppingCriteria

from dolly import prompts



@dataclass
class Generation:
    """One answer: the parsed response, whether it ended with `### End`, and its length."""

    response: str
    stopped: bool  # generated `### End` before the token limit
    new_tokens: int  # tokens generated, `### End` included, padding excluded
    prompt_tokens: int
    truncated_prompt: bool  # the prompt had to be shortened to fit the context
    expired: bool = False  # its deadline passed (or it was cancelled): not started, or cut short
    ended: bool = False  # ended by itself (an end-of-answer or stop token, or its Watch said so),
    # not by the token limit: OpenAI's finish_reason "stop" rather than "length"


@dataclass(eq=False)
class Watch:
    """What a caller can do to one row while it generates (streaming, stop strings, a client
    that went away): `cancelled` set stops the row at the next token (as a passed deadline does);
    `on_tokens(ids)` is called after each new token with the row's generated ids so far (list of
    int, prompt excluded) and returns True to end the row there (a stop string was reached).
    Called from the generating thread; it must be quick."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    on_tokens: Callable[[list[int]], bool] | None = None


@dataclass
class GenerationRun:
    """Every answer plus the wall time the batch loop took (for throughput)."""

    generations: list[Generation]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        total = sum(g.new_tokens for g in self.generations)
        return total / self.seconds if self.seconds > 0 else 0.0


def context_length(model, tokenizer=None) -> int:
    """The model's context in tokens (GPT-J: n_positions); the tokenizer's limit as a fallback."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def answer_room(max_new_tokens: int, context: int) -> int:
    """Tokens kept free for the answer when a prompt must be shortened (at most a quarter)."""
    return max(1, min(max_new_tokens, context // 4))


# A BPE token is rarely longer than a few characters: cutting a text to this many characters per
# token kept makes tokenizing a megabyte-long instruction cheap; the token-level cut is exact.
_CHARS_PER_TOKEN_BOUND = 64


def shorten_prompt_ids(tokenizer, instruction: str, input: str | None,
                       budget: int) -> tuple[list[int], bool]:
    """Token ids of Dolly's prompt for (instruction, input), at most `budget` tokens:
    (ids: list of int, whether the prompt had to be shortened).

    The one way a too-long prompt is shortened, in evaluation and in the served model
    (dolly.serve.pyfunc), so evaluation measures what users get. A prompt that fits is tokenized whole
    (the very ids training saw for that record's prompt). One over budget keeps the template
    whole and the *end* of the instruction (where the question usually is) and of the input:
    the instruction first, the input gets what is left (at least one token). If even the
    template does not fit, the last `budget` tokens (still ending with the response key).
    Raises ValueError if `budget` < 1.
    """
    if budget < 1:
        raise ValueError(f"a prompt budget of {budget} tokens leaves no room for a prompt")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    parts = prompts.prompt_parts(instruction, input)
    user_chars = sum(len(text) for kind, text in parts if kind != "template")
    if user_chars <= budget * _CHARS_PER_TOKEN_BOUND:
        ids = encode(prompts.format_prompt(instruction, input))
        if len(ids) <= budget:
            return ids, False
    pieces = [(kind, encode(text) if kind == "template"
               else encode(text[-budget * _CHARS_PER_TOKEN_BOUND:])) for kind, text in parts]
    frame = sum(len(piece) for kind, piece in pieces if kind == "template")
    room = budget - frame
    users = sum(kind != "template" for kind, _ in pieces)
    if room < users:
        return [t for _, piece in pieces for t in piece][-budget:], True
    lengths = {kind: len(piece) for kind, piece in pieces if kind != "template"}
    keep = {"instruction": min(lengths["instruction"], room - (users - 1))}
    if "input" in lengths:
        keep["input"] = min(lengths["input"], room - keep["instruction"])
    out: list[int] = []
    for kind, piece in pieces:
        out += piece if kind == "template" else (piece[-keep[kind]:] if keep[kind] else [])
    return out, True


def expired(deadlines: Sequence[float | None]) -> list[bool]:
    """For each deadline (`time.monotonic()` seconds; None = none), whether it has passed."""
    now = time.monotonic()
    return [d is not None and now >= d for d in deadlines]


class DeadlineStop(StoppingCriteria):
    """A stopping criterion (transformers' `StoppingCriteria` protocol): a row whose deadline
    (`time.monotonic()` seconds; None = none) has passed, or whose Watch was cancelled, counts as
    finished at the next step boundary, so nobody's abandoned request keeps the cores busy; a
    row whose Watch's `on_tokens` returns True ends there. Returns (batch,) bool and remembers,
    per row, the sequence length at which it was stopped and why (`reason`: "expired" or
    "watch"). `width`: the prompt width (where generated ids start); `stop_ids`: tokens after
    which a row has ended by itself (its watch is no longer called)."""

    def __init__(self, deadlines: Sequence[float | None],
                 watches: Sequence[Watch | None] | None = None, width: int = 0,
                 stop_ids: set[int] | None = None):
        self.deadlines = list(deadlines)
        self.watches = list(watches) if watches is not None else [None] * len(self.deadlines)
        self.width = width
        self.stop_ids = stop_ids or set()
        self.seen_at: list[int | None] = [None] * len(self.deadlines)
        self.reason: list[str | None] = [None] * len(self.deadlines)
        self._ended = [False] * len(self.deadlines)

    def expired(self) -> list[bool]:
        late = expired(self.deadlines)
        return [gone or (w is not None and w.cancelled.is_set())
                for gone, w in zip(late, self.watches)]

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        """`input_ids: (batch, seq) int64` so far, `scores: (batch, vocab) float` -> `(batch,)`
        bool on input_ids' device: True for each row stopped here (deadline, cancel, watch)."""
        late = self.expired()
        length = input_ids.shape[1]
        for j, gone in enumerate(late):
            if self.seen_at[j] is not None or self._ended[j]:
                continue
            if gone:
                self.seen_at[j], self.reason[j] = length, "expired"
                continue
            watch = self.watches[j]
            if watch is None or watch.on_tokens is None:
                continue
            ids = input_ids[j, self.width:].tolist()
            if ids and ids[-1] in self.stop_ids:
                self._ended[j] = True  # ended by itself; generate gives the rest
            elif watch.on_tokens(ids):
                self.seen_at[j], self.reason[j] = length, "watch"
        stopped = [s is not None for s in self.seen_at]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (Radford et al. 2019, the
    `bytes_to_unicode` table of GPT-2's encoder.py): the 188 printable bytes stand for themselves,
    the other 68 (controls, space, 0x7F-0xA0, 0xAD) for U+0100 onwards, in byte order."""
    own = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in own]
    table = {chr(b): b for b in own}
    table.update({chr(0x100 + n): b for n, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _gpt2_byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_KINDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _byte_kind(tokenizer) -> str | None:
    """'byte-level' (GPT-2, GPT-J, Pythia, Llama 3: tokens are strings of `_BYTE_LEVEL`
    characters), 'byte-fallback' (SentencePiece with `<0xNN>` byte tokens: Llama 2, Mistral) or
    None (no way back to bytes), read from the fast tokenizer's decoder."""
    try:
        return _KINDS[tokenizer]
    except (KeyError, TypeError):
        pass
    kind = None
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None:
        try:
            state = decoder.__getstate__()  # the decoder as JSON
            spec = state.decode() if isinstance(state, bytes) else str(state)
        except Exception:  # a decoder without a JSON state: no byte view
            spec = ""
        kind = ("byte-level" if '"ByteLevel"' in spec else
                "byte-fallback" if '"ByteFallback"' in spec else None)
    try:
        _KINDS[tokenizer] = kind
    except TypeError:
        pass
    return kind


def _token_bytes(tokenizer, ids: list[int], kind: str) -> bytes:
    special = prompts.special_token_ids(tokenizer)
    out = bytearray()
    for tok in tokenizer.convert_ids_to_tokens([t for t in ids if t not in special]):
        if tok is None:
            continue
        byte = _BYTE_TOKEN.fullmatch(tok) if kind == "byte-fallback" else None
        if byte:
            out.append(int(byte.group(1), 16))
        elif kind == "byte-level" and all(c in _BYTE_LEVEL for c in tok):
            out.extend(_BYTE_LEVEL[c] for c in tok)
        else:  # an added token (text as is), or a SentencePiece piece ("▁" is a space)
            out.extend(tok.replace("\u2581", " ").encode("utf-8"))
    return bytes(out)


def decode_text(tokenizer, ids: list[int]) -> str:
    """The text of generated token ids (`ids`: list of int, special tokens skipped), never with a
    U+FFFD that stands for bytes cut at a token boundary: a byte-level tokenizer can sample the
    first bytes of a multi-byte UTF-8 character and then something else (or stop), which
    `tokenizer.decode` shows as U+FFFD. Such incomplete sequences are dropped; a U+FFFD the
    model wrote in full (the bytes EF BF BD) is kept. Tokenizers with no byte view (neither
    byte-level nor byte-fallback) decode as `tokenizer.decode` does."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in text:
        return text
    kind = _byte_kind(tokenizer)
    if kind is None:
        return text
    return _token_bytes(tokenizer, ids, kind).decode("utf-8", "ignore")


def _decode(tokenizer, ids: list[int], end_ids: set[int], stop_ids: set[int],
            fmt=None) -> tuple[str, bool, int]:
    """(response, stopped at an end of answer (`### End`, the template's end of turn), tokens
    generated) from the new tokens of one row."""
    n = 0
    stopped = False
    kept: list[int] = []
    for t in ids:
        n += 1
        if t in end_ids:
            stopped = True
            break
        if t in stop_ids:
            break
        kept.append(t)
    text = decode_text(tokenizer, kept)
    return (fmt.answer(text) if fmt is not None else prompts.parse_response(text)), stopped, n


class AnswerText:
    """The answer text of a row's generated ids so far, exactly as `generate` would return it had
    the row ended there (same end and stop tokens, same decoding and parsing): what a stream
    shows while the row runs. `tokenizer`, `fmt`: the model's (dolly.prompts.get_format)."""

    def __init__(self, tokenizer, fmt=None):
        self.tokenizer = tokenizer
        self.fmt = fmt if fmt is not None else prompts.DollyFormat(tokenizer)
        # stop: the format's end of answer and the tokenizer's eos (a base model's own end of
        # text also ends an answer); end ("the answer is complete"): Dolly's `### End`, or for
        # a chat model every stop id (its eos ends its turn as well)
        self.stop_ids = set(self.fmt.stop_ids(tokenizer))
        self.end_ids = (set(self.fmt.end_ids(tokenizer)) if self.fmt.name == "dolly"
                        else set(self.stop_ids))

    def __call__(self, ids: list[int]) -> tuple[str, bool]:
        """(answer so far, whether the row has ended: an end or stop token is among `ids`)."""
        text, _, n = _decode(self.tokenizer, ids, self.end_ids, self.stop_ids, self.fmt)
        return text, bool(self.stop_ids & set(ids[:n]))

    def markers(self) -> list[str]:
        """Texts that end an answer when the model writes them as plain text (`### End`, the
        template's end of turn): a stream holds back a tail that may be the start of one, since
        parsing would cut it off."""
        if self.fmt.name == "dolly":
            return [prompts.END_KEY]
        eot = self.fmt.end_of_turn().strip()
        return [eot] if eot else []


def chat_prompt_ids(tokenizer, fmt, messages: list[dict], budget: int) -> tuple[list[int], bool]:
    """Token ids of the chat template's prompt for `messages` (ending with a user turn), at most
    `budget` tokens: (ids, whether it had to be shortened). A prompt that fits is the rendered
    text tokenized whole: the very ids training saw for the same turns. One over budget drops
    the oldest turns after a system turn, two at a time (a user turn and its answer), while
    more than one user turn is left; then keeps the end of the last user turn's text. If even
    the template does not fit, its last `budget` tokens. Raises ValueError if `budget` < 1, and
    dolly.prompts.TemplateError when `messages` does not end with a user turn."""
    if budget < 1:
        raise ValueError(f"a prompt budget of {budget} tokens leaves no room for a prompt")
    if not messages or messages[-1].get("role") != "user":
        raise prompts.TemplateError("a conversation to answer must end with a user turn")

    def encode(turns) -> list[int]:
        return tokenizer(fmt.prompt(messages=turns), add_special_tokens=False)["input_ids"]

    turns = list(messages)
    ids = encode(turns)
    if len(ids) <= budget:
        return ids, False
    head = 1 if turns and turns[0]["role"] == "system" else 0
    while len(ids) > budget and sum(m["role"] == "user" for m in turns) > 1:
        turns = turns[:head] + turns[head + 2:]
        ids = encode(turns)
    if len(ids) > budget:
        last = turns[-1]["content"]
        frame = len(encode(turns[:-1] + [{"role": "user", "content": ""}]))
        words = tokenizer(last[-budget * _CHARS_PER_TOKEN_BOUND:],
                          add_special_tokens=False)["input_ids"]
        room = budget - frame
        if room < 1:
            return ids[-budget:], True
        text = decode_text(tokenizer, words[-room:])
        ids = encode(turns[:-1] + [{"role": "user", "content": text}])
        if len(ids) > budget:  # the cut text re-tokenized longer: fall back to the last tokens
            ids = ids[-budget:]
    return ids, True


def generate(
    model,
    tokenizer,
    instructions: Sequence[str],
    inputs: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = prompts.GENERATION_DEFAULTS["max_new_tokens"],
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    deadlines: Sequence[float | None] | None = None,
    fmt=None,
    conversations: Sequence[list[dict] | None] | None = None,
    prompt_ids: Sequence[list[int] | None] | None = None,
    watches: Sequence[Watch | None] | None = None,
) -> GenerationRun:
    """Answers to `instructions` (with `inputs` where given), in order, generated in batches.

    Greedy by default (what evaluation wants); `do_sample=True` with Dolly's top_p/top_k for
    Dolly-like sampling. Batches group prompts of similar length (sorted by prompt tokens), so
    little padding is wasted; answers come back in the input order.
    `deadlines`: per prompt, a `time.monotonic()` time after which nobody waits for the answer
    (None = no deadline): a prompt past it when its batch starts is not generated, and a running
    one stops at the next token (its Generation has `expired=True`, and the text so far).
    `fmt`: the prompt format (dolly.prompts.get_format; default Dolly's); `conversations`: per
    prompt, a conversation ending with a user turn (list of {role, content}) that replaces that
    instruction and input (None = use them). `prompt_ids`: per prompt, token ids to generate from
    as they are (None = build the prompt); the caller has fitted them to the context.
    `watches`: per prompt, a Watch (None = none): cancel, stream, end at a stop string.
    Raises ValueError on `max_new_tokens` < 1 or lists of different lengths, and
    dolly.prompts.TemplateError for a conversation the format cannot hold.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    inputs = list(inputs) if inputs is not None else [None] * len(instructions)
    if len(inputs) != len(instructions):
        raise ValueError("instructions and inputs differ in length")
    deadlines = list(deadlines) if deadlines is not None else [None] * len(instructions)
    if len(deadlines) != len(instructions):
        raise ValueError("instructions and deadlines differ in length")
    conversations = (list(conversations) if conversations is not None
                     else [None] * len(instructions))
    if len(conversations) != len(instructions):
        raise ValueError("instructions and conversations differ in length")
    prompt_ids = list(prompt_ids) if prompt_ids is not None else [None] * len(instructions)
    watches = list(watches) if watches is not None else [None] * len(instructions)
    if len(prompt_ids) != len(instructions) or len(watches) != len(instructions):
        raise ValueError("instructions and prompt_ids or watches differ in length")
    fmt = fmt if fmt is not None else prompts.DollyFormat(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answer = AnswerText(tokenizer, fmt)
    end_ids, stop_ids = answer.end_ids, answer.stop_ids
    context = context_length(model, tokenizer)
    budget = context - answer_room(max_new_tokens, context)
    encoded = []
    for ins, inp, conv, given in zip(instructions, inputs, conversations, prompt_ids):
        if given is not None:
            encoded.append((list(given), False))
        elif fmt.name == "dolly":
            if conv is not None:
                ins, inp = fmt.prompt_pair(conv)
            encoded.append(shorten_prompt_ids(tokenizer, ins, inp, budget))
        else:
            encoded.append(chat_prompt_ids(
                tokenizer, fmt, conv if conv is not None else prompts.instruction_messages(ins, inp),
                budget))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(encoded)

    was_training = model.training
    model.eval()
    rng_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            late = expired([deadlines[i] for i in idx])
            for i in (i for i, gone in zip(idx, late) if gone):  # nobody waits: not started
                results[i] = Generation("", False, 0, len(encoded[i][0]), encoded[i][1], True)
            idx = [i for i, gone in zip(idx, late) if not gone]
            if not idx:
                continue
            rows = [encoded[i][0] for i in idx]
            width = max(len(r) for r in rows)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                input_ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attention[j, width - len(r):] = 1
            room = min(max_new_tokens, context - width)
            gen_cfg = GenerationConfig(
                max_new_tokens=room, do_sample=do_sample, eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id, use_cache=True,
                **({"temperature": temperature, "top_p": top_p, "top_k": top_k}
                   if do_sample else {}))
            stop = DeadlineStop([deadlines[i] for i in idx], [watches[i] for i in idx], width,
                                stop_ids)
            extra = ({"stopping_criteria": StoppingCriteriaList([stop])}
                     if any(d is not None for d in stop.deadlines)
                     or any(w is not None for w in stop.watches) else {})
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids.to(device),
                                     attention_mask=attention.to(device),
                                     generation_config=gen_cfg, **extra)
            new = out[:, width:].tolist()
            for j, i in enumerate(idx):
                ids, cut, told = new[j], False, False
                if stop.seen_at[j] is not None:  # cut short unless it had ended before
                    kept = ids[:stop.seen_at[j] - width]
                    if stop.reason[j] == "watch":  # its watch ended it: a stop string
                        ids, told = kept, True
                    else:
                        cut = not stop_ids & set(kept) and len(kept) < room
                        ids = kept if cut else ids
                text, stopped, n = _decode(tokenizer, ids, end_ids, stop_ids, fmt)
                ended = told or bool(stop_ids & set(ids[:n]))
                results[i] = Generation(text, stopped, n, len(rows[j]), encoded[i][1], cut,
                                        ended and not cut)
    finally:
        if seed is not None:
            torch.random.set_rng_state(rng_state)
        model.train(was_training)
    return GenerationRun([r for r in results if r is not None], time.perf_counter() - t0)
