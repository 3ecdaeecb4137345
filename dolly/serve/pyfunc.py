"""The registered model's pyfunc: named columns in, Dolly's answers out, the same on every path.

The model is saved with MLflow's transformers flavor unchanged (`mlflow.transformers.load_model`
gives the usual pipeline); only its `python_function` loader points here. The loader loads MLflow's
transformers pyfunc (for its pipeline: weights, tokenizer, device) and answers with
dolly.generation, the code evaluation measures with, in-process (`mlflow.pyfunc.load_model`), in
Spark (`spark_udf`) and served (`mlflow models serve`), under one request contract
(dolly.serve.contract) and a few request-level rules of its own:

- Blank instructions (nothing visible: whitespace, format characters such as U+200B or U+FEFF;
  dolly.prompts.is_blank) get "" without running the model, like missing ones; a blank input
  means "no input". A record with a non-blank input gets Dolly's with-input prompt
  (dolly.prompts, byte-identical to training's).
- A prompt too long for the context is shortened (dolly.generation.shorten_prompt_ids).
- `temperature` 0, or below GREEDY_BELOW (1e-5), is greedy, whatever `do_sample` says.
- Refused with one line (HTTP 400 when served): an empty batch, a `max_new_tokens` set by the
  caller that leaves no room in the context (the default is fitted to the context instead),
  and, when served, more than `serve_max_rows` records or `serve_max_chars` characters in one
  request.
- Concurrent calls share generations (dolly.serve.request_batching) and a call stops work when its
  deadline passes (dolly.serve.deadline).

MLflow would check and convert the input against the signature before the model sees it (and
turn a null into the text "None"); the loader puts the contract's checks in its place, and
contains the HTTP scoring server for this model (dolly.serve.mlflow_patches, every patch of MLflow
internals in one file).

The logged model ships only the code serving imports (SHIPPED_CODE: dolly/__init__.py,
dolly/prompts.py, dolly/generation.py and dolly/serve/), not the training or Spark code.
"""
from __future__ import annotations

import contextvars
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dolly import prompts
from dolly.serve import mlflow_patches
from dolly.serve.contract import (INPUT, INSTRUCTION, MESSAGES, METADATA_KEY, as_frame,
                                  bad_input, check_params)
from dolly.serve.deadline import current_deadline, deadline_passed

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# What `mlflow models serve`, `spark_udf` and `mlflow.pyfunc.load_model` import of this project,
# relative to the dolly/ package folder: the logged model's code/dolly/ holds exactly these.
SHIPPED_CODE = ("__init__.py", "prompts.py", "generation.py", "serve")
# Overrides the logged serve_batch_wait_ms where the model is loaded (0 = no batching across
# calls): `mlflow models serve` has no other way to pass a setting to the model.
BATCH_WAIT_ENV = "DOLLY_SERVE_BATCH_WAIT_MS"
# A temperature below this is greedy, as 0 is (vLLM's rule): sampling divides the logits by the
# temperature, and a tiny one (1e-320) makes them infinite, so torch.multinomial fails.
GREEDY_BELOW = 1e-5


def shipped_package(dest: str | Path) -> Path:
    """A copy of the serving code (SHIPPED_CODE, without caches) as the package folder
    `<dest>/dolly`, what `code_paths` gives the logged model; returns that folder."""
    out = Path(dest) / "dolly"
    out.mkdir(parents=True)
    for name in SHIPPED_CODE:
        src = _PACKAGE_DIR / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, out / name)
    return out


# --- saving: the transformers flavor, with this module as the pyfunc loader ---------------------

def save_model(path, mlflow_model=None, serving_limits: dict[str, int] | None = None,
               license_text: str | None = None, **kwargs):
    """`mlflow.transformers.save_model`, then point the pyfunc flavor at this module.

    Used as the `flavor` of `mlflow.models.Model.log`. The serving code goes with the model
    (code_paths: `shipped_package`), so the loader imports wherever the model is served, and
    nothing else of the project does. `license_text` replaces
    the LICENSE.txt MLflow writes for a model folder (a link to a Hub page named after the
    folder, which does not exist).
    """
    import mlflow
    from mlflow.models import Model

    if mlflow_model is None:
        mlflow_model = Model()
    with tempfile.TemporaryDirectory() as staging:
        code_paths = [*(kwargs.pop("code_paths", None) or []), str(shipped_package(staging))]
        mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model,
                                       code_paths=code_paths, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.metadata = {**(mlflow_model.metadata or {}),
                             METADATA_KEY: dict(serving_limits or {})}
    mlflow_model.save(os.path.join(path, "MLmodel"))
    if license_text is not None:
        Path(path, "LICENSE.txt").write_text(license_text, encoding="utf-8")


