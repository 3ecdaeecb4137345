"""data_prep: read instruction records, validate them (rejections counted and listed), format them
in Dolly's training text, tokenize, apply the length policy, split, and write `prepared/`.

Nothing is dropped silently: every record read ends up either kept (train or test) or in
rejected.jsonl with its file, line/row and reason, and `read == kept + rejected` always holds.
Reading (sources, files, encodings) is `dolly.data.readers`; the per-record rules
`dolly.data.validation`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dolly import prompts
from dolly.data import builtin_tasks, readers
from dolly.config import Config, fields_where
from dolly.errors import DataError, DollyError
from dolly.data.readers import resolve_source
from dolly.data.validation import CANONICAL, REASONS, Validator, parse_columns
from dolly.digests import tokenizer_hash
from dolly.tokenizer import (EOS, build_tokenizer, control_texts, corpus_control_texts,
                             needs_training_texts)

# A token is rarely longer than this many characters; longer texts are too long untokenized.
_MAX_CHARS_PER_TOKEN = 64


@dataclass
class Prepared:
    """What prepare() produced: the output folder, the counts and the content hash."""

    out_dir: Path
    counts: dict[str, int]
    data_hash: str
    summary: dict[str, Any]
    train: pd.DataFrame = field(repr=False)
    test: pd.DataFrame = field(repr=False)


class PrepareFailed(DataError):
    """data_prep stopped after reading records; `counts` (records_read, records_kept,
    records_rejected, rejected_<reason>) and `out_dir` (rejected.jsonl, summary.json) say why."""

    def __init__(self, message: str, counts: dict[str, int], out_dir: Path):
        super().__init__(message)
        self.counts = counts
        self.out_dir = out_dir


def record_format(cfg: Config, tok):
    """The prompt format records are rendered in (dolly.prompts): the tokenizer's, or, before the
    corpus BPE is learned (`tok` None), the one it will have (Dolly's, or ChatML). Raises
    DataError (one line) for a chat template that cannot render a conversation or writes
    nothing after an answer (nothing would teach the model to stop)."""
    if tok is not None:
        try:
            fmt = prompts.get_format(cfg.prompt_format, tok)
        except prompts.TemplateError as e:
            raise DataError(f"prompt_format={cfg.prompt_format}: {e}") from None
    elif cfg.prompt_format == "chat_template":
        fmt = prompts.ChatTemplateFormat(prompts.CHATML_TEMPLATE,
                                         {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS})
    else:
        return prompts.DollyFormat()
    if fmt.name == "chat_template":
        try:
            end = fmt.end_of_turn()
        except Exception as e:  # a template that does not compile or render a plain exchange
            raise DataError("prompt_format=chat_template: the chat template cannot render a "
                            f"user turn and its answer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not end.strip():
            raise DataError("prompt_format=chat_template: the chat template writes nothing after "
                            "an answer, so no token would teach the model to stop")
    return fmt


def read_source(cfg: Config):
    """Each file's records (`readers.FileRead`) of the dataset `cfg` names."""
    source = resolve_source(cfg.dataset, cfg.dataset_split)
    return readers.read_source(
        source, lambda: builtin_tasks.generate(cfg.builtin_records, cfg.seed,
                                               conversations=cfg.prompt_format == "chat_template"),
        f"builtin(seed={cfg.seed}, n={cfg.builtin_records}"
        f"{', conversations' if cfg.prompt_format == 'chat_template' else ''})")


# --- split, tokenize, write --------------------------------------------------------------------

def split_indices(n: int, test_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into (train, test) index arrays; the same n, size and seed give
    the same cut. A fraction rounds to at least 1 and at most n - 1 test records; a count must
    leave at least one training record. Raises DataError otherwise, or for n < 2."""
    if n < 2:
        raise DataError(f"only {n} valid record(s): need at least 2 to make a train/test split")
    if test_size >= 1 and int(test_size) >= n:
        raise DataError(f"test_size={int(test_size)} asks for {int(test_size)} held-out records "
                        f"but there are only {n} valid records: set a count below {n} or a "
                        f"fraction, e.g. -P test_size=0.1")
    n_test = int(test_size) if test_size >= 1 else int(round(n * float(test_size)))
    n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def tokenize(tok, texts: list[str], max_length: int, policy: str,
             spans: list[list[tuple[int, int]]] | None = None, fmt=None):
    """Token ids, loss spans, response starts and flags for each text; ids is None where it is
    too long.

    `spans`: per text, the character spans that carry the loss (the format's render: Dolly's
    response and `### End`, or every assistant turn and its end of turn); default: Dolly's, from
    the response key. A token is labelled when its first character lies in a span (offsets from
    the fast tokenizer), so the mask follows the rendered text, not template markers. Returns
    (ids: list[list[int] | None], label_spans: list[list[int]] (token [start, end) pairs,
    flattened), starts: list[int] (the last span's first token: where generation starts),
    truncated: list[bool])."""
    fmt = fmt if fmt is not None else prompts.DollyFormat(tok)
    tail_text = prompts.END_SUFFIX if fmt.name == "dolly" else fmt.end_of_turn()
    tail = tok(tail_text, add_special_tokens=False)["input_ids"]
    char_cap = max_length * _MAX_CHARS_PER_TOKEN
    # Texts far beyond the cap cannot fit; clip before tokenizing so one huge record costs little.
    clipped = [t if len(t) <= char_cap else t[:char_cap] for t in texts]
    if spans is None:  # Dolly's: everything after the response key
        spans = [[(t.find(prompts.RESPONSE_KEY_NL) + len(prompts.RESPONSE_KEY_NL), len(t))]
                 if prompts.RESPONSE_KEY_NL in t else [] for t in texts]
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no Python-side BatchEncoding
        encoded = [(e.ids, e.offsets) for e in backend.encode_batch(clipped, add_special_tokens=False)]
    else:
        enc = tok(clipped, add_special_tokens=False, return_offsets_mapping=True)
        encoded = list(zip(enc["input_ids"], enc["offset_mapping"]))
    ids_out, labels_out, starts, truncated = [], [], [], []
    for text, (ids, offsets), char_spans in zip(texts, encoded, spans):
        token_spans = _token_spans(offsets, char_spans)
        # every answer must be there: one cut off by the character clip means a prompt too long
        whole = len(token_spans) == len(char_spans)
        start = (token_spans[-1][0] if whole and token_spans and token_spans[-1][0] < len(ids)
                 else None)
        fits = len(text) <= char_cap and len(ids) <= max_length
        if start is not None and fits:
            ids_out.append(list(ids)), starts.append(start), truncated.append(False)
            labels_out.append([t for span in token_spans for t in span])
        elif policy == "truncate" and start is not None and start + len(tail) < max_length:
            # keep the prompt and earlier turns, shorten the last answer, end with its end marker
            cut = max_length - len(tail)
            kept = [(a, min(b, cut)) for a, b in token_spans if a < cut]
            kept[-1] = (kept[-1][0], max_length)
            ids_out.append(list(ids[:cut]) + tail)
            starts.append(start), truncated.append(True)
            labels_out.append([t for span in kept for t in span])
        else:
            ids_out.append(None), labels_out.append(None), starts.append(None), truncated.append(False)
    return ids_out, labels_out, starts, truncated


def _token_spans(offsets, char_spans) -> list[tuple[int, int]]:
    """Token [start, end) ranges whose tokens' first characters lie in each character span.
    `offsets`: per token (first char, end char); tokens of an empty width (none here) count by
    their first character too."""
    out = []
    i, n = 0, len(offsets)
    for a, b in char_spans:
        while i < n and offsets[i][0] < a:
            i += 1
        j = i
        while j < n and offsets[j][0] < b:
            j += 1
        if j > i:
            out.append((i, j))
        i = j
    return out


_COLUMNS = ("instruction", "input", "response", "category", "source", "where", "text",
            "messages")


def _frame(records: list[dict], ids, labels, starts, truncated) -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series([r[c] for r in records], dtype=object)
                       for c in _COLUMNS if c != "messages"})
    # a conversation as its JSON text ("" for an instruction record)
    df["messages"] = pd.Series([json.dumps(r["messages"], ensure_ascii=False) if r["messages"]
                                else "" for r in records], dtype=object)
    df["input_ids"] = pd.Series(ids, dtype=object)
    df["label_spans"] = pd.Series(labels, dtype=object)
    df["length"] = np.array([len(i) for i in ids], dtype=np.int32)
    df["response_start"] = np.array(starts, dtype=np.int32)
    df["truncated"] = np.array(truncated, dtype=bool)
    return df


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    # An explicit schema: token ids as int32 lists (half of int64, what the collator reads),
    # and the same types when a split is empty.
    columns = {c: pa.array(df[c].tolist(), type=pa.string()) for c in _COLUMNS}
    columns["input_ids"] = pa.array(df["input_ids"].tolist(), type=pa.list_(pa.int32()))
    columns["label_spans"] = pa.array(df["label_spans"].tolist(), type=pa.list_(pa.int32()))
    columns["length"] = pa.array(df["length"].to_numpy(), type=pa.int32())
    columns["response_start"] = pa.array(df["response_start"].to_numpy(), type=pa.int32())
    columns["truncated"] = pa.array(df["truncated"].to_numpy(), type=pa.bool_())
    pq.write_table(pa.table(columns), path)


def _percentiles(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "p50": float(qs[0]),
            "p90": float(qs[1]), "p95": float(qs[2]), "p99": float(qs[3]), "max": int(lengths.max())}


def _histogram(lengths: np.ndarray, max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=50, color="#3b6ea5")
    ax.axvline(max_length, color="#c0392b", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per record (prompt + response + ### End)")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


DATA_FIELDS = fields_where(step="data_prep")  # the fields data_prep reads, declared on Config


def content_hash(train: pd.DataFrame, test: pd.DataFrame, tok, cfg: Config) -> str:
    """sha256 over the prepared records, the token ids, the tokenizer, the format and the config."""
    h = hashlib.sha256()
    for name, df in (("train", train), ("test", test)):
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(df[["text"]], index=False).values.tobytes())
        h.update(np.concatenate([np.asarray(i, dtype=np.int32) for i in df["input_ids"]]
                                if len(df) else [np.zeros(0, np.int32)]).tobytes())
    h.update(tokenizer_hash(tok).encode())
    h.update(prompts.format_record("{i}", "{n}", "{r}").encode())
    h.update(prompts.format_record("{i}", None, "{r}").encode())
    fmt = prompts.get_format(cfg.prompt_format, tok)
    h.update(fmt.name.encode() + getattr(fmt, "template", "").encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in DATA_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()


def _prompt_differs(tok, fmt, kept: list[dict], ids, starts) -> set[int]:
    """Indices of records whose training ids up to the last answer differ from the ids the
    served model gets for the same conversation (the format's prompt tokenized alone): with a
    chat template a tokenizer may merge characters across the answer's start. Dolly's prompt
    ends with its response-key token, so its records always agree (not checked)."""
    if fmt.name == "dolly":
        return set()
    todo = [i for i, x in enumerate(ids) if x is not None]
    prompts_ = [fmt.prompt(messages=(kept[i]["messages"] or prompts.instruction_messages(
        kept[i]["instruction"], kept[i]["input"], kept[i]["response"]))[:-1]) for i in todo]
    encoded = tok(prompts_, add_special_tokens=False)["input_ids"] if todo else []
    return {i for i, p in zip(todo, encoded) if list(ids[i][:starts[i]]) != list(p)}


def _counts(read: int, rejected: list[dict]) -> dict[str, int]:
    reasons = Counter(r["reason"] for r in rejected)
    counts = {"records_read": read, "records_kept": read - len(rejected),
              "records_rejected": len(rejected)}
    counts.update({f"rejected_{k}": reasons.get(k, 0) for k in REASONS})
    return counts


def _strict_json(value):
    """`value` with every non-finite float (NaN, Infinity) as the text JSON readers know it by
    ("NaN", "Infinity", "-Infinity"): json.dumps would write bare NaN/Infinity, which is not
    JSON, and a strict reader (jq, Spark, JavaScript) refuses the whole file."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _json_default(value):
    """JSON for the values a columnar file holds beyond JSON's own: dates and times as ISO 8601
    text, a Decimal as the number it is, bytes as their UTF-8 text (invalid bytes as \\xNN)."""
    import datetime
    import decimal

    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _write_rejected(rejected: list[dict], path: Path) -> None:
    """One JSON object a line: source, where, reason, record (the value as it was read: JSON
    values as JSON, a text that did not parse as its text), and detail where the reason needs
    one (a CSV quote fault)."""
    with path.open("w", encoding="utf-8") as fh:
        for r in rejected:
            r = _strict_json(r)
            line = json.dumps(r, ensure_ascii=False, default=_json_default, allow_nan=False)
            if not line.isascii() and readers.has_surrogates(line):  # a "\ud800" escape kept
                line = json.dumps(r, default=_json_default, allow_nan=False)
            fh.write(line + "\n")


def prepare(cfg: Config, out_dir: str | Path, progress: bool = True) -> Prepared:
    """Run the whole data_prep step into `out_dir` (the future `prepared/` artifact folder).

    Raises DataError for an unusable dataset, and PrepareFailed (a DataError carrying the counts,
    with rejected.jsonl and summary.json written) when it stops after records were read."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A tokenizer that is not learned from the data is built first: its control texts decide
    # which records are rejected as reserved_marker.
    tok = None if needs_training_texts(cfg) else build_tokenizer(cfg)
    check = Validator(parse_columns(cfg.columns),
                      corpus_control_texts(cfg.prompt_format) if tok is None else control_texts(tok),
                      record_format(cfg, tok))
    read, files = 0, []
    try:
        for part in read_source(cfg):
            check.check_columns(part.name, part.records)
            read += len(part.records)
            check.add(part.records)
            files.append({"name": part.name, "format": part.format, "encoding": part.encoding,
                          "invalid_bytes": part.invalid_bytes, "records": len(part.records)})
            if progress:
                how = ", ".join(filter(None, (part.format, part.encoding, part.invalid_bytes
                                              and "holds bytes that are not UTF-8")))
                print(f"data_prep: {part.name}: {len(part.records)} records read ({how})", flush=True)
        result = _finish(cfg, tok, check, read, files, out, progress, t0)
    except DollyError as e:
        if read == 0:
            raise
        counts = _counts(read, check.rejected)
        _write_rejected(check.rejected, out / "rejected.jsonl")
        (out / "summary.json").write_text(json.dumps(
            {"counts": counts, "files": files, "error": str(e)}, indent=2, ensure_ascii=False))
        hint = (f" ({counts['records_rejected']} rejected: see prepared/rejected.jsonl)"
                if counts["records_rejected"] and "rejected.jsonl" not in str(e) else "")
        raise PrepareFailed(f"{e}{hint}", counts, out) from None
    return result


def _finish(cfg: Config, tok, check: Validator, read: int, files: list[dict], out: Path,
            progress: bool, t0: float) -> Prepared:
    kept, rejected = check.kept, check.rejected
    texts = [r["text"] for r in kept]
    train_idx, test_idx = split_indices(len(kept), cfg.test_count_or_fraction, cfg.seed)
    if tok is None:  # the corpus tokenizer learns from training texts only: held-out words stay unseen
        tok = build_tokenizer(cfg, (texts[i] for i in train_idx))
    if progress:
        print(f"data_prep: tokenizing {len(texts)} records", flush=True)
    fmt = prompts.get_format(cfg.prompt_format, tok)
    ids, labels, starts, truncated = tokenize(tok, texts, cfg.max_length, cfg.too_long,
                                              [r["spans"] for r in kept], fmt)
    differs = _prompt_differs(tok, fmt, kept, ids, starts)

    parts = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        keep = [int(i) for i in idx if ids[i] is not None and i not in differs]
        for i in idx:
            if ids[i] is None or i in differs:
                r = kept[i]
                rejected.append({"source": r["source"], "where": r["where"],
                                 "reason": "too_long" if ids[i] is None else "prompt_tokens_differ",
                                 "record": {"messages": r["messages"]} if r["messages"]
                                 else {k: r[k] for k in CANONICAL}})
        parts[split] = _frame([kept[i] for i in keep], [ids[i] for i in keep],
                              [labels[i] for i in keep], [starts[i] for i in keep],
                              [truncated[i] for i in keep])
    train, test = parts["train"], parts["test"]
    if len(train) == 0:
        raise DataError(f"{cfg.dataset}: no training records left after validation "
                        f"({len(rejected)} rejected; see prepared/rejected.jsonl)")

    counts = _counts(read, rejected)
    counts.update({"records_train": len(train), "records_test": len(test),
                   "records_truncated": int(train["truncated"].sum() + test["truncated"].sum())})
    assert counts["records_kept"] == len(train) + len(test), counts

    _write_parquet(train, out / "train.parquet")
    _write_parquet(test, out / "test.parquet")
    _write_rejected(rejected, out / "rejected.jsonl")
    tok.save_pretrained(out / "tokenizer")
    cfg.save(out / "config.yaml")
    lengths = np.concatenate([train["length"].to_numpy(), test["length"].to_numpy()])
    _histogram(lengths, cfg.max_length, out / "lengths.png")
    data_hash = content_hash(train, test, tok, cfg)
    summary = {"counts": counts, "token_lengths": _percentiles(lengths),
               "tokens_train": int(train["length"].sum()), "vocab_size": len(tok),
               "data_hash": data_hash, "dataset": cfg.dataset, "files": files,
               "layouts": dict(sorted(check.layouts.items())), "prompt_format": fmt.name,
               "seconds": round(time.perf_counter() - t0, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return Prepared(out, counts, data_hash, summary, train, test)


def load_prepared(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train, test, summary) from a prepared/ folder written by prepare()."""
    folder = Path(folder)
    for name in ("train.parquet", "test.parquet", "summary.json"):
        if not (folder / name).is_file():
            raise DataError(f"{folder}: not a prepared/ folder (missing {name})")
    return (pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet"),
            json.loads((folder / "summary.json").read_text()))
