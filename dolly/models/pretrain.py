"""The tiny profile's pretrained base: a small GPT-J trained as a plain causal language model on
the built-in corpus (dolly.data.corpus), built once per configuration and kept in a local cache.

Why a cache folder and not a logged MLflow model: the train step's ranks load the base with
`from_pretrained` (ZeRO-3 partitions it while loading), evaluate loads the same base, and both
find it by a key computed from what shapes it, whatever tracking store or experiment they log to;
a logged model would have to be searched for by tag in one store. The train and evaluate runs
record the key and the base's held-out corpus perplexity (`log_base`).

The key is a sha256 over every Config field declared `base=True` (seed, the tiny_* shape, the
pretrain_* fields, ...), the tokenizer's content and CORPUS_VERSION. The cache lives in
$DOLLY_BASE_CACHE, else ~/.cache/dolly/bases; each base is a folder `<key>/` written to a
temporary folder beside it and renamed into place, so a concurrent or interrupted run never
sees half a base (the loser of a race discards its copy and uses the winner's).

Pretraining runs in one process (the train step's parent, before the ranks start; or evaluate
when the cache lost it): seeded init (dolly.models.tiny.build_tiny), seeded corpus order, AdamW with
linear warmup, a constant rate and clipping. Same key, machine and thread count: same weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from dolly.config import TINY_BASE_MODEL, Config, fields_where
from dolly.data import corpus
from dolly.digests import tokenizer_hash
from dolly.errors import DollyError
from dolly.models.tiny import build_tiny

CACHE_ENV = "DOLLY_BASE_CACHE"
# Bump when dolly.data.corpus or the pretraining loop changes what a key's weights are.
CORPUS_VERSION = "2"
# Every other pretraining step trains on READ_BACK_LINES read-back lines (corpus.read_back_lines),
# the others on running text. Measured on the default shape (2026-11-29, loss on the copied
# half of held-out read-back lines): alternating steps at a constant 1e-3 form a copying circuit
# by step ~300 (6.1 -> 0.11) and keep it; the running text alone never formed one in 400-800
# steps; summing both losses in every step did not either (the prose gradient dominates the
# clipped update); and read-back lines first, then running text only, formed it (0.10 at step
# 250) and lost it again within 200 prose steps (5.6).
READ_BACK_LINES = 32
INFO_FILE = "base_info.json"
BASE_FIELDS = fields_where(base=True)
HELD_OUT_PARAGRAPHS = 200


def is_pretrained_tiny(cfg: Config) -> bool:
    """True when `cfg`'s base is the tiny GPT-J pretrained on the built-in corpus."""
    return cfg.base_model == TINY_BASE_MODEL and cfg.pretrain_steps > 0


