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
linear warmup, a constant rate, a linear decay at the end and clipping. Same key, machine and
thread count: same weights.
"""
from __future__ import annotations

import bisect
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

from dolly.config import TINY_BASES, Config, fields_where
from dolly.data import corpus
from dolly.data.words import PROBE
from dolly.digests import tokenizer_hash
from dolly.errors import DollyError
from dolly.models.tiny import build_tiny

CACHE_ENV = "DOLLY_BASE_CACHE"
# Bump when dolly.data.corpus or the pretraining loop changes what a key's weights are.
CORPUS_VERSION = "3"
# Every other pretraining step trains on READ_BACK_ROWS rows of read-back lines
# (corpus.read_back_lines, whole lines packed per row), the others on running text.
# Measured 2026-11-29 over the old closed 400-word lexicon (every word one token, every line
# 8 words): a copying circuit formed by step ~300. But it copied at a fixed distance, not by
# content. Over generated words (several tokens each, lines of 2-6 words; measured 2026-12-04,
# default shape, seed 42, the share of unseen words copied exactly, `kaki ;kaki` teacher-forced):
# 600 steps at a constant 1e-3 copied 14% of them; random token strings instead of words 0%; a
# constant 3e-3 0.5%. At 1,500 constant steps copying formed between steps 450 and 800 (0.02 ->
# 0.55) and then swung between 0.33 and 0.91 from one measurement to the next (0.58 at the end).
# With the rate decaying over the last 40% (DECAY_FROM), 1,200 steps: 0.03 at step 450, 0.41 at
# 700, 0.95 at 1,000, 0.92 at 1,200.
# 16 rows of 64 tokens: the measurements above; 32 rows formed the circuit too (0.98 at step
# 1,200) at 1.5x the pretraining time.
READ_BACK_ROWS = 16
# Every COPY_EVERY pretraining steps, copy accuracy on UNSEEN_COPY_LINES read-back lines of unseen
# words is measured (`copy_accuracy`): the step at which the copying circuit forms.
COPY_EVERY = 25
UNSEEN_COPY_LINES = 64
# The learning rate decays linearly to 10% over the steps after this share of them: the copying
# circuit forms at a constant rate and then swings from step to step; the decay settles it.
DECAY_FROM = 0.6
INFO_FILE = "base_info.json"
BASE_FIELDS = fields_where(base=True)
HELD_OUT_PARAGRAPHS = 200


def is_pretrained_tiny(cfg: Config) -> bool:
    """True when `cfg`'s base is a tiny base (GPT-J or Llama) pretrained on the built-in corpus."""
    return cfg.base_model in TINY_BASES and cfg.pretrain_steps > 0


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


def pretraining_texts(cfg: Config, tok) -> tuple[list[str], list[str]]:
    """(paragraphs, read-back lines): every text that pretraining `cfg`'s base with `tok` reads,
    exactly (the paragraphs' tokens cover `pretrain_steps` x `pretrain_batch_size` x
    `pretrain_seq_len`; the read-back lines fill READ_BACK_ROWS rows for every other step)."""
    tokens_needed = cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.pretrain_seq_len
    return (_texts_for(lambda n: corpus.generate(n, cfg.seed), tok, tokens_needed),
            _lines_for(cfg, tok, _read_back_rows_needed(cfg)))


def _texts_for(make: Callable[[int], list[str]], tok, tokens: int) -> list[str]:
    """The shortest prefix of `make(n)` whose token stream (`_token_stream`) has `tokens` tokens
    (`make(n)` must start with `make(m)` for m < n)."""
    sep = len(tok("\n\n", add_special_tokens=False)["input_ids"])
    n = 64
    while True:
        texts = make(n)
        lengths = [len(e) + sep for e in tok(texts, add_special_tokens=False)["input_ids"]]
        total = 0
        for i, length in enumerate(lengths):
            total += length
            if total >= tokens:
                return texts[:i + 1]
        # ask for what the mean length says is missing, 10% more
        n += max(64, int((tokens - total) / (total / len(texts)) * 1.1))


