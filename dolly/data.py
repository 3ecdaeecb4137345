"""data_prep: read instruction records, validate them (rejections counted and listed), format them
in Dolly's training text, tokenize, apply the length policy, split, and write `prepared/`.

Nothing is dropped silently: every record read ends up either kept (train or test) or in
rejected.jsonl with its file, line/row and reason, and `read == kept + rejected` always holds.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dolly import builtin_tasks, prompts
from dolly.config import Config, fields_where
from dolly.errors import DataError
from dolly.tokenizer import build_tokenizer, special_ids

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CANONICAL = ("instruction", "input", "response")
# Auto-detected layouts: canonical field -> accepted column names, in order of preference.
LAYOUT = {
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "response": ("output", "response"),
    "category": ("category",),
}
# A token is rarely longer than this many characters; longer texts are too long untokenized.
_MAX_CHARS_PER_TOKEN = 64

REASONS = ("malformed_json", "not_an_object", "missing_instruction", "missing_response",
           "non_string_field", "blank_instruction", "blank_response", "reserved_marker",
           "duplicate", "too_long")


@dataclass
class Raw:
    """One record as read, before validation: where it came from and its value (or why not)."""

    source: str
    locator: str  # "line 12", "row 3" or "item 7": what a user needs to find it
    value: Any = None
    error: str | None = None  # a reason already known at read time (malformed_json)
    raw_text: str | None = None


@dataclass
class Prepared:
    """What prepare() produced: the output folder, the counts and the content hash."""

    out_dir: Path
    counts: dict[str, int]
    data_hash: str
    summary: dict[str, Any]
    train: pd.DataFrame = field(repr=False)
    test: pd.DataFrame = field(repr=False)


# --- reading -----------------------------------------------------------------------------------

def _read_jsonl(path: Path, name: str) -> Iterator[Raw]:
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield Raw(name, f"line {n}", json.loads(line))
            except json.JSONDecodeError:
                yield Raw(name, f"line {n}", error="malformed_json", raw_text=line.rstrip("\n"))


def _read_json(path: Path, name: str) -> Iterator[Raw]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        if first.lstrip().startswith("{") and not text.lstrip().startswith("["):
            yield from _read_jsonl(path, name)  # a .json file holding JSON lines
            return
        raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]} wrappers are common; a lone record is one record.
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records, found {type(data).__name__}")
    for n, item in enumerate(data, start=1):
        yield Raw(name, f"item {n}", item)


def _rows(df: pd.DataFrame, name: str) -> Iterator[Raw]:
    # NaN/None become None (a missing value), so a null input means "no input".
    columns = list(df.columns)
    for n, values in enumerate(df.itertuples(index=False, name=None), start=1):
        rec = {}
        for c, v in zip(columns, values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                v = None
            elif isinstance(v, np.generic):
                v = v.item()
            rec[c] = v
        if all(v is None or (isinstance(v, str) and not v.strip()) for v in rec.values()):
            continue  # a blank row is not a record
        yield Raw(name, f"row {n}", rec)


def _read_csv(path: Path, name: str) -> Iterator[Raw]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], quoting=csv.QUOTE_MINIMAL)
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: not a readable CSV ({str(e).splitlines()[0]})") from None
    yield from _rows(df, name)


def _read_parquet(path: Path, name: str) -> Iterator[Raw]:
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    yield from _rows(df, name)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
    return [path]


def read_local(path: str | Path) -> Iterator[tuple[str, list[Raw]]]:
    """(file name, its raw records) for a file or every data file under a folder."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{path}: no such file or folder")
    for f in _files(root):
        name = str(f)
        try:
            if f.stat().st_size == 0:
                raise DataError(f"{name}: file is empty")
            raws = list(_READERS[f.suffix.lower()](f, name))
        except PermissionError:
            raise DataError(f"{name}: permission denied") from None
        except IsADirectoryError:
            raise DataError(f"{name}: is a folder, not a file") from None
        if not raws:
            raise DataError(f"{name}: holds no records")
        yield name, raws