def base_key(cfg: Config, tok) -> str:
    """The cache key of the base `cfg` and `tok` shape: 20 hex digits of a sha256 over the
    fields declared base=True, the tokenizer and CORPUS_VERSION."""
    shape = {name: getattr(cfg, name) for name in BASE_FIELDS}
    blob = json.dumps({"fields": shape, "tokenizer": tokenizer_hash(tok),
                       "corpus_version": CORPUS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_root() -> Path:
    """$DOLLY_BASE_CACHE, else ~/.cache/dolly/bases."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dolly" / "bases"


def cached_base(cfg: Config, tok) -> Path | None:
    """The folder of the cached base for `cfg`/`tok`, or None when it was not built yet."""
    folder = cache_root() / base_key(cfg, tok)
    return folder if (folder / INFO_FILE).is_file() else None


def base_info(folder: Path) -> dict[str, Any]:
    """What pretraining recorded about a cached base (key, perplexities, steps, seconds)."""
    return json.loads((Path(folder) / INFO_FILE).read_text())


def _token_stream(tok, texts: list[str]) -> list[int]:
    """The paragraphs' token ids joined by a blank line: running text, no eos between
    paragraphs (a base that learned to emit eos would stop like a tuned model)."""
    ids: list[int] = []
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.extend(sep)
    return ids


def _read_back_rows(tok, cfg: Config, n_rows: int):
    """(n_rows, line tokens) int64: one read-back line a row. Every line has the same number of
    tokens (lexicon words are single tokens of the corpus BPE); a tokenizer that splits them
    differently gets its rows cut to the shortest line, and no row is longer than
    `pretrain_seq_len` or the model's context."""
    import torch

    encs = tok(corpus.read_back_lines(n_rows, cfg.seed), add_special_tokens=False)["input_ids"]
    width = min(min(len(e) for e in encs), cfg.pretrain_seq_len, cfg.tiny_n_positions)
    return torch.tensor([e[:width] for e in encs], dtype=torch.long)


def _chunks(ids: list[int], seq_len: int):
    """`ids` cut into `(len(ids) // seq_len, seq_len) int64` rows; the remainder is dropped."""
    import torch

    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def perplexity(model, chunks) -> float:
    """exp(mean next-token cross-entropy) over `chunks: (n, seq) int64`, in batches of 16."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), 16):
            batch = chunks[i:i + 16]
            loss = model(input_ids=batch, labels=batch).loss.item()
            total += loss * batch.numel()
            count += batch.numel()
    return math.exp(min(total / max(count, 1), 50.0))


def held_out_chunks(cfg: Config, tok):
    """Held-out corpus text (`corpus.held_out`) as token ids: `(n, pretrain_seq_len) int64`."""
    return _chunks(_token_stream(tok, corpus.held_out(HELD_OUT_PARAGRAPHS, cfg.seed)),
                   cfg.pretrain_seq_len)


def pretrain(cfg: Config, tok, log: Callable[[str], None] = print):
    """Train the tiny GPT-J of `cfg` on the built-in corpus for `cfg.pretrain_steps` steps of
    `cfg.pretrain_batch_size` x `cfg.pretrain_seq_len` tokens of running text, every other step
    READ_BACK_LINES read-back lines instead, AdamW at `pretrain_learning_rate`
    after a linear warmup over 10% of the steps, constant after it (the copying circuit forms
    late, ~250 steps, and a decaying rate stalled it). Returns (model, info)."""
    import torch

    t0 = time.perf_counter()
    tokens_needed = cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.pretrain_seq_len
    texts: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens_needed:  # ~60 tokens a paragraph: one pass is usually enough
        more = max(64, (tokens_needed - len(ids)) // 40)
        texts = corpus.generate(len(texts) + more, cfg.seed)
        ids = _token_stream(tok, texts)
    train_chunks = _chunks(ids, cfg.pretrain_seq_len)
    n_lines = READ_BACK_LINES
    read_back = _read_back_rows(tok, cfg, max(1, (cfg.pretrain_steps + 1) // 2 * n_lines))
    eval_chunks = held_out_chunks(cfg, tok)
    model = build_tiny(cfg, tok)
    random_ppl = perplexity(model, eval_chunks)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    order = list(range(len(train_chunks)))
    random.Random(cfg.seed).shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate,
                            betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_at(step: int) -> float:  # linear warmup, then constant (see READ_BACK_LINES)
        return min(1.0, (step + 1) / warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    loss = float("nan")
    try:
        for step in range(cfg.pretrain_steps):
            half = step // 2
            if step % 2:
                batch = train_chunks[[order[(half * cfg.pretrain_batch_size + j) % len(order)]
                                      for j in range(cfg.pretrain_batch_size)]]
            else:
                batch = read_back[[(half * n_lines + j) % len(read_back) for j in range(n_lines)]]
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if (step + 1) % max(1, cfg.pretrain_steps // 5) == 0:
                log(f"pretrain: step {step + 1}/{cfg.pretrain_steps}, loss {loss:.3f}, "
                    f"{time.perf_counter() - t0:.0f} s")
    finally:
        torch.random.set_rng_state(gen_state)
    ppl = perplexity(model, eval_chunks)
    info = {"key": base_key(cfg, tok), "perplexity": ppl, "random_init_perplexity": random_ppl,
            "final_loss": loss, "steps": cfg.pretrain_steps,
            "tokens": cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.pretrain_seq_len,
            "held_out_tokens": int(eval_chunks.numel()), "seconds": round(time.perf_counter() - t0, 1),
            "corpus_version": CORPUS_VERSION}
    return model, info


def ensure_base(cfg: Config, tok, log: Callable[[str], None] = print) -> Path | None:
    """The cached pretrained base for `cfg`/`tok`, pretrained now (in this process) when
    missing; None when `cfg`'s base is not the pretrained tiny model. Safe to call from
    concurrent processes: the folder appears whole, by one rename."""
    if not is_pretrained_tiny(cfg):
        return None
    found = cached_base(cfg, tok)
    if found is not None:
        return found
    key = base_key(cfg, tok)
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DollyError(f"cannot create the base model cache {root}: {e.strerror}") from None
    log(f"pretrain: no cached base {key}; pretraining the tiny GPT-J on the built-in corpus "
        f"({cfg.pretrain_steps} steps, cache {root})")
    model, info = pretrain(cfg, tok, log)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process put the same base there first: keep theirs
            if cached_base(cfg, tok) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"pretrain: base {key} ready: held-out corpus perplexity {info['perplexity']:.2f} "
        f"(random init {info['random_init_perplexity']:.1f}), {info['seconds']:.0f} s")
    return root / key


def log_base(folder: Path) -> dict[str, Any]:
    """Record on the active MLflow run which pretrained base it used and its held-out corpus
    perplexity: exp(mean next-token cross-entropy, nats) over `held_out_chunks` (paragraphs of
    the corpus's kind drawn from another random stream, so text pretraining never saw; every
    next token scored), of the base and of the same model at its random initialisation: what
    pretraining learned, not comparable with evaluate's response perplexity (Dolly-format
    records, response tokens only). Tags `base_key`, `base_corpus_perplexity`,
    `base_random_init_corpus_perplexity`; metrics `pretrain/corpus_perplexity`,
    `pretrain/random_init_corpus_perplexity`. Returns the base's info (base_info.json, whose
    `perplexity` and `random_init_perplexity` are these corpus perplexities)."""
    import mlflow

    info = base_info(folder)
    ppl, random_ppl = info["perplexity"], info["random_init_perplexity"]
    mlflow.set_tags({"base_key": info["key"], "base_corpus_perplexity": f"{ppl:.3f}",
                     "base_random_init_corpus_perplexity": f"{random_ppl:.1f}"})
    mlflow.log_metrics({"pretrain/corpus_perplexity": ppl,
                        "pretrain/random_init_corpus_perplexity": random_ppl})
    return info