def _lines_for(cfg: Config, tok, rows: int) -> list[str]:
    """The shortest prefix of `corpus.read_back_lines` that `_line_rows` packs into `rows` rows."""
    sep = len(tok("\n\n", add_special_tokens=False)["input_ids"])
    n = rows * 2
    while True:
        lines = corpus.read_back_lines(n, cfg.seed)
        lengths = [len(enc) + sep for enc in tok(lines, add_special_tokens=False)["input_ids"]]
        row_of = _row_of_each(lengths, cfg.pretrain_seq_len)
        if row_of[-1] >= rows:  # the lines reach past the last row wanted
            return lines[:bisect.bisect_left(row_of, rows)]
        n *= 2


def _row_of_each(lengths: list[int], seq_len: int) -> list[int]:
    """The row each item goes to when items of `lengths` tokens are packed whole, in order, into
    rows of `seq_len` tokens: an item that does not fit starts the next row; one longer than a
    row is cut to it. Non-decreasing, from 0."""
    rows, row, used = [], 0, 0
    for length in lengths:
        length = min(length, seq_len)
        if used + length > seq_len:
            row, used = row + 1, 0
        rows.append(row)
        used += length
    return rows


def _line_rows(tok, lines: list[str], seq_len: int):
    """(input_ids, labels), each `(rows, seq_len) int64`: whole lines packed into rows in order
    (`_row_of_each`: a line that does not fit starts the next row; a line longer than a row is
    cut), each line followed by a blank line; padding is eos with label -100. A line is never
    split across rows, so every copied half has the half it copies in the same row."""
    import torch

    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    encs = [(enc + sep)[:seq_len] for enc in tok(lines, add_special_tokens=False)["input_ids"]]
    row_of = _row_of_each([len(e) for e in encs], seq_len)
    rows: list[list[int]] = [[] for _ in range(row_of[-1] + 1 if row_of else 0)]
    for enc, row in zip(encs, row_of):
        rows[row].extend(enc)
    ids = torch.full((len(rows), seq_len), tok.eos_token_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row)
    return ids, labels


def _read_back_rows_needed(cfg: Config) -> int:
    return max(1, (cfg.pretrain_steps + 1) // 2 * READ_BACK_ROWS)


def copy_accuracy(model, tok, lines: list[str]) -> float:
    """Share of read-back lines (`words ;words`, corpus.read_back_lines) whose copied half the
    model predicts exactly: teacher-forced, the argmax at every token of the second half is the
    next token. On lines of words the model never saw, it measures copying arbitrary token
    strings, not recalling words."""
    import torch

    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(lines), 32):
            firsts = [line[:line.index(";") + 1] for line in lines[i:i + 32]]
            seconds = [line[line.index(";") + 1:] for line in lines[i:i + 32]]
            a = tok(firsts, add_special_tokens=False)["input_ids"]
            b = tok(seconds, add_special_tokens=False)["input_ids"]
            rows = [x + y for x, y in zip(a, b)]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            pred = model(input_ids=ids).logits.argmax(-1)
            for row, (x, y) in enumerate(zip(a, b)):
                got = pred[row, len(x) - 1:len(x) + len(y) - 1].tolist()
                hits += got == y
    model.train()
    return hits / max(len(lines), 1)


def unseen_copy_lines(cfg: Config, n: int = UNSEEN_COPY_LINES) -> list[str]:
    """Read-back lines of one word each (`kaki ;kaki`), words from the probe's part of the word
    space (dolly.data.words): words that no pretraining or fine-tuning text holds."""
    return corpus.read_back_lines(n, cfg.seed, words_per_list=(1, 1), part=PROBE)


