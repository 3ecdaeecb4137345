"""OpenAI's chat completions and completions APIs on the registered model: requests checked,
answered with the model's one prompt format through the same generation and batching as every
other request, and answered as OpenAI's objects, streamed as server-sent events where asked.

Served beside MLflow's `/invocations` by `mlflow models serve` itself (dolly.serve.mlflow_patches
adds the routes when this model is loaded in the scoring server), and in process: `predict` of a
chat request (a dict with `messages`) returns `[chat completion]`.

- `POST /v1/chat/completions`: `messages` (system, developer, user and assistant turns; content a
  string or a list of text parts; the last turn the user's), `model`, and `temperature` [0, 2]
  (0 = greedy), `top_p` (0, 1], `max_tokens` (or `max_completion_tokens`) >= 1 with the prompt in
  the context, `stop` (a string or at most MAX_STOP), `n` (1..MAX_CHOICES), `seed`, `stream`,
  `stream_options.include_usage`. Settings left out take the model's generation defaults
  (dolly.prompts.GENERATION_DEFAULTS: temperature 1, top_p 0.92, at most 256 new tokens).
- `POST /v1/completions`: `prompt` (a string or a list of strings), each answered as an
  instruction in the model's format (a text completion of the instruction, not of raw text).
- `GET /v1/models`, `GET /v1/models/{model}`: the one served model.

A model trained in Dolly's format (prompt_format=dolly) holds one instruction: a chat request to
it must be one user message; a system message or earlier turns are refused (400), never dropped.
Fields that would change the answer and that this server cannot honour (tools, logprobs, logit
bias, penalties, response formats other than text, echo, suffix, best_of) are refused when set to
anything but their default; unknown fields are refused, as OpenAI refuses them.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, one line, no
traceback or path: 400 invalid_request_error, 404 model_not_found, 413 request_too_large,
504 timeout (the server's request timeout, `mlflow models serve -t`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from dolly import prompts
from dolly.serve.contract import _is_float, _is_long, _short, json_kind, printable, text_fault

_logger = logging.getLogger(__name__)

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
# The served model's name (OpenAI's `model`; vLLM's --served-model-name): this variable where set
# at serving time, else "dolly" (the default model_name).
NAME_ENV = "DOLLY_SERVED_MODEL_NAME"
MAX_CHOICES = 8  # n: choices per request (each is a row of the batch)
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_PROMPTS = 64  # prompts of one completions request
# A temperature below this is greedy, as 0 is (dolly.serve.pyfunc.GREEDY_BELOW; vLLM's rule).
GREEDY_BELOW = 1e-5
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
# Fields every request may carry that do not change the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "model"}
# Fields that would change the answer: allowed only at their default (the values that are).
_DEFAULT_ONLY = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
    "reasoning_effort": (None,), "prediction": (None,), "audio": (None,),
    "web_search_options": (None,),
}
_COMPLETION_DEFAULT_ONLY = {
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "logprobs": (None, 0),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}


def _same(value, default) -> bool:
    """`value` is `default` in JSON's terms: equal and of the same JSON type (0 and 0.0 are one
    number; false is not 0; an array, a NumPy value or another Python type is no default)."""
    number = (int, float)
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    if type(value) in number and type(default) in number:
        return value == default
    if type(value) is not type(default):
        return False
    if isinstance(value, dict):
        return set(value) == set(default) and all(_same(value[k], default[k]) for k in value)
    if isinstance(value, list):
        return len(value) == len(default) and all(map(_same, value, default))
    return value == default


_SETTINGS = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed",
             "stream", "stream_options"}
CHAT_FIELDS = {"messages", *_SETTINGS, *_IGNORED, *_DEFAULT_ONLY}
COMPLETION_FIELDS = {"prompt", *_SETTINGS, *_IGNORED, *_COMPLETION_DEFAULT_ONLY}


class OpenAIError(Exception):
    """A request refused in OpenAI's error shape: HTTP `status`, one-line `message`, OpenAI's
    `type` (invalid_request_error for a 4xx, else server_error), the `param` at fault, a `code`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        line = " ".join(printable(str(message)).split())
        self.message = line if len(line) <= 300 else line[:297] + "..."
        super().__init__(self.message)
        self.status, self.param, self.code = status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value"):
    return OpenAIError(400, message, param, code)