def read_hub(dataset_id: str, split: str) -> Iterator[tuple[str, list[Raw]]]:
    """Records of a Hugging Face dataset (a Hub id, or a local folder laid out like a Hub repo)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, bad split: all surface as one line
        raise DataError(f"{dataset_id}: cannot load Hugging Face dataset ({str(e).splitlines()[0]})") from None
    name = f"hf:{dataset_id}[{split}]"
    yield name, list(_rows(ds.to_pandas(), name))


def read_builtin(cfg: Config) -> Iterator[tuple[str, list[Raw]]]:
    name = f"builtin(seed={cfg.seed}, n={cfg.builtin_records})"
    yield name, [Raw(name, f"item {i}", r)
                 for i, r in enumerate(builtin_tasks.generate(cfg.builtin_records, cfg.seed), 1)]


def read_source(cfg: Config) -> Iterator[tuple[str, list[Raw]]]:
    """Dispatch on `dataset`: 'builtin', 'hf:<id or folder>', an existing path, else a Hub id."""
    ds = cfg.dataset.strip()
    if ds == "builtin":
        return read_builtin(cfg)
    if ds.startswith("hf:"):
        return read_hub(ds[3:], cfg.dataset_split)
    if Path(ds).exists() or Path(ds).suffix.lower() in SUFFIXES or ds.startswith((".", "/")):
        return read_local(ds)
    return read_hub(ds, cfg.dataset_split)


# --- validation --------------------------------------------------------------------------------

def parse_columns(spec: str) -> dict[str, str]:
    """'instruction=q,response=a' -> {'instruction': 'q', 'response': 'a'}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or key not in (*CANONICAL, "category") or not col:
            raise DataError(
                f"columns: bad entry '{part}' (expected field=column with field one of "
                f"instruction, input, response, category)")
        mapping[key] = col
    return mapping


def detect_columns(name: str, raws: list[Raw], explicit: dict[str, str]) -> dict[str, str]:
    """Canonical field -> column of this file, from the explicit mapping or the known layouts."""
    seen: dict[str, None] = {}
    for r in raws:
        if isinstance(r.value, dict):
            seen.update(dict.fromkeys(r.value))
    mapping = {}
    for fld, candidates in LAYOUT.items():
        if fld in explicit:
            mapping[fld] = explicit[fld]
            continue
        found = next((c for c in candidates if c in seen), None)
        if found:
            mapping[fld] = found
    missing = [f for f in ("instruction", "response")
               if f not in mapping or mapping[f] not in seen]
    if missing and seen:
        need = " and ".join(
            f"{f} ({explicit[f] if f in explicit else '/'.join(LAYOUT[f])})" for f in missing)
        raise DataError(f"{name}: none of the needed columns: {need}; found {', '.join(map(str, seen))}")
    return mapping


def _norm(s: str) -> str:
    return " ".join(s.split())


def validate(raws: list[Raw], mapping: dict[str, str], seen_keys: set,
             rejected: list[dict], kept: list[dict]) -> None:
    """Sort raw records into `kept` (canonical dicts) and `rejected` (with reasons)."""
    markers = prompts.SPECIAL_TOKENS
    icol, rcol = mapping.get("instruction"), mapping.get("response")
    ncol, ccol = mapping.get("input"), mapping.get("category")

    def reject(r: Raw, reason: str) -> None:
        rejected.append({"source": r.source, "where": r.locator, "reason": reason,
                         "record": r.value if r.raw_text is None else r.raw_text})

    for r in raws:
        if r.error:
            reject(r, r.error)
            continue
        v = r.value
        if not isinstance(v, dict):
            reject(r, "not_an_object")
            continue
        ins, resp, inp = v.get(icol), v.get(rcol), v.get(ncol) if ncol else None
        if ins is None:
            reject(r, "missing_instruction")
        elif resp is None:
            reject(r, "missing_response")
        elif not isinstance(ins, str) or not isinstance(resp, str) or not (
                inp is None or isinstance(inp, str)):
            reject(r, "non_string_field")
        elif not ins.strip():
            reject(r, "blank_instruction")
        elif not resp.strip():
            reject(r, "blank_response")
        elif any(m in s for s in (ins, resp, inp or "") for m in markers):
            reject(r, "reserved_marker")  # would break masking or stop generation early
        else:
            key = (_norm(ins), _norm(inp or ""), _norm(resp))
            if key in seen_keys:
                reject(r, "duplicate")
                continue
            seen_keys.add(key)
            cat = v.get(ccol) if ccol else None
            kept.append({"instruction": ins, "input": inp or "", "response": resp,
                         "category": cat if isinstance(cat, str) else "",
                         "source": r.source, "where": r.locator})


