"""Evaluation of a causal LM on the held-out split, and the evaluate step's comparison of a tuned
model with the base it was trained from.

Loss and response perplexity are measured on response tokens only (the tokens training learns; the
prompt is masked the same way), from the prepared token ids:

- eval_loss: mean cross-entropy per response token (nats)
- response_perplexity: exp(eval_loss), on the response tokens of the held-out instruction records
  (not the base's corpus perplexity of dolly.models.pretrain: other text, every token; never
  compare the two)

Generation metrics come from batched greedy decoding in Dolly's prompt format (dolly.generation,
the code the served model answers with):

- exact_match, rouge_l: dolly.eval.metrics
- stop_rate: answers that ended with `### End` before the token limit
- empty_rate: answers that are empty after parsing
- response_length: mean tokens generated per answer (`### End` included)
- tokens_per_s: generation throughput over the whole batch loop

The evaluate step runs `resolve_inputs` (the records, the model, the base it came from; nothing
loaded yet) and then `base_vs_tuned` (both models evaluated, the metrics and tables to log).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from dolly import generation
from dolly.config import Config, fields_where, parse_value
from dolly.data import IGNORE_INDEX, CompletionCollator, collator_for, load_prepared
from dolly.digests import EVAL_SET_TAG, eval_set_digest
from dolly.errors import ConfigError, DollyError
from dolly.eval.report import family_line, run_description
from dolly.eval import probe
from dolly.eval.metrics import category_metrics, exact_match, rouge_l
from dolly.models import base_key, cache_root, is_pretrained_tiny, load_base_model, lora
from dolly.prompts import DollyFormat, get_format
from dolly.tokenizer import load_tokenizer
from dolly.tracking import local_path

METRICS = ("eval_loss", "response_perplexity", "exact_match", "rouge_l", "stop_rate",
           "empty_rate", "response_length", "tokens_per_s")


def response_loss(model, test: pd.DataFrame, collator: CompletionCollator,
                  batch_size: int = 8) -> float:
    """Mean cross-entropy per response token, in nats: the loss training minimises.

    Batches are padded and masked by training's own collator (dolly.data.collator: labels -100 up
    to and including the response key and on padding, padding found by each record's length), so
    evaluation measures what training learns. `test` needs `input_ids` and `response_start`
    (as dolly.data.prepare writes them); records are cut to the model's context. Token-weighted
    over the whole split, so long and short answers count by their tokens. Raises DollyError when
    no record has a response token.
    """
    device = next(model.parameters()).device
    context = generation.context_length(model)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    spans = test["label_spans"] if "label_spans" in test.columns else [None] * len(test)
    rows = [{"input_ids": list(ids)[:context], "response_start": int(start),
             **({"label_spans": list(sp)} if sp is not None else {})}
            for ids, start, sp in zip(test["input_ids"], test["response_start"], spans)]
    rows.sort(key=lambda r: len(r["input_ids"]))  # similar lengths together: little padding
    try:
        for b in range(0, len(rows), batch_size):
            batch = collator(rows[b:b + batch_size])
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DollyError("the test split has no response tokens to evaluate")
    return total / count


@dataclass
class ModelEval:
    """Aggregate metrics and the per-example answers of one model."""

    metrics: dict[str, float]
    examples: pd.DataFrame  # response, exact_match, rouge_l, stopped, new_tokens


def conversations_of(records: pd.DataFrame) -> list[list[dict] | None]:
    """Per record, its conversation up to the last answer (from the `messages` JSON column that
    dolly.data.prepare writes; None for an instruction record or a frame without the column)."""
    if "messages" not in records.columns:
        return [None] * len(records)
    return [json.loads(m)[:-1] if isinstance(m, str) and m else None for m in records["messages"]]


def answer(model, tokenizer, records: pd.DataFrame, *, max_new_tokens: int,
           batch_size: int, fmt=None) -> tuple[pd.DataFrame, generation.GenerationRun]:
    """Greedy answers to `records` (columns instruction, input, response; messages for a
    conversation) in the prompt format `fmt` (default Dolly's), and the generation run: one row
    per record with response, exact_match, rouge_l, stopped, new_tokens."""
    inputs = [i if isinstance(i, str) else None for i in records["input"]]
    run = generation.generate(model, tokenizer, list(records["instruction"]), inputs,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, fmt=fmt,
                              conversations=conversations_of(records))
    gens = run.generations
    refs = list(records["response"])
    ex = pd.DataFrame({
        "response": [g.response for g in gens],
        "exact_match": [exact_match(g.response, r) for g, r in zip(gens, refs)],
        "rouge_l": [rouge_l(g.response, r) for g, r in zip(gens, refs)],
        "stopped": [g.stopped for g in gens],
        "new_tokens": [g.new_tokens for g in gens],
    })
    return ex, run


def evaluate_model(model, tokenizer, test: pd.DataFrame, *, max_new_tokens: int,
                   batch_size: int, fmt=None) -> ModelEval:
    """Every metric of METRICS for one model on `test` (a prepared split), prompted in `fmt`
    (dolly.prompts.get_format; default Dolly's)."""
    fmt = fmt if fmt is not None else DollyFormat(tokenizer)
    collator = collator_for(fmt, tokenizer)
    if collator.pad_token_id is None:
        collator.pad_token_id = tokenizer.eos_token_id
    loss = response_loss(model, test, collator, batch_size)
    ex, run = answer(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     fmt=fmt)
    gens = run.generations
    n = max(len(gens), 1)
    metrics = {
        "eval_loss": loss,
        # capped: an untrained model's exp(loss) overflows
        "response_perplexity": math.exp(min(loss, 50.0)),
        "exact_match": float(ex["exact_match"].mean()) if len(ex) else 0.0,
        "rouge_l": float(ex["rouge_l"].mean()) if len(ex) else 0.0,
        "stop_rate": sum(g.stopped for g in gens) / n,
        "empty_rate": sum(not g.response for g in gens) / n,
        "response_length": sum(g.new_tokens for g in gens) / n,
        "tokens_per_s": run.tokens_per_s,
        "generation_s": run.seconds,
    }
    return ModelEval(metrics, ex)


def unseen_metrics(records: pd.DataFrame, ex: pd.DataFrame) -> dict[str, float]:
    """exact_match_unseen (the mean over the unseen-word probe, dolly.eval.probe) and
    exact_match_unseen/<family>, from the probe's records and one model's answers (`answer`)."""
    out = {"exact_match_unseen": float(ex["exact_match"].mean()) if len(ex) else 0.0}
    out.update({f"exact_match_unseen/{k.split('/', 1)[1]}": v
                for k, v in category_metrics(records, ex).items() if k.startswith("exact_match/")})
    return out


def prepared_format(prepared: Path) -> str:
    """The prompt format a prepared/ folder's records were rendered in (`dolly` or
    `chat_template`, recorded by data_prep; folders from before prompt formats: dolly)."""
    summary = json.loads((Path(prepared) / "summary.json").read_text())
    return summary.get("prompt_format", "dolly")


def select(test: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The first `limit` test records (0 = all): a fixed subset, the same on every run."""
    return test.head(limit).reset_index(drop=True) if limit > 0 else test.reset_index(drop=True)


def device() -> torch.device:
    """The device evaluation runs on: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(dev: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU (as training's 'auto')."""
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_folder(local: Path) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) inside a downloaded transformers-flavor model or a
    plain saved-model folder. For a LoRA adapter the weights folder is the adapter's (peft/ of
    a logged PEFT model, or the folder itself); `adapter_base` says where its base is."""
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = _transformers_flavor(mlmodel)
        tok = local / "components" / "tokenizer"
        if flavor.get("peft_adaptor"):
            weights = local / flavor["peft_adaptor"]
            if lora.is_adapter(weights):
                return weights, tok
            raise DollyError(f"{local}: an MLflow PEFT model without its adapter "
                             f"({weights.name}/{lora.ADAPTER_CONFIG})")
        weights = local / flavor.get("model_binary", "model")
        if not (tok / "tokenizer_config.json").is_file():
            tok = weights
        if (weights / "config.json").is_file():
            return weights, tok
        raise DollyError(f"{local}: an MLflow model without transformers weights (no {weights.name}/config.json)")
    if (local / "config.json").is_file() or lora.is_adapter(local):
        return local, local
    raise DollyError(f"{local}: neither an MLflow transformers model nor a saved model folder")


def _transformers_flavor(mlmodel: Path) -> dict[str, Any]:
    import yaml

    spec: dict[str, Any] = yaml.safe_load(mlmodel.read_text()) or {}
    return (spec.get("flavors") or {}).get("transformers") or {}


def adapter_base(local: Path, weights: Path) -> str:
    """The local folder of the base a LoRA adapter (`weights`, inside `local`) is loaded onto:
    a logged model's `local_base_model_path` (MLflow's base_model_path) and base name, else
    the adapter folder's own record (dolly.models.lora.base_reference). Raises DollyError when
    the base is not there."""
    if (local / "MLmodel").is_file():
        flavor = _transformers_flavor(local / "MLmodel")
        ref = {"path": flavor.get("local_base_model_path") or "",
               "name": flavor.get("source_model_name") or "",
               "revision": flavor.get("source_model_revision") or ""}
    else:
        ref = lora.base_reference(weights)
    return lora.resolve_base_path(ref)


def logged_run_id(local: Path) -> str | None:
    """The run that logged a downloaded MLflow model (the train run), if it says."""
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return None
    import yaml

    return (yaml.safe_load(mlmodel.read_text()) or {}).get("run_id") or None


def base_config(cfg: Config, train_params: dict[str, str]) -> tuple[Config, dict[str, Any]]:
    """`cfg` with the base-model fields (Config fields declared `base=True`) that the train run
    logged: evaluating a model always compares it with the base *it* was trained from, even when
    evaluate runs with other settings. Returns (config, {field: value that differed})."""
    changes = {}
    for name in fields_where(base=True):
        if name in train_params:
            try:
                value = parse_value(name, train_params[name])
            except ConfigError:
                continue
            if value != getattr(cfg, name):
                changes[name] = value
    return (dataclasses.replace(cfg, **changes) if changes else cfg), changes


def load_saved_model(model_uri: str, cfg: Config, dev, dtype, local: Path | None = None):
    """(model on `dev`, tokenizer, local folder) of a logged or registered transformers model
    (models:/..., runs:/... or a saved folder; `local`: its already downloaded folder).
    Raises DollyError when it cannot be loaded."""
    from transformers import AutoModelForCausalLM

    local = local or local_path(model_uri, "model")
    weights, tok_dir = model_folder(local)
    if lora.is_adapter(weights):  # the base it refers to, with the adapter applied (unmerged)
        model = lora.load_with_adapter(weights, adapter_base(local, weights), dtype).to(dev)
        return model, load_tokenizer(str(tok_dir)), local
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(weights), dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code).to(dev)
    except OSError as e:
        raise DollyError(f"cannot load the model of '{model_uri}': {str(e).splitlines()[0]}") \
            from None
    return model, load_tokenizer(str(tok_dir)), local


# --- the evaluate step: the tuned model against the base it was trained from ------------------

def _say(line: str) -> None:
    print(line, flush=True)


def train_run_params(run_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of the train run that logged the model; empty when there is none or it
    cannot be read (another tracking store, deleted)."""
    if not run_id:
        return {}, {}
    import mlflow

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # the run may live in another tracking store or be deleted
        return {}, {}
    return dict(run.data.params), dict(run.data.tags)


@dataclass
class EvalInputs:
    """What the evaluate step works on, resolved before any model is loaded."""

    model_uri: str
    prepared_uri: str
    prepared: Path                # the local prepared/ folder
    model_local: Path             # the local model folder
    test: pd.DataFrame            # the evaluated records: the first eval_limit of the test split
    data_hash: str
    eval_set: str                 # dolly.digests.eval_set_digest of `test`
    train_run: str | None         # the run that logged the model
    train_tags: dict[str, str]
    base_cfg: Config              # cfg with the train run's base-model fields
    builtin: bool = False         # the built-in families: the unseen-word probe applies

    def tags(self) -> dict[str, str]:
        """The evaluate run's tags that say what was evaluated (register reads them)."""
        return {"data_hash": self.data_hash, "model_uri": self.model_uri,
                EVAL_SET_TAG: self.eval_set, "prepared": self.prepared_uri,
                "train_run_id": self.train_run or "", "base_model": self.base_cfg.base_model,
                "eval_records": str(len(self.test))}


def resolve_inputs(cfg: Config, model_uri: str, prepared_uri: str,
                   log: Callable[[str], None] = _say) -> EvalInputs:
    """Fetch the prepared data and the model, pick the records (cfg.eval_limit) and find the base
    the model was trained from (the train run's base-model fields win over cfg's). Raises
    DollyError for an empty test split or a folder that is not a transformers model, before any
    weights are loaded."""
    prepared = local_path(prepared_uri, "prepared data")
    _, test, summary = load_prepared(prepared)
    test = select(test, cfg.eval_limit)
    if len(test) == 0:
        raise DollyError(f"{prepared_uri}: the test split is empty")
    model_local = local_path(model_uri, "model")
    model_folder(model_local)  # not a transformers model: fail before the base
    train_run = logged_run_id(model_local)
    train_params, train_tags = train_run_params(train_run)
    base_cfg, changed = base_config(cfg, train_params)
    if changed:
        log(f"evaluate: base model settings from train run {train_run}: {changed}")
    data_hash = summary.get("data_hash", "")
    if train_tags.get("data_hash") and train_tags["data_hash"] != data_hash:
        log(f"evaluate: warning: the model was trained on data {train_tags['data_hash'][:12]}, "
            f"evaluating on {data_hash[:12]}")
    return EvalInputs(model_uri, prepared_uri, prepared, model_local, test, data_hash,
                      eval_set_digest(data_hash, test), train_run, train_tags, base_cfg,
                      probe.applies(summary))


def comparison(metrics: dict[str, float]) -> pd.DataFrame:
    """One row per metric with the base and tuned values side by side (the MLflow UI shows a
    logged table as a table; base/ and tuned/ metrics land in separate chart sections)."""
    names = [k[len("tuned/"):] for k in metrics if k.startswith("tuned/")]
    rows = [{"metric": n, "base": metrics.get(f"base/{n}"), "tuned": metrics[f"tuned/{n}"]}
            for n in names]
    return pd.DataFrame(rows, columns=["metric", "base", "tuned"])


@dataclass
class Evaluation:
    """What the evaluate step logs: every metric, the tables and the run's description."""

    metrics: dict[str, float]        # base/<m>, tuned/<m>, <who>/<m>/<family>, eval_records
    tuned_metrics: dict[str, float]  # the tuned/ part of `metrics` (also on its LoggedModel)
    comparison: pd.DataFrame         # metric, base, tuned: base_vs_tuned.json
    examples: pd.DataFrame           # one row per record, both answers: eval_examples.json
    note: str                        # Markdown: the run's description and comparison.md
    base_folder: Path | None = None  # the cached pretrained base that was evaluated, if any
    lines: list[str] = field(default_factory=list)  # the summary the step prints
    probe_examples: pd.DataFrame | None = None  # the same as `examples`, unseen-word probe

    @property
    def other_metrics(self) -> dict[str, float]:
        """`metrics` less `tuned_metrics`: base/..., eval_records. The step logs these and
        `tuned_metrics` once each, so every measure has one name and one record on the run."""
        return {k: v for k, v in self.metrics.items() if k not in self.tuned_metrics}


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_vs_tuned(cfg: Config, inputs: EvalInputs,
                  log: Callable[[str], None] = _say) -> Evaluation:
    """Evaluate the base (rebuilt from `inputs.base_cfg` with the prepared tokenizer) and then the
    tuned model on `inputs.test` with greedy generation (cfg.eval_max_new_tokens,
    cfg.eval_batch_size), one model in memory at a time. Raises DollyError when the tuned
    model's tokenizer is not the prepared one (its token ids would mean other text)."""
    test, base_cfg = inputs.test, inputs.base_cfg
    dev = device()
    dtype = dtype_for(dev)
    kw = {"max_new_tokens": cfg.eval_max_new_tokens, "batch_size": cfg.eval_batch_size}
    results = {}

    t0 = time.perf_counter()
    base_tok = load_tokenizer(str(inputs.prepared / "tokenizer"))
    fmt_name = prepared_format(inputs.prepared)
    base = load_base_model(base_cfg, base_tok, dtype=dtype).to(dev)
    base_folder = None
    if is_pretrained_tiny(base_cfg):  # the same pretrained base train used
        key = base_key(base_cfg, base_tok)
        if inputs.train_tags.get("base_key") and inputs.train_tags["base_key"] != key:
            log(f"evaluate: warning: the model was trained from base "
                f"{inputs.train_tags['base_key']}, evaluating base {key}")
        base_folder = cache_root() / key
    kw["fmt"] = get_format(fmt_name, base_tok)
    results["base"] = evaluate_model(base, base_tok, test, **kw)
    probe_set, probe_answers = None, {}
    if inputs.builtin:
        t1 = time.perf_counter()
        trained = probe.trained_words(inputs.prepared, base_cfg, base_tok)
        n = min(probe.PROBE_RECORDS, cfg.eval_limit) if cfg.eval_limit > 0 else probe.PROBE_RECORDS
        probe_set = probe.probe_records(base_cfg.seed, trained, n)
        log(f"evaluate: unseen-word probe: {len(probe_set)} records whose words are none of the "
            f"{len(trained)} words of {probe.checked_against(base_cfg)} "
            f"({time.perf_counter() - t1:.1f}s)")
        probe_answers["base"] = answer(base, base_tok, probe_set, **kw)[0]
    _free(base)
    log(f"evaluate: base done in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    tuned, tuned_tok, _ = load_saved_model(inputs.model_uri, cfg, dev, dtype, inputs.model_local)
    if tuned_tok.get_vocab() != base_tok.get_vocab():
        raise DollyError(f"the model's tokenizer differs from {inputs.prepared_uri}/tokenizer: "
                         "evaluate a model on the prepared data it was trained on")
    kw["fmt"] = get_format(fmt_name, tuned_tok)
    results["tuned"] = evaluate_model(tuned, tuned_tok, test, **kw)
    if probe_set is not None:
        probe_answers["tuned"] = answer(tuned, tuned_tok, probe_set, **kw)[0]
    _free(tuned)
    log(f"evaluate: tuned done in {time.perf_counter() - t0:.1f}s")

    metrics = {}
    for who, res in results.items():
        metrics.update({f"{who}/{k}": float(v) for k, v in res.metrics.items()})
    for who in ("tuned", "base"):
        metrics.update({f"{who}/{k}": v
                        for k, v in category_metrics(test, results[who].examples).items()})
    metrics["eval_records"] = float(len(test))
    probe_table = None
    if probe_set is not None:
        for who in ("tuned", "base"):
            metrics.update({f"{who}/{k}": v
                            for k, v in unseen_metrics(probe_set, probe_answers[who]).items()})
        metrics["probe_records"] = float(len(probe_set))
        probe_table = _side_by_side(probe_set, probe_answers["base"], probe_answers["tuned"])
    table = _side_by_side(test, results["base"].examples, results["tuned"].examples)
    # The run page shows its description at once (rendered Markdown): the comparison goes there.
    note = run_description(table, base_cfg.base_model, unseen=probe_table,
                           checked=probe.checked_against(base_cfg))
    line = ", ".join(f"{m} {metrics[f'base/{m}']:.4g} -> {metrics[f'tuned/{m}']:.4g}"
                     for m in ("exact_match", "rouge_l", "response_perplexity", "stop_rate"))
    lines = [f"evaluate: {len(test)} records, base -> tuned: {line}"]
    lines += [f"evaluate: {by_family}" for by_family in
              (family_line(metrics, who) for who in ("tuned", "base")) if by_family]
    if probe_table is not None:
        lines.append(f"evaluate: unseen-word probe, {len(probe_table)} records: exact match "
                     f"{metrics['base/exact_match_unseen']:.4g} -> "
                     f"{metrics['tuned/exact_match_unseen']:.4g}")
        lines += [f"evaluate: {by_family} (unseen words)" for by_family in
                  (family_line(metrics, who, "exact_match_unseen") for who in ("tuned", "base"))
                  if by_family]
    tuned_metrics = {k: v for k, v in metrics.items() if k.startswith("tuned/")}
    return Evaluation(metrics, tuned_metrics, comparison(metrics), table, note, base_folder,
                      lines, probe_table)


def _side_by_side(records: pd.DataFrame, b: pd.DataFrame, t: pd.DataFrame) -> pd.DataFrame:
    """One row per record: its fields, the reference, and base's and tuned's answers and scores."""
    return pd.DataFrame({
        "instruction": records["instruction"].to_numpy(), "input": records["input"].to_numpy(),
        "reference": records["response"].to_numpy(),
        "category": (records["category"].to_numpy() if "category" in records.columns else ""),
        "base_response": b["response"].to_numpy(), "tuned_response": t["response"].to_numpy(),
        "base_exact_match": b["exact_match"].to_numpy(),
        "tuned_exact_match": t["exact_match"].to_numpy(),
        "base_rouge_l": b["rouge_l"].to_numpy(), "tuned_rouge_l": t["rouge_l"].to_numpy(),
        "base_stopped": b["stopped"].to_numpy(), "tuned_stopped": t["stopped"].to_numpy(),
    })