@dataclass
class Request:
    """A checked request. `conversations`: one list of {role, content} per prompt (a chat
    request has one; a completions request one per prompt, each a single user turn)."""

    kind: str  # "chat" or "completion"
    model: str | None
    conversations: list[list[dict]]
    max_tokens: int | None = None
    temperature: float = float(prompts.GENERATION_DEFAULTS["temperature"])
    top_p: float = float(prompts.GENERATION_DEFAULTS["top_p"])
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def served_name() -> str:
    """The name the model answers to (`model` of a request): $DOLLY_SERVED_MODEL_NAME, else
    "dolly"."""
    return os.environ.get(NAME_ENV, "").strip() or "dolly"


def is_request(data) -> str | None:
    """"chat" for a chat request (a dict with `messages`), "completion" for a completions
    request (a dict with `prompt` and at least one other OpenAI field, so that Dolly's own
    `{"prompt": [...]}`, one column of instructions, keeps its meaning), else None."""
    if not isinstance(data, dict) or any(not isinstance(k, str) for k in data):
        return None
    if "messages" in data and "instruction" not in {k.lower() for k in data}:
        return "chat"
    if "prompt" in data and len(data) > 1 and set(data) <= COMPLETION_FIELDS:
        return "completion"
    return None


# --- checking a request -------------------------------------------------------------------------