def _load_pyfunc(path, model_config: dict[str, Any] | None = None):
    """What `mlflow.pyfunc.load_model` calls: MLflow's transformers pyfunc, wrapped."""
    from mlflow.models import Model
    from mlflow.transformers import _load_pyfunc as load_transformers_pyfunc

    mlmodel = Model.load(os.path.join(path, "MLmodel"))
    meta = mlmodel.metadata or {}
    _require_adapter_base(mlmodel.flavors.get("transformers") or {}, meta)
    mlflow_patches.install_input_checks()
    limits = dict(meta.get(METADATA_KEY) or {})
    limits["created"] = _epoch(mlmodel.utc_time_created)
    load = functools.partial(load_transformers_pyfunc, path, model_config)
    # With batching across requests every generation runs in the batcher's one worker thread.
    # Loading the weights runs torch's parallel copies, and in the loading thread those start an
    # OpenMP thread pool that outlives the load; libgomp counts its threads, and once it counts
    # more than the machine has cores, every pool's idle threads sleep instead of spinning
    # (GOMP_SPINCOUNT's "throttled" count), so each small op of the worker then waits for a
    # wake-up. Measured on 2 cores: a batch of 8 rows x 16 tokens took 210 ms in the worker after
    # loading in the server's main thread, 155 ms after loading in a thread that has ended.
    batching = batch_wait_ms((limits or {}).get("serve_batch_wait_ms")) > 0
    inner = _in_ended_thread(load) if batching else load()
    pyfunc = DollyPyfunc(inner, limits)
    mlflow_patches.contain_scoring_server(pyfunc.batcher is not None, pyfunc)
    return pyfunc


def _require_adapter_base(flavor: dict[str, Any], meta: dict[str, Any]) -> None:
    """A logged LoRA adapter loads its base from the local folder it was logged with (MLflow's
    `local_base_model_path`): when that folder is gone, raise one line that names the base,
    instead of Hugging Face's "Repo id must be in the form ..." from deep in the loader."""
    base = flavor.get("local_base_model_path")
    if not base or os.path.isfile(os.path.join(base, "config.json")):
        return
    from mlflow.exceptions import MlflowException

    raise MlflowException(
        f"this model is a LoRA adapter on the base {meta.get('adapter_base') or base}, whose "
        f"folder {base} is gone: put the base's files back there (for the tiny base: train once "
        "with the same tiny_* and pretrain settings, DOLLY_BASE_CACHE), load with "
        "mlflow.transformers.load_model(uri, base_model_path=<a copy>), or log the model with "
        "merge=true")