def pretrain(cfg: Config, tok, log: Callable[[str], None] = print):
    """Train the tiny GPT-J of `cfg` on the built-in corpus for `cfg.pretrain_steps` steps of
    `cfg.pretrain_batch_size` x `cfg.pretrain_seq_len` tokens of running text, every other step
    READ_BACK_ROWS rows of read-back lines instead, AdamW at `pretrain_learning_rate`
    after a linear warmup over 10% of the steps, constant until DECAY_FROM of them, then a
    linear decay to 10% (the copying circuit forms while the rate is constant and settles while
    it decays; see READ_BACK_ROWS). Every COPY_EVERY steps it measures
    `copy_accuracy` on read-back lines of unseen words. Returns (model, info)."""
    import torch

    t0 = time.perf_counter()
    paragraphs, lines = pretraining_texts(cfg, tok)
    train_chunks = _chunks(_token_stream(tok, paragraphs), cfg.pretrain_seq_len)
    n_lines = READ_BACK_ROWS
    read_back, read_back_labels = _line_rows(tok, lines, cfg.pretrain_seq_len)
    eval_chunks = held_out_chunks(cfg, tok)
    unseen = unseen_copy_lines(cfg)
    model = build_tiny(cfg, tok)
    random_ppl = perplexity(model, eval_chunks)
    curve = [[0, copy_accuracy(model, tok, unseen)]]
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    order = list(range(len(train_chunks)))
    random.Random(cfg.seed).shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate,
                            betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 10)

    decay_from = int(cfg.pretrain_steps * DECAY_FROM)

    def lr_at(step: int) -> float:  # linear warmup, constant, linear decay to 10% (DECAY_FROM)
        if step >= decay_from:
            return 1.0 - 0.9 * (step - decay_from) / max(1, cfg.pretrain_steps - decay_from)
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
                rows = [(half * n_lines + j) % len(read_back) for j in range(n_lines)]
                batch, labels = read_back[rows], read_back_labels[rows]
            out = model(input_ids=batch, labels=batch if step % 2 else labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if (step + 1) % COPY_EVERY == 0 or step + 1 == cfg.pretrain_steps:
                curve.append([step + 1, copy_accuracy(model, tok, unseen)])
            if (step + 1) % max(1, cfg.pretrain_steps // 5) == 0:
                log(f"pretrain: step {step + 1}/{cfg.pretrain_steps}, loss {loss:.3f}, "
                    f"unseen-word copy accuracy {curve[-1][1]:.2f}, "
                    f"{time.perf_counter() - t0:.0f} s")
    finally:
        torch.random.set_rng_state(gen_state)
    ppl = perplexity(model, eval_chunks)
    info = {"key": base_key(cfg, tok), "perplexity": ppl, "random_init_perplexity": random_ppl,
            "unseen_copy_accuracy": curve[-1][1], "unseen_copy_curve": curve,
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
    log(f"pretrain: no cached base {key}; pretraining the {cfg.base_model} base on the built-in corpus "
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
    """Record on the active MLflow run which pretrained base it used and what pretraining
    learned:

    - its held-out corpus perplexity: exp(mean next-token cross-entropy, nats) over
      `held_out_chunks` (paragraphs of the corpus's kind drawn from another random stream, so
      text pretraining never saw; every next token scored), of the base and of the same model at
      its random initialisation; not comparable with evaluate's response perplexity
      (Dolly-format records, response tokens only). Tags `base_key`, `base_corpus_perplexity`,
      `base_random_init_corpus_perplexity`; metrics `pretrain/corpus_perplexity`,
      `pretrain/random_init_corpus_perplexity`.
    - its copying of unseen words (`copy_accuracy` on `unseen_copy_lines`) as the metric
      `pretrain/unseen_copy_accuracy` at every pretraining step it was measured (the chart shows
      the step at which the copying circuit formed), and the tag `base_unseen_copy_accuracy`.

    Returns the base's info (base_info.json, whose `perplexity` and `random_init_perplexity`
    are these corpus perplexities)."""
    import mlflow
    from mlflow.entities import Metric

    info = base_info(folder)
    ppl, random_ppl = info["perplexity"], info["random_init_perplexity"]
    tags = {"base_key": info["key"], "base_corpus_perplexity": f"{ppl:.3f}",
            "base_random_init_corpus_perplexity": f"{random_ppl:.1f}"}
    if "unseen_copy_accuracy" in info:
        tags["base_unseen_copy_accuracy"] = f"{info['unseen_copy_accuracy']:.3f}"
    mlflow.set_tags(tags)
    mlflow.log_metrics({"pretrain/corpus_perplexity": ppl,
                        "pretrain/random_init_corpus_perplexity": random_ppl})
    curve = info.get("unseen_copy_curve") or []
    if curve:
        now = int(time.time() * 1000)
        run_id = mlflow.active_run().info.run_id
        mlflow.MlflowClient().log_batch(run_id, metrics=[
            Metric("pretrain/unseen_copy_accuracy", float(acc), now, int(step))
            for step, acc in curve])
    return info