def _text(value: str, where: str) -> str:
    """`value` if it is valid Unicode text (no lone surrogate), else a 400 naming `where`."""
    if fault := text_fault(value):
        raise _bad(f"{where} is not valid Unicode text ({fault})", where, "invalid_value")
    return value


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})
    joined as they are; anything else is refused."""
    if isinstance(value, str):
        return _text(value, where + ".content")
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            and set(p) <= {"type", "text"} for p in value):
        return _text("".join(p["text"] for p in value), where + ".content")
    kind = json_kind(value)
    if isinstance(value, list):
        kind = "a list that is not only text parts ({\"type\": \"text\", \"text\": ...})"
    raise _bad(f"{where}.content must be a string (or a list of text parts), got {kind}",
               where + ".content", "invalid_type")


def _messages(value, fmt_name: str) -> list[dict]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _bad(f"messages must be a list of messages, got {json_kind(value)}", "messages",
                   "invalid_type")
    if not value:
        raise _bad("messages must hold at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content, got {json_kind(m)}",
                       where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            shown = _short(role) if role is not None else "none"
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {shown}",
                       where + ".role")
        if extra := sorted(str(k) for k in m if k not in ("role", "content", "name")):
            raise _bad(f"{where} has fields this server does not support: "
                       f"{', '.join(_short(k) for k in extra[:4])}", where, "unsupported_value")
        if "name" in m and not isinstance(m["name"], str):
            raise _bad(f"{where}.name must be a string, got {json_kind(m['name'])}",
                       where + ".name", "invalid_type")
        if "content" not in m:
            raise _bad(f"{where} has no content", where + ".content", "missing_required_parameter")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m["content"], where)})
    if out[-1]["role"] != "user":
        raise _bad(f"the last message must be the user's (messages[{len(out) - 1}] is "
                   f"{value[-1]['role']}): this server answers the user's last turn", "messages")
    if fmt_name == "dolly" and len(out) > 1:
        kinds = "a system message" if any(m["role"] == "system" for m in out) else "earlier turns"
        raise _bad(f"this model was trained in Dolly's format, which holds one instruction: send "
                   f"one user message ({kinds} cannot be given to it; a model trained with "
                   "prompt_format=chat_template takes conversations)", "messages",
                   "unsupported_value")
    return out


def _number(payload: dict, name: str, low: float, high: float, low_open: bool = False):
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not _is_float(value) or value > high or value < low \
            or (low_open and value == low):
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise _bad(f"{name} must be a number {bound}, got {_short(value)}", name)
    return float(value)


def _integer(payload: dict, name: str, low: int, high: int | None = None):
    value = payload.get(name)
    if value is None:
        return None
    if not _is_long(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise _bad(f"{name} must be an integer {bound}, got {_short(value)}", name)
    return int(value)


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad(f"stop must be a non-empty string or a list of them, got {_short(value)}",
                   "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad(f"stop holds at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return list(dict.fromkeys(_text(s, "stop") for s in stops))


def _prompts(value) -> list[str]:
    prompts_ = [value] if isinstance(value, str) else value
    if not isinstance(prompts_, list) or not prompts_ \
            or not all(isinstance(p, str) for p in prompts_):
        raise _bad("prompt must be a string or a non-empty list of strings (token ids are not "
                   f"taken), got {_short(value)}", "prompt", "invalid_type")
    if len(prompts_) > MAX_PROMPTS:
        raise _bad(f"prompt holds at most {MAX_PROMPTS} prompts per request, got "
                   f"{len(prompts_)}", "prompt")
    return [_text(p, "prompt") for p in prompts_]


def parse_request(payload, kind: str, served: str, fmt_name: str,
                  require_model: bool = True) -> Request:
    """The checked Request of a chat (`kind` "chat") or completions ("completion") request body
    (a parsed JSON object). `served`: the model's name; `fmt_name`: its prompt format ("dolly"
    or "chat_template"); `require_model`: whether `model` must be given (over HTTP, as OpenAI
    requires; in process it may be left out). Raises OpenAIError: 400 for a malformed request,
    404 for another model's name."""
    if not isinstance(payload, dict):
        raise _bad(f"the body must be a JSON object, got {json_kind(payload)}", None,
                   "invalid_type")
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    default_only = _DEFAULT_ONLY if kind == "chat" else _COMPLETION_DEFAULT_ONLY
    if unknown := sorted(str(k) for k in payload if k not in fields):
        raise _bad(f"unrecognized request argument: {', '.join(_short(k) for k in unknown[:4])}",
                   unknown[0][:40], "unknown_parameter")
    for name, defaults in default_only.items():
        if name in payload and not any(_same(payload[name], d) for d in defaults):
            raise _bad(f"{name} is not supported by this server (leave it out or at its "
                       f"default), got {_short(payload[name])}", name, "unsupported_parameter")
    model = payload.get("model")
    if model is None and require_model:
        raise _bad("model is required: the served model is " + _short(served), "model",
                   "missing_required_parameter")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {json_kind(model)}", "model", "invalid_type")
    if model is not None:
        _text(model, "model")
    if model is not None and model != served:
        raise OpenAIError(404, f"the model {_short(model)} does not exist: this server serves "
                          f"{_short(served)}", "model", "model_not_found")
    if kind == "chat":
        if "messages" not in payload:
            raise _bad("messages is required", "messages", "missing_required_parameter")
        conversations = [_messages(payload["messages"], fmt_name)]
    else:
        if "prompt" not in payload:
            raise _bad("prompt is required", "prompt", "missing_required_parameter")
        conversations = [[{"role": "user", "content": p}] for p in _prompts(payload["prompt"])]
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {_short(stream)}", "stream", "invalid_type")
    options = payload.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _bad('stream_options must be {"include_usage": true or false}', "stream_options")
    if options and not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    max_tokens = _integer(payload, "max_tokens", 1)
    max_completion = _integer(payload, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _bad("max_tokens and max_completion_tokens differ: send one of them",
                   "max_completion_tokens")
    req = Request(kind, model, conversations, max_tokens if max_tokens is not None
                  else max_completion, stream=bool(stream),
                  include_usage=bool((options or {}).get("include_usage")),
                  stop=_stop(payload.get("stop")), seed=_integer(payload, "seed", -2 ** 63, 2 ** 63 - 1))
    if (t := _number(payload, "temperature", 0.0, 2.0)) is not None:
        req.temperature = t
    if (p := _number(payload, "top_p", 0.0, 1.0, low_open=True)) is not None:
        req.top_p = p
    if (n := _integer(payload, "n", 1, MAX_CHOICES)) is not None:
        req.n = n
    return req


# --- answering ------------------------------------------------------------------------------

@dataclass
class Choice:
    """One answer being made: its text so far (what a stream has sent), its end."""

    index: int
    prompt: int  # which prompt (conversation) it answers
    sent: str = ""
    text: str | None = None
    finish_reason: str | None = None
    tokens: int = 0


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (not included), and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _held_back(text: str, holds: list[str]) -> int:
    """How many characters at the end of `text` may be the start of one of `holds` (an end
    marker or a stop string that parsing would cut off): a stream waits for what follows."""
    keep = 0
    for h in holds:
        for k in range(min(len(h) - 1, len(text)), keep, -1):
            if text.endswith(h[:k]):
                keep = k
                break
    return keep


def _no_control_text(pyfunc, conv: list[dict], kind: str, i: int) -> None:
    """Refuses content holding the text of one of the tokenizer's special tokens (`<|im_end|>`,
    `### Response:`): tokenized with the rendered template, it would become that control token,
    so a user could close their own turn and write the assistant's (data_prep rejects such
    records from training for the same reason)."""
    for j, m in enumerate(conv):
        for text in pyfunc.control_texts:
            if text in m["content"]:
                where = f"messages[{j}].content" if kind == "chat" else (
                    "prompt" if i == 0 else f"prompt[{i}]")
                raise _bad(f"{where} holds {text.strip()!r}, the text of one of the model's "
                           "control tokens (it marks turns in the prompt format): remove it",
                           where, "invalid_value")


class Run:
    """One request being answered by the model (`pyfunc`: a DollyPyfunc): its prompts' token ids,
    one row per choice, the Watch of each row (cancel, stop strings, streaming).

    `on_delta(choice_index, text)`: called from the generating thread with each new piece of a
    choice's text (streaming; None = not streaming). Raises OpenAIError (400) from the
    constructor when a prompt and max_tokens do not fit the model's context."""

    def __init__(self, pyfunc, req: Request,
                 on_delta: Callable[[int, str], None] | None = None):
        from dolly import generation

        self.pyfunc, self.req, self.on_delta = pyfunc, req, on_delta
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.cancel = threading.Event()
        context = pyfunc.context
        self.prompt_ids = []
        for i, conv in enumerate(req.conversations):
            where = "messages" if req.kind == "chat" else "prompt"
            them = "the messages take" if req.kind == "chat" else (
                "the prompt takes" if len(req.conversations) == 1 else f"prompt {i} takes")
            _no_control_text(pyfunc, conv, req.kind, i)
            # Cheap before tokenizing: a token is never near 64 characters long
            # (dolly.generation's bound), so a text that long cannot fit the context.
            chars = sum(len(m["content"]) for m in conv)
            if chars > context * 64:
                raise _bad(f"{them} {chars} characters, far more than this model's context of "
                           f"{context} tokens holds: shorten them", where,
                           "context_length_exceeded")
            ids = pyfunc.full_prompt_ids(conv)
            if len(ids) >= context:
                raise _bad(f"{them} {len(ids)} tokens, more than this model's context of "
                           f"{context} tokens leaves room for an answer: shorten them", where,
                           "context_length_exceeded")
            if req.max_tokens is not None and len(ids) + req.max_tokens > context:
                raise _bad(f"max_tokens is too large: this model's context is {context} tokens "
                           f"and {them} {len(ids)}, so at most {context - len(ids)} new tokens "
                           f"fit, got {req.max_tokens}", "max_tokens", "context_length_exceeded")
            self.prompt_ids.append(ids)
        self.answer_text = generation.AnswerText(pyfunc.tokenizer, pyfunc.fmt)
        self.holds = [*self.answer_text.markers(), *req.stop]
        self.choices = [Choice(p * req.n + k, p) for p in range(len(self.prompt_ids))
                        for k in range(req.n)]
        self.watches = [generation.Watch(self.cancel, self._watcher(c)
                                         if (on_delta is not None or req.stop) else None)
                        for c in self.choices]

    def _watcher(self, choice: Choice) -> Callable[[list[int]], bool]:
        def on_tokens(ids: list[int]) -> bool:
            text, ended = self.answer_text(ids)
            text, found = _cut_at_stop(text, self.req.stop)
            if not found and not ended:
                text = text[:len(text) - _held_back(text, self.holds)]
            self._send(choice, text)
            return found
        return on_tokens

    def _send(self, choice: Choice, text: str) -> None:
        if self.on_delta is None or not text.startswith(choice.sent) or text == choice.sent:
            return
        delta, choice.sent = text[len(choice.sent):], text
        self.on_delta(choice.index, delta)

    def settings(self) -> dict:
        """The generation settings of every row (what the batcher groups by)."""
        greedy = self.req.temperature < GREEDY_BELOW
        context = self.pyfunc.context
        longest = max(len(ids) for ids in self.prompt_ids)
        max_new = self.req.max_tokens if self.req.max_tokens is not None else min(
            prompts.GENERATION_DEFAULTS["max_new_tokens"], context - longest)
        return {"max_new_tokens": max_new, "do_sample": not greedy,
                "temperature": self.req.temperature, "top_p": self.req.top_p,
                "top_k": prompts.GENERATION_DEFAULTS["top_k"], "seed": self.req.seed}

    def run(self, deadline: float | None) -> None:
        """Generate every choice (through the model's batcher when it has one), then finish
        each choice's text. Raises OpenAIError 504 when `deadline` (`time.monotonic()` seconds)
        passes first."""
        from mlflow.exceptions import MlflowException

        from dolly.generation import Generation

        # a blank last user turn is answered "" without running the model, as a blank
        # instruction is on every path (dolly.prompts.is_blank)
        todo = [k for k, c in enumerate(self.choices)
                if not prompts.is_blank(self.req.conversations[c.prompt][-1]["content"])]
        rows = [(self.prompt_ids[self.choices[k].prompt],
                 self.req.conversations[self.choices[k].prompt], self.watches[k]) for k in todo]
        try:
            made = self.pyfunc.generate_rows(rows, self.settings(), deadline) if rows else []
            generations = [Generation("", True, 0, 0, False, ended=True)] * len(self.choices)
            for k, g in zip(todo, made):
                generations[k] = g
        except MlflowException as e:  # the deadline passed while the rows waited for a batch
            if e.get_http_status_code() == 504:
                raise OpenAIError(504, "the request's deadline passed before its answer was "
                                  "ready", None, "timeout") from None
            raise _bad(e.message) from None
        if self.cancel.is_set():
            _logger.warning("stopped %s after %d of at most %d new tokens: the client went away",
                            self.id, max(g.new_tokens for g in generations),
                            self.settings()["max_new_tokens"])
            return
        if any(g is None or g.expired for g in generations):
            raise OpenAIError(504, "the request's deadline passed before its answer was ready",
                              None, "timeout")
        for choice, g in zip(self.choices, generations):
            text, found = _cut_at_stop(g.response, self.req.stop)
            choice.text, choice.tokens = text, g.new_tokens
            choice.finish_reason = "stop" if (found or g.ended) else "length"
            if self.on_delta is not None:
                if text.startswith(choice.sent):
                    self._send(choice, text)
                else:  # cannot happen with prefix-stable decoding; never resend what was sent
                    _logger.warning("streamed text of %s is not a prefix of its answer", self.id)

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def result(self) -> dict:
        """The chat completion or text completion object."""
        if self.req.kind == "chat":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": None, "finish_reason": c.finish_reason}
                       for c in self.choices]
            obj = "chat.completion"
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.pyfunc.served_name, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, index: int | None = None, delta: str | None = None, first: bool = False,
              finish: bool = False, usage: bool = False) -> dict:
        """One streamed chunk: a choice's first (the role), a piece of text, its finish reason,
        or the final usage chunk (no choices)."""
        if self.req.kind == "chat":
            obj = "chat.completion.chunk"
            if usage:
                choices = []
            else:
                body = ({"role": "assistant", "content": ""} if first else
                        {} if finish else {"content": delta})
                choice = self.choices[index]
                choices = [{"index": index, "delta": body, "logprobs": None,
                            "finish_reason": choice.finish_reason if finish else None}]
        else:
            obj = "text_completion"
            choices = [] if usage else [{
                "index": index, "text": "" if finish else delta, "logprobs": None,
                "finish_reason": self.choices[index].finish_reason if finish else None}]
        out = {"id": self.id, "object": obj, "created": self.created,
               "model": self.pyfunc.served_name, "choices": choices,
               "system_fingerprint": None}
        if self.req.include_usage:
            out["usage"] = self.usage() if usage else None
        return out