# --- split, tokenize, write --------------------------------------------------------------------

def split_indices(n: int, test_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into (train, test); the same n, size and seed give the same cut."""
    if n < 2:
        raise DataError(f"only {n} valid record(s): need at least 2 to make a train/test split")
    n_test = int(test_size) if test_size >= 1 else int(round(n * float(test_size)))
    n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def tokenize(tok, texts: list[str], max_length: int, policy: str):
    """Token ids, response starts and flags for each text; ids is None where it is too long."""
    resp_id, _ = special_ids(tok)
    tail = tok(prompts.END_SUFFIX, add_special_tokens=False)["input_ids"]
    char_cap = max_length * _MAX_CHARS_PER_TOKEN
    # Texts far beyond the cap cannot fit; clip before tokenizing so one huge record costs little.
    clipped = [t if len(t) <= char_cap else t[:char_cap] for t in texts]
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: no Python-side BatchEncoding
        encoded = [e.ids for e in backend.encode_batch(clipped, add_special_tokens=False)]
    else:
        encoded = tok(clipped, add_special_tokens=False)["input_ids"]
    ids_out, starts, truncated = [], [], []
    for text, ids in zip(texts, encoded):
        try:
            start = ids.index(resp_id) + 1
        except ValueError:  # the response key was cut off by char clipping: prompt alone too long
            start = None
        fits = len(text) <= char_cap and len(ids) <= max_length
        if start is not None and fits:
            ids_out.append(ids), starts.append(start), truncated.append(False)
        elif policy == "truncate" and start is not None and start + len(tail) < max_length:
            # keep prompt + response key, shorten the response, end with "\n\n### End"
            ids_out.append(ids[: max_length - len(tail)] + tail)
            starts.append(start), truncated.append(True)
        else:
            ids_out.append(None), starts.append(None), truncated.append(False)
    return ids_out, starts, truncated


_COLUMNS = ("instruction", "input", "response", "category", "source", "where", "text")


def _frame(records: list[dict], ids, starts, truncated) -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series([r[c] for r in records], dtype=object) for c in _COLUMNS})
    df["input_ids"] = pd.Series(ids, dtype=object)
    df["length"] = np.array([len(i) for i in ids], dtype=np.int32)
    df["response_start"] = np.array(starts, dtype=np.int32)
    df["truncated"] = np.array(truncated, dtype=bool)
    return df


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    # An explicit schema: token ids as int32 lists (half of int64, what the collator reads),
    # and the same types when a split is empty.
    columns = {c: pa.array(df[c].tolist(), type=pa.string()) for c in _COLUMNS}
    columns["input_ids"] = pa.array(df["input_ids"].tolist(), type=pa.list_(pa.int32()))
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


def _hash_tokenizer(tok) -> str:
    backend = getattr(tok, "_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


DATA_FIELDS = fields_where(step="data_prep")  # the fields data_prep reads, declared on Config


def content_hash(train: pd.DataFrame, test: pd.DataFrame, tok, cfg: Config) -> str:
    """sha256 over the prepared records, the token ids, the tokenizer, the format and the config."""
    h = hashlib.sha256()
    for name, df in (("train", train), ("test", test)):
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(df[["text"]], index=False).values.tobytes())
        h.update(np.concatenate([np.asarray(i, dtype=np.int32) for i in df["input_ids"]]
                                if len(df) else [np.zeros(0, np.int32)]).tobytes())
    h.update(_hash_tokenizer(tok).encode())
    h.update(prompts.format_record("{i}", "{n}", "{r}").encode())
    h.update(prompts.format_record("{i}", None, "{r}").encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in DATA_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()


def prepare(cfg: Config, out_dir: str | Path, progress: bool = True) -> Prepared:
    """Run the whole data_prep step into `out_dir` (the future `prepared/` artifact folder)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explicit = parse_columns(cfg.columns)
    kept: list[dict] = []
    rejected: list[dict] = []
    seen: set = set()
    read = 0
    for name, raws in read_source(cfg):
        read += len(raws)
        mapping = detect_columns(name, raws, explicit)
        validate(raws, mapping, seen, rejected, kept)
        if progress:
            print(f"data_prep: {name}: {len(raws)} records read", flush=True)

    texts = [prompts.format_record(r["instruction"], r["input"], r["response"]) for r in kept]
    train_idx, test_idx = split_indices(len(kept), cfg.test_count_or_fraction, cfg.seed)
    # The corpus tokenizer learns from training texts only: held-out words stay unseen.
    tok = build_tokenizer(cfg, (texts[i] for i in train_idx))
    if progress:
        print(f"data_prep: tokenizing {len(texts)} records", flush=True)
    ids, starts, truncated = tokenize(tok, texts, cfg.max_length, cfg.too_long)

    parts = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        keep = [int(i) for i in idx if ids[i] is not None]
        for i in idx:
            if ids[i] is None:
                r = kept[i]
                rejected.append({"source": r["source"], "where": r["where"], "reason": "too_long",
                                 "record": {k: r[k] for k in ("instruction", "input", "response")}})
        recs = [dict(kept[i], text=texts[i]) for i in keep]
        parts[split] = _frame(recs, [ids[i] for i in keep], [starts[i] for i in keep],
                              [truncated[i] for i in keep])
    train, test = parts["train"], parts["test"]
    if len(train) == 0:
        raise DataError(f"{cfg.dataset}: no training records left after validation "
                        f"({len(rejected)} rejected; see rejected.jsonl)")

    reasons = Counter(r["reason"] for r in rejected)
    counts = {"records_read": read, "records_kept": len(train) + len(test),
              "records_rejected": len(rejected), "records_train": len(train),
              "records_test": len(test), "records_truncated": int(sum(train["truncated"]) + sum(test["truncated"]))}
    counts.update({f"rejected_{k}": reasons.get(k, 0) for k in REASONS})
    assert counts["records_read"] == counts["records_kept"] + counts["records_rejected"], counts

    _write_parquet(train, out / "train.parquet")
    _write_parquet(test, out / "test.parquet")
    with (out / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for r in rejected:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    tok.save_pretrained(out / "tokenizer")
    cfg.save(out / "config.yaml")
    lengths = np.concatenate([train["length"].to_numpy(), test["length"].to_numpy()])
    _histogram(lengths, cfg.max_length, out / "lengths.png")
    data_hash = content_hash(train, test, tok, cfg)
    summary = {"counts": counts, "token_lengths": _percentiles(lengths),
               "tokens_train": int(train["length"].sum()), "vocab_size": len(tok),
               "data_hash": data_hash, "dataset": cfg.dataset,
               "seconds": round(time.perf_counter() - t0, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return Prepared(out, counts, data_hash, summary, train, test)


def load_prepared(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(train, test, summary) from a prepared/ folder written by prepare()."""
    folder = Path(folder)
    for name in ("train.parquet", "test.parquet", "summary.json"):
        if not (folder / name).is_file():
            raise DataError(f"{folder}: not a prepared/ folder (missing {name})")
    return (pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet"),
            json.loads((folder / "summary.json").read_text()))