def _epoch(utc: str | None) -> int:
    """Unix seconds of MLmodel's utc_time_created ("2026-12-04 14:32:10.123456"); 0 if unknown."""
    from datetime import datetime, timezone

    try:
        return int(datetime.fromisoformat(str(utc)).replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        return 0


def _in_ended_thread(fn: Callable[[], Any]) -> Any:
    """`fn()` run in a thread of its own that has ended when this returns (with the caller's
    context variables); its result, or its exception raised here."""
    from concurrent.futures import ThreadPoolExecutor

    # Leaving the block shuts the executor down and joins its one thread.
    with ThreadPoolExecutor(1, thread_name_prefix="dolly-load") as executor:
        return executor.submit(contextvars.copy_context().run, fn).result()


def batch_wait_ms(logged: int | None) -> int:
    """How long (ms) the model gathers concurrent calls into one batch: $DOLLY_SERVE_BATCH_WAIT_MS
    where set, else the logged serve_batch_wait_ms, else 10; 0 = each call generates alone.
    Raises MlflowException naming the variable if it is not an integer >= 0."""
    raw = os.environ.get(BATCH_WAIT_ENV, "").strip()
    if not raw:
        return 10 if logged is None else int(logged)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise bad_input(f"{BATCH_WAIT_ENV} must be an integer >= 0 (milliseconds), got {raw!r}")
    return value


# --- predicting ---------------------------------------------------------------------------------

class DollyPyfunc:
    """The pyfunc of Dolly's registered model: checks, then dolly.generation on the pipeline's
    model and tokenizer (loaded by MLflow's transformers flavor)."""

    def __init__(self, inner, limits: dict[str, int] | None = None):
        from dolly.generation import context_length

        self._inner = inner
        self._tokenizer = self.tokenizer = inner.pipeline.tokenizer
        self.context = context_length(inner.pipeline.model, self._tokenizer)
        limits = limits or {}
        # The one prompt format the model was trained in (logged with it; models from before
        # prompt formats: Dolly's), rendered from the logged tokenizer's own files.
        self.fmt = prompts.get_format(limits.get("prompt_format") or "dolly", self._tokenizer)
        self._frame = len(self._ids(self.fmt.prompt("")))  # the no-input template
        # The texts of the tokenizer's special tokens: content holding one is refused on the
        # OpenAI routes (it would tokenize to a control token of the prompt format).
        added = getattr(self._tokenizer, "added_tokens_decoder", {}) or {}
        self.control_texts = sorted(
            {t for t in [*self._tokenizer.all_special_tokens,
                         *(a.content for a in added.values() if getattr(a, "special", False))]
             if isinstance(t, str) and t.strip()}, key=len, reverse=True)
        self.max_rows = int(limits.get("serve_max_rows") or 0)
        self.max_chars = int(limits.get("serve_max_chars") or 0)
        # A body over this is a 413 on the OpenAI routes: every character of the allowed text in
        # UTF-8's widest form, plus room for the JSON around it.
        self.max_body_bytes = 4 * self.max_chars + 65536 if self.max_chars else 64 * 2 ** 20
        from dolly.serve.openai_api import served_name

        self.served_name = served_name()
        self.created = int(limits.get("created") or 0)
        self.batch_size = int((getattr(inner, "model_config", None) or {}).get("batch_size") or 8)
        wait_ms = batch_wait_ms(limits.get("serve_batch_wait_ms"))
        self.batcher = None
        if wait_ms > 0:
            from dolly.serve.request_batching import RequestBatcher

            self.batcher = RequestBatcher(self._generate, self.batch_size, wait_ms / 1000)

    @property
    def pipeline(self):
        """The transformers pipeline, as MLflow's own wrapper exposes it."""
        return self._inner.pipeline

    def get_raw_model(self):
        """The transformers pipeline (what `PyFuncModel.get_raw_model()` returns)."""
        return self._inner.pipeline

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str | None = None, input: str | None = None,
                   messages: list[dict] | None = None) -> list[int]:
        """The token ids this model generates from for a record, or for a conversation ending
        with a user turn (`messages`: list of {role, content}): the logged format's prompt,
        shortened to the context as generation shortens it."""
        from dolly import generation

        budget = self.context - generation.answer_room(
            prompts.GENERATION_DEFAULTS["max_new_tokens"], self.context)
        if self.fmt.name == "dolly":
            if messages is not None:
                instruction, input = self.fmt.prompt_pair(messages)
            return generation.shorten_prompt_ids(self._tokenizer, instruction, input, budget)[0]
        if messages is None:
            messages = prompts.instruction_messages(instruction, input)
        return generation.chat_prompt_ids(self._tokenizer, self.fmt, messages, budget)[0]

    def _check(self, frame, params: dict) -> dict:
        """Request-level checks; returns the generation settings to use."""
        n = len(frame)
        if not n:
            raise bad_input("no instructions: send at least one")
        serving = os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"
        if serving and self.max_rows and n > self.max_rows:
            raise bad_input(f"request too large: {n} records, the server takes at most "
                            f"{self.max_rows} per request; split it")
        chars = int(frame[INSTRUCTION].str.len().sum() + frame[INPUT].str.len().sum())
        if MESSAGES in frame:
            chars += sum(len(m["content"]) for conv in frame[MESSAGES] if conv for m in conv)
            for i, conv in enumerate(frame[MESSAGES]):
                if conv is not None:
                    try:
                        self.fmt.prompt(messages=conv)
                    except prompts.TemplateError as e:
                        raise bad_input(f"row {i}: {e}") from None
        if serving and self.max_chars and chars > self.max_chars:
            raise bad_input(f"request too large: {chars} characters of instructions and inputs, "
                            f"the server takes at most {self.max_chars} per request")
        given = check_params(params)
        settings = {**prompts.GENERATION_DEFAULTS, **given}
        max_new = settings["max_new_tokens"]
        # only a max_new_tokens the caller set is refused: the default (256) is what a request
        # without params (every CSV request) gets, and generation fits it to a small context
        if "max_new_tokens" in given and max_new + self._frame + 1 > self.context:
            raise bad_input(f"max_new_tokens must be at most {self.context - self._frame - 1} "
                            f"for this model (context {self.context} tokens, prompt template "
                            f"{self._frame}), got {max_new}")
        if settings["temperature"] < GREEDY_BELOW:
            settings["do_sample"] = False  # temperature 0: greedy, as most LLM APIs read it
        return settings

    def _prompt_lengths(self, rows: list["Row"]) -> list[int]:
        """Tokens of each row's prompt text (what orders rows into batches; the template adds
        about the same few to each): its prompt ids where known, else its instruction and input
        or its turns. A text longer than the context is measured on its last context x 64
        characters, as dolly.generation shortens it."""
        cap = self.context * 64
        texts = [("\n".join(m["content"] for m in r.messages) if r.messages is not None
                  else f"{r.instruction}\n{r.input}")[-cap:] for r in rows]
        measured = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(r.prompt_ids) if r.prompt_ids is not None else len(ids)
                for r, ids in zip(rows, measured)]

    def _generate(self, rows: list["Row"], settings: dict,
                  deadlines: list[float | None]) -> list:
        """dolly.generation.generate for Rows: their Generations, in order."""
        from dolly import generation

        return generation.generate(
            self._inner.pipeline.model, self._tokenizer, [r.instruction for r in rows],
            [r.input for r in rows], max_new_tokens=settings["max_new_tokens"],
            batch_size=self.batch_size, do_sample=settings["do_sample"],
            temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
            top_k=settings["top_k"], seed=settings.get("seed"), deadlines=deadlines,
            fmt=self.fmt, conversations=[r.messages for r in rows],
            prompt_ids=[r.prompt_ids for r in rows], watches=[r.watch for r in rows]).generations

    def generate_rows(self, rows: list, settings: dict, deadline: float | None) -> list:
        """Generations for `rows` ((prompt ids, conversation, dolly.generation.Watch) triples, as
        dolly.serve.openai_api makes them), through the batcher when batching across calls is
        on, with `settings` (those of `_check`, plus `seed`). Raises MlflowException
        DEADLINE_EXCEEDED (504) when `deadline` passes first."""
        return self._run([Row("", "", conv, ids, watch) for ids, conv, watch in rows], settings,
                         deadline)

    def _run(self, rows: list["Row"], settings: dict, deadline: float | None) -> list:
        from dolly.generation import expired
        from dolly.serve.request_batching import DeadlinePassed

        if expired([deadline])[0]:
            raise deadline_passed()
        if self.batcher is None:
            return self._generate(rows, settings, [deadline] * len(rows))
        try:
            return self.batcher.submit(rows, settings, tuple(sorted(settings.items())),
                                       lengths=self._prompt_lengths(rows), deadline=deadline)
        except DeadlinePassed:
            raise deadline_passed() from None

    def full_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation ending with a user turn, not shortened (the OpenAI
        routes refuse one that does not fit, as OpenAI does): Dolly's prompt of its one user
        turn, or the chat template's rendering. Raises dolly.prompts.TemplateError for a
        conversation the format cannot hold."""
        return self._ids(self.fmt.prompt(messages=messages))

    def predict(self, data, params: dict[str, Any] | None = None) -> list:
        """One response per record, in order; "" for null, empty or blank instructions (nothing
        visible: `dolly.prompts.is_blank`), without running the model for them. A record with a
        conversation (`messages`: list of {role, content} ending with a user turn) is answered
        in it.

        An OpenAI request (a dict with `messages`, or with `prompt` and another of OpenAI's
        completion fields; dolly.serve.openai_api) gets `[chat completion]` or
        `[text completion]` (OpenAI's objects, as a list of one).

        Rows are generated shortest prompt first in batches of the logged batch_size, and, when
        batching across calls is on (serve_batch_wait_ms > 0), together with the rows of
        concurrent calls that use the same generation settings. Raises MlflowException: 400 for
        input it cannot answer, DEADLINE_EXCEEDED (504) when `request_deadline` passes first.
        """
        from dolly.serve import openai_api

        if kind := openai_api.is_request(data):
            if params:
                raise bad_input("an OpenAI request carries its own settings: send them in it, "
                                "not as params")
            try:
                return [openai_api.answer(self, data, kind, current_deadline())]
            except openai_api.OpenAIError as e:
                if e.status == 504:
                    raise deadline_passed() from None
                if e.status == 404:
                    from mlflow.exceptions import MlflowException
                    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

                    raise MlflowException(e.message, RESOURCE_DOES_NOT_EXIST) from None
                raise bad_input(e.message) from None
        frame = as_frame(data)
        settings = self._check(frame, params or {})
        answers = [""] * len(frame)
        convs = frame[MESSAGES].tolist() if MESSAGES in frame else [None] * len(frame)
        todo = [i for i, (text, conv) in enumerate(zip(frame[INSTRUCTION], convs))
                if conv is not None or not prompts.is_blank(text)]
        if not todo:
            return answers
        rows = [Row(frame[INSTRUCTION].iat[i], frame[INPUT].iat[i], convs[i]) for i in todo]
        try:
            generations = self._run(rows, settings, current_deadline())
        except prompts.TemplateError as e:
            raise bad_input(str(e)) from None
        if any(g.expired for g in generations):
            raise deadline_passed()
        for i, g in zip(todo, generations):
            answers[i] = g.response
        return answers


@dataclass(eq=False)
class Row:
    """One prompt to answer: an instruction and input, or a conversation (`messages`, ending
    with a user turn), or prompt ids made already (`prompt_ids`); a Watch for streaming and
    cancelling (dolly.generation.Watch)."""

    instruction: str
    input: str
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    watch: Any = None