def answer(pyfunc, payload: dict, kind: str, deadline: float | None = None,
           require_model: bool = False) -> dict:
    """The completion object for a chat or completions request (in process, or a non-streamed
    request of the server). Raises OpenAIError."""
    req = parse_request(payload, kind, pyfunc.served_name, pyfunc.fmt.name, require_model)
    if req.stream:
        raise _bad("stream: true needs the server (mlflow models serve); in process, leave it "
                   "out", "stream", "unsupported_value")
    run = Run(pyfunc, req)
    run.run(deadline)
    return run.result()


def models_list(pyfunc) -> dict:
    return {"object": "list", "data": [model_card(pyfunc)]}


def model_card(pyfunc) -> dict:
    return {"id": pyfunc.served_name, "object": "model", "created": pyfunc.created,
            "owned_by": "dolly"}


# --- the HTTP routes ------------------------------------------------------------------------

def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON (`data: ...` and a blank line)."""
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


def add_routes(app, pyfunc, timeout_s: Callable[[], float]) -> None:
    """Add the OpenAI routes to the scoring server's FastAPI `app`, answered by `pyfunc`;
    `timeout_s()`: the server's request timeout (a request's deadline is a little before it, so
    that the model answers 504 in OpenAI's shape before the server's own timeout does)."""
    import asyncio
    import contextvars
    import functools
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    pool = ThreadPoolExecutor(256, thread_name_prefix="dolly-openai")

    def error(e: OpenAIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    async def call(fn, *args):
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(context.run, fn, *args))

    async def body_of(request: HTTPRequest):
        from mlflow.exceptions import MlflowException
        from starlette.requests import ClientDisconnect

        from dolly.serve import json_body

        limit = pyfunc.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise OpenAIError(413, f"the body is {int(declared)} bytes, the server takes at most "
                              f"{limit}", None, "request_too_large")
        raw = bytearray()
        try:
            async for part in request.stream():
                raw += part
                if len(raw) > limit:
                    raise OpenAIError(413, f"the body is over {limit} bytes, the server takes "
                                      "at most that", None, "request_too_large")
        except ClientDisconnect:
            raise OpenAIError(400, "the client closed the connection before the body was "
                              "complete", None, "client_disconnected") from None
        try:
            return json_body.loads(bytes(raw))
        except MlflowException as e:
            raise _bad(e.message, None, "invalid_json") from None

    def deadline_of(start: float) -> float:
        """A little before the server's own timeout (MLflow's middleware answers 504 in its own
        shape then), counted from when the request reached the route."""
        timeout = timeout_s()
        return start + timeout - min(0.5, timeout * 0.1)

    async def before(deadline: float, fn, *args):
        """`fn(*args)` in the pool, or a 504 once `deadline` passes: the model stops the
        request's rows itself at that deadline, but the answer does not wait for it."""
        try:
            return await asyncio.wait_for(call(fn, *args),
                                          timeout=max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise OpenAIError(504, "the request's deadline passed before its answer was ready",
                              None, "timeout") from None

    async def completions(request: HTTPRequest, kind: str):
        start = time.monotonic()
        try:
            payload = await body_of(request)
            req = parse_request(payload, kind, pyfunc.served_name, pyfunc.fmt.name)
            deadline = deadline_of(start)
            if not req.stream:
                def whole():
                    run = Run(pyfunc, req)
                    run.run(deadline)
                    return run.result()
                return JSONResponse(await before(deadline, whole))
            return await stream(req, deadline)
        except OpenAIError as e:
            if e.status >= 500 or e.code == "client_disconnected":
                _logger.warning("request failed (%s): %s", e.status, e.message)
            return error(e)
        except Exception:
            _logger.exception("internal error while answering an OpenAI request")
            return error(OpenAIError(500, "internal error while answering the request; see the "
                                     "server log", None, "internal_error"))

    async def stream(req: Request, deadline: float):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_delta(index: int, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", index, text))

        run = await before(deadline, Run, pyfunc, req, on_delta)  # a 400 here is a plain response

        def work() -> None:
            try:
                run.run(deadline)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None, None))
            except OpenAIError as e:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", None, e))
            except Exception:
                _logger.exception("internal error while streaming an OpenAI request")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", None, OpenAIError(
                    500, "internal error while answering the request; see the server log",
                    None, "internal_error")))

        async def events():
            finished = False
            try:
                for c in run.choices:
                    if req.kind == "chat":
                        yield sse(run.chunk(c.index, first=True))
                task = asyncio.ensure_future(call(work))
                while True:
                    what, index, item = await queue.get()
                    if what == "delta":
                        yield sse(run.chunk(index, item))
                    elif what == "error":
                        yield sse(item.body())
                        break
                    else:
                        for c in run.choices:
                            yield sse(run.chunk(c.index, finish=True))
                        if req.include_usage:
                            yield sse(run.chunk(usage=True))
                        break
                finished = True
                yield b"data: [DONE]\n\n"
                await task
            finally:
                if not finished:  # the client went away: stop generating its rows
                    run.cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat_completions(request):
        return await completions(request, "chat")

    async def text_completions(request):
        return await completions(request, "completion")

    # FastAPI injects the request by the parameter's annotation, which `from __future__ import
    # annotations` would leave as the text "HTTPRequest", a name of this function only
    for route, handler in ((CHAT_ROUTE, chat_completions), (COMPLETIONS_ROUTE, text_completions)):
        handler.__annotations__["request"] = HTTPRequest
        app.post(route)(handler)

    @app.get(MODELS_ROUTE)
    async def list_models():
        return JSONResponse(models_list(pyfunc))

    @app.get(MODELS_ROUTE + "/{name:path}")
    async def get_model(name: str):
        if name != pyfunc.served_name:
            return error(OpenAIError(404, f"the model {_short(name)} does not exist: this server "
                                     f"serves {_short(pyfunc.served_name)}", "model",
                                     "model_not_found"))
        return JSONResponse(model_card(pyfunc))

    routes = {CHAT_ROUTE: "POST", COMPLETIONS_ROUTE: "POST", MODELS_ROUTE: "GET"}

    async def unknown_route(request, rest: str):
        path = "/v1/" + rest
        if path in routes or path.startswith(MODELS_ROUTE + "/"):
            allowed = routes.get(path, "GET")
            return JSONResponse(OpenAIError(
                405, f"{request.method} is not allowed on {_short(path)[1:-1]}: use {allowed}",
                None, "method_not_allowed").body(), status_code=405, headers={"Allow": allowed})
        return error(OpenAIError(404, f"this server has no route {_short(path)[1:-1]}: it "
                                 f"serves {CHAT_ROUTE}, {COMPLETIONS_ROUTE} and {MODELS_ROUTE}",
                                 None, "unknown_url"))

    unknown_route.__annotations__["request"] = HTTPRequest
    app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                              "HEAD"])(unknown_route)
