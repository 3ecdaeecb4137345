"""Where instruction records come from, read exactly: the kind of source a dataset is, its files,
and each file's records, decided by the content rather than the file name.

One implementation for every reader of user data (data_prep, batch scoring's input, the reuse
fingerprint, dataset lineage):
- `resolve_source(dataset, split)` -> `DataSource`: builtin, Hub, local file or folder, with its
  sorted data files; `list_files(path)` is the listing alone.
- `read_file(path)` -> `FileRead`: the records of one .json/.jsonl/.csv/.parquet file.

Decoding (text files): a UTF-8, UTF-16 or UTF-32 byte order mark decides the encoding; without
one, the NUL-byte pattern of the first 4 bytes (RFC 4627, section 3) tells UTF-16/32 from UTF-8.
Invalid bytes are never replaced: in UTF-8 they are kept as lone surrogates (Python's
`surrogateescape`, PEP 383) and the line, row or item holding them becomes a record with the
error `encoding`; invalid UTF-16/32 refuses the file. JSON content: a file holding one JSON
value (an array of records, `{"data": [...]}`, or one record) is a document whatever its
extension; a file whose first value ends on its first line and is followed by more is JSON lines.
`NaN` is read as null (a missing value); `Infinity`/`-Infinity` as floats (not strings).

Line ends (JSON lines, CSV): `\n`, `\r\n` and a lone `\r`, in any mix; U+2028/U+2029/U+0085 are
text. Columnar files are read through Arrow, so every null is None and values keep their JSON
kind (`arrow_records`). CSV follows RFC 4180; a record whose quotes break it is one
`malformed_csv` record naming its physical lines, and reading goes on after it.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dolly.errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Field names of the known layouts: an object holding one of these is a record, not a wrapper.
RECORD_FIELDS = frozenset(("instruction", "input", "context", "output", "response", "category",
                           "messages", "conversations"))

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
# The line ends of JSON lines and CSV: \r\n, \r alone (classic Mac OS, some exporters) and \n, in
# any mix. Not U+2028/U+2029/U+0085 (str.splitlines would split there): inside a JSON string or
# a CSV field they are part of the text.
_LINE_END = re.compile(r"\r\n?|\n")
# NaN -> None (missing, as pandas means it); Infinity/-Infinity -> float (a non-string value).
_JSON = json.JSONDecoder(parse_constant=lambda name: None if name == "NaN" else float(name))
# A response may be long; the csv module's default cap (128 KiB a field) would refuse it.
csv.field_size_limit(2**31 - 1)


@dataclass
class Raw:
    """One record as read, before validation: where it came from and its value (or why not)."""

    source: str
    locator: str  # "line 12", "row 3" or "item 7": what a user needs to find it
    value: Any = None
    error: str | None = None  # a reason already known at read time (malformed_json, encoding)
    raw_text: str | None = None
    detail: str | None = None  # why, in one line, when the reason alone does not say it


@dataclass
class FileRead:
    """One file's records and how they were read: format json-lines / json / csv / parquet and
    the encoding found (utf-8, utf-8-sig = UTF-8 with a BOM, utf-16-le, ...; '' for binary)."""

    name: str
    records: list[Raw]
    format: str
    encoding: str
    invalid_bytes: bool = False


@dataclass(frozen=True)
class DataSource:
    """What `dataset` names. kind: 'builtin', 'hub' (a Hub id, or `hf:<folder>` read by the Hub
    loader), 'file' or 'folder'; `files`: the data files read, sorted (for a Hub folder every
    file the loader may read; empty for builtin and remote Hub ids)."""

    kind: str
    location: str  # 'builtin', the Hub id or the path, as given (without 'hf:')
    split: str
    files: tuple[Path, ...] = ()

    def fingerprint(self) -> str:
        """'builtin', 'files:<sha256 of the files' relative names and bytes>', or
        'hub:<id>[<split>]' (a remote Hub dataset is taken as immutable)."""
        if self.kind == "builtin":
            return "builtin"
        if self.kind == "hub" and not self.files:
            return f"hub:{self.location}[{self.split}]"
        root = Path(self.location)
        h = hashlib.sha256()
        for f in self.files:
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "files:" + h.hexdigest()


def _visible(path: Path, root: Path) -> bool:
    # Spark/Hadoop markers (_SUCCESS, _scored_by.json), .ipynb_checkpoints copies, dotfiles.
    return not any(part.startswith(("_", ".")) for part in path.relative_to(root).parts)


def list_files(path: str | Path) -> list[Path]:
    """A data file as is, or a folder's .json/.jsonl/.csv/.parquet files (recursively, sorted,
    without names starting with '_' or '.'). Raises DataError when there is none."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{path}: no such file or folder")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in SUFFIXES and _visible(p, root))
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        return files
    if root.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{root.suffix}' (use {', '.join(SUFFIXES)})")
    return [root]


def resolve_source(dataset: str, split: str = "train") -> DataSource:
    """Decide what `dataset` is: 'builtin'; 'hf:<id or folder>' (the Hub loader); an existing
    path, or one that looks like a path (a data suffix, or starting with '.' or '/'), is local;
    anything else is a Hub id. Raises DataError for a local path that is missing or unusable."""
    ds = dataset.strip()
    if ds == "builtin":
        return DataSource("builtin", ds, split)
    if ds.startswith("hf:"):
        loc = ds[3:]
        p = Path(loc)
        files = tuple(sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts))) if p.is_dir() else ()
        return DataSource("hub", loc, split, files)
    p = Path(ds)
    if p.exists() or p.suffix.lower() in SUFFIXES or ds.startswith((".", "/")):
        return DataSource("folder" if p.is_dir() else "file", ds, split, tuple(list_files(p)))
    return DataSource("hub", ds, split)


# --- decoding ----------------------------------------------------------------------------------

def _encoding(head: bytes) -> tuple[str, int]:
    """(codec, BOM length) from a file's first bytes."""
    for bom, enc in _BOMS:
        if head.startswith(bom):
            return enc, len(bom)
    if len(head) >= 4 and 0 in head[:4]:  # RFC 4627 s.3: where the NULs of '{"' / '[{' fall
        nul = tuple(b == 0 for b in head[:4])
        enc = {(True, True, True, False): "utf-32-be", (False, True, True, True): "utf-32-le",
               (True, False, True, False): "utf-16-be", (False, True, False, True): "utf-16-le"}
        if nul in enc:
            return enc[nul], 0
    return "utf-8", 0


def decode(blob: bytes, name: str) -> tuple[str, str, bool]:
    """(text, encoding, had invalid bytes). Invalid UTF-8 bytes stay visible as lone surrogates
    U+DC80..U+DCFF (never U+FFFD); invalid UTF-16/32 raises DataError naming the byte offset."""
    enc, skip = _encoding(blob[:4])
    codec = "utf-8" if enc == "utf-8-sig" else enc
    try:
        return blob[skip:].decode(codec), enc, False
    except UnicodeDecodeError as e:
        if codec != "utf-8":
            raise DataError(f"{name}: not valid {enc.upper()} (at byte {e.start + skip})") from None
        return blob[skip:].decode(codec, "surrogateescape"), enc, True


def has_surrogates(value: Any) -> bool:
    """True when a string anywhere in `value` (keys too) holds a lone surrogate: an invalid byte
    kept by `decode`, or a JSON escape such as "\\ud800" that is no text."""
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_surrogates(k) or has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogates(v) for v in value)
    return False


def _escape(m: re.Match) -> str:
    o = ord(m.group())
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def show(text: str) -> str:
    """`text` printable and encodable: invalid bytes as \\xNN, other lone surrogates \\udNNN."""
    return _SURROGATE.sub(_escape, text) if has_surrogates(text) else text


# --- JSON and JSON lines -----------------------------------------------------------------------

def _document(value: Any, name: str) -> list[Raw]:
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        # {"data": [...]} / {"train": [...]} wrappers; an object with record fields is a record.
        if (len(lists) == 1 and not RECORD_FIELDS.intersection(value)
                and all(isinstance(item, dict) for item in lists[0])):
            value = lists[0]
        else:
            return [Raw(name, "item 1", value)]
    if not isinstance(value, list):
        raise DataError(f"{name}: expected JSON records (objects), found a JSON {type(value).__name__}")
    return [Raw(name, f"item {n}", item) for n, item in enumerate(value, start=1)]


# What json raises for text it cannot read: malformed JSON, and also valid JSON that Python
# refuses (an integer of more than 4300 digits: ValueError; deep nesting: RecursionError).
_UNREADABLE = (ValueError, RecursionError)


def _lines(text: str, name: str, invalid_bytes: bool) -> list[Raw]:
    out = []
    decode_json = _JSON.decode
    for n, line in enumerate(_LINE_END.split(text), start=1):
        if not line or line.isspace():
            continue
        if invalid_bytes and _SURROGATE.search(line):
            out.append(Raw(name, f"line {n}", error="encoding", raw_text=show(line)))
            continue
        try:
            out.append(Raw(name, f"line {n}", decode_json(line)))
        except _UNREADABLE:
            try:  # files joined with `cat` keep each one's BOM at the start of a line
                if not line.startswith("\ufeff"):
                    raise
                out.append(Raw(name, f"line {n}", decode_json(line[1:])))
            except _UNREADABLE:
                out.append(Raw(name, f"line {n}", error="malformed_json", raw_text=line))
    return out


def _record_line_follows(text: str, pos: int) -> bool:
    """Whether the next non-blank line after `pos` is a JSON object on its own."""
    for line in _LINE_END.split(text[pos:pos + (1 << 20)])[1:]:
        if line and not line.isspace():
            try:
                return isinstance(_JSON.decode(line), dict)
            except _UNREADABLE:
                return False
    return False


def _position(text: str, pos: int) -> tuple[int, int]:
    """(line, column), both from 1, of offset `pos`, counting every line end `_LINE_END` knows
    (json's own lineno counts only \\n)."""
    ends = list(_LINE_END.finditer(text, 0, pos))
    return len(ends) + 1, pos - (ends[-1].end() if ends else 0) + 1


def read_json_text(text: str, name: str, invalid_bytes: bool = False) -> tuple[list[Raw], str]:
    """(records, 'json' or 'json-lines') of decoded JSON text, decided by the content."""
    start = _JSON_WS.match(text).end()
    if start == len(text):
        return [], "json"
    newline = _LINE_END.search(text, start)
    first_line_end = newline.start() if newline else len(text)
    try:
        value, end = _JSON.raw_decode(text, start)
    except _UNREADABLE as e:
        if not isinstance(e, json.JSONDecodeError):  # a 5000-digit number, nesting too deep
            if text[start] == "[":
                raise DataError(f"{name}: not readable JSON ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120]})") from None
            return _lines(text, name, invalid_bytes), "json-lines"
        broken_document = text[start] == "[" or (
            e.pos > first_line_end and not _record_line_follows(text, first_line_end))
        if broken_document:  # not JSON lines whose first line is broken
            line, column = _position(text, e.pos)
            raise DataError(f"{name}: not valid JSON ({e.msg} at line {line} column "
                            f"{column}){_ENCODING_HINT if invalid_bytes else ''}") from None
        return _lines(text, name, invalid_bytes), "json-lines"
    if _JSON_WS.match(text, end).end() == len(text):
        records = _document(value, name)
        if invalid_bytes:
            records = [Raw(r.source, r.locator, error="encoding", raw_text=show(json.dumps(
                r.value, ensure_ascii=False))) if has_surrogates(r.value) else r for r in records]
        return records, "json"
    if end <= first_line_end:
        return _lines(text, name, invalid_bytes), "json-lines"
    raise DataError(f"{name}: holds several JSON values spanning lines; expected one JSON array "
                    "of records or JSON lines (one record per line)")


_ENCODING_HINT = "; the file also holds bytes that are not UTF-8: save it as UTF-8"


# --- CSV and Parquet ---------------------------------------------------------------------------

def _quote_opened(lines: list[str]) -> int:
    """Index in `lines` of the line where a double quote is left open (the running count of '"'
    turns odd and stays odd), or 0."""
    count, opened = 0, 0
    for i, line in enumerate(lines):
        before = count
        count += line.count('"')
        if count % 2 and not before % 2:
            opened = i
    return opened if count % 2 else 0


def _quote_fault(lines: list[str], first: int, last: int, error: csv.Error) -> str:
    """Why physical lines first..last (from 1) are no CSV record: the one-line detail of a
    `malformed_csv` rejection."""
    span = lines[first - 1:last]
    at = _quote_opened(span)
    if "end of data" in str(error) or (at and last == len(lines)):
        opened = first + at
        if opened == last:
            return f"unclosed quote on line {last}, the last line"
        return (f"unclosed quote from line {opened}: lines {opened}-{last}, to the end of the "
                "file, read as one field")
    return (f"line {last}: a closing quote is followed by text instead of ',' or the line end "
            f"(a quote inside a quoted field is written \"\")")


def read_csv_text(text: str, name: str, invalid_bytes: bool = False) -> list[Raw]:
    """Records of decoded CSV text (RFC 4180, header row first); every cell is text, an absent
    cell None. A record is located by its physical lines ("line 3", or "lines 3-6" when a quoted
    field holds line ends; the header is line 1). A record whose quotes break the CSV rules (a
    quote never closed, text after a closing quote) is rejected as `malformed_csv`, with the lines
    it spans and why; reading goes on after it."""
    lines = list(io.StringIO(text, newline=""))  # split at \r\n, \r and \n, ends kept
    rows = csv.reader(lines, strict=True)
    try:
        header = next(rows)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{name}: not a readable CSV (line {rows.line_num}: {e})") from None
    if len(set(header)) < len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"{name}: the header names column '{show(dup)}' twice")
    if invalid_bytes and has_surrogates(header):
        raise DataError(f"{name}: the header row holds bytes that are not UTF-8; save it as UTF-8")
    out, width = [], len(header)
    while True:
        first = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            last = max(rows.line_num, first)
            raw = "".join(lines[first - 1:last]).rstrip("\r\n")
            where = f"line {first}" if last == first else f"lines {first}-{last}"
            out.append(Raw(name, where, error="malformed_csv", raw_text=show(raw),
                           detail=_quote_fault(lines, first, last, e)))
            continue
        if not row:
            continue  # a blank line is not a record
        last = rows.line_num
        where = f"line {first}" if last == first else f"lines {first}-{last}"
        if len(row) > width:
            raise DataError(f"{name}: {where} has {len(row)} fields, the header {width}")
        if invalid_bytes and has_surrogates(row):
            out.append(Raw(name, where, error="encoding", raw_text=show(",".join(row))))
            continue
        rec = dict(zip(header, row))
        if len(row) < width:
            rec.update(dict.fromkeys(header[len(row):]))
        if all(v is None or not v or v.isspace() for v in rec.values()):
            continue
        out.append(Raw(name, where, rec))
    return out


def is_missing(value: Any) -> bool:
    """Whether a cell handed over by a columnar file, pandas or Arrow is a missing value: None,
    a float NaN (Python's or numpy's), pandas' NA and NaT, numpy's NaT, a Decimal NaN."""
    if value is None:
        return True
    if isinstance(value, (str, bytes, list, tuple, dict, bool, int)):
        return False
    try:
        import pandas as pd

        return bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


def plain(value: Any) -> Any:
    """`value` as the JSON value it holds: numpy scalars and arrays, pandas' missing values and
    Arrow's nested values (lists, structs, maps) become Python's None, int, float, str, list and
    dict, so that a rejected record is written as it was (`["a", "b"]`, not numpy's printout)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {str(k): plain(v) for k, v in value}  # an Arrow map: (key, value) pairs
        return [plain(v) for v in value]
    if is_missing(value):
        return None
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if tolist is not None and type(value).__module__.startswith("numpy"):
        return plain(tolist())
    return value


def _row(name: str, n: int, rec: dict) -> Raw | None:
    """The record of a columnar row (`rec`: column -> cell), None for a row with nothing in it."""
    rec = {str(c): plain(v) for c, v in rec.items()}
    if all(v is None or (isinstance(v, str) and not v.strip()) for v in rec.values()):
        return None  # a blank row is not a record
    return Raw(name, f"row {n}", rec)


def arrow_records(table, name: str) -> list[Raw]:
    """Records of an Arrow table (Parquet, the Hub), read as Arrow holds them: a null is None
    (also in a pandas `string` or nullable integer column, which pandas reads back as pd.NA),
    integers stay integers, lists and structs stay lists and objects. The pandas index that
    pandas.to_parquet stores as a column (`__index_level_0__`) is not a field."""
    meta = table.schema.pandas_metadata or {}
    index = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    if index:
        table = table.drop_columns([c for c in index if c in table.column_names])
    out, n = [], 0
    for batch in table.to_batches(max_chunksize=65536):
        for rec in batch.to_pylist():
            n += 1
            r = _row(name, n, rec)
            if r is not None:
                out.append(r)
    return out


def _parquet(path: Path, name: str) -> list[Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return arrow_records(table, name)


# --- files and sources -------------------------------------------------------------------------

def read_file(path: str | Path, name: str | None = None) -> FileRead:
    """The records of one data file. Raises DataError (one line naming the file) when it is
    empty, unreadable, holds no records or is not what its content claims to be."""
    path = Path(path)
    name = name or str(path)
    try:
        if path.suffix.lower() == ".parquet":
            if path.stat().st_size == 0:
                raise DataError(f"{name}: file is empty")
            read = FileRead(name, _parquet(path, name), "parquet", "")
        else:
            blob = path.read_bytes()
            if not blob:
                raise DataError(f"{name}: file is empty")
            text, enc, bad = decode(blob, name)
            if path.suffix.lower() == ".csv":
                read = FileRead(name, read_csv_text(text, name, bad), "csv", enc, bad)
            else:
                records, fmt = read_json_text(text, name, bad)
                read = FileRead(name, records, fmt, enc, bad)
    except PermissionError:
        raise DataError(f"{name}: permission denied") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not a file") from None
    if not read.records:
        raise DataError(f"{name}: holds no records")
    return read


def read_hub(dataset_id: str, split: str) -> FileRead:
    """Records of a Hugging Face dataset (a Hub id, or a local folder laid out like a Hub repo)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, bad split: all surface as one line
        raise DataError(f"{dataset_id}: cannot load Hugging Face dataset ({str(e).splitlines()[0]})") from None
    name = f"hf:{dataset_id}[{split}]"
    return FileRead(name, arrow_records(ds.with_format("arrow")[:], name), "hub", "")


def read_source(source: DataSource, builtin: Callable[[], Iterable[dict]] | None = None,
                builtin_name: str = "builtin") -> Iterator[FileRead]:
    """Each file's records, in `source.files` order (one FileRead for the Hub and builtin;
    `builtin()` generates the builtin records)."""
    if source.kind == "builtin":
        if builtin is None:
            raise DataError("the builtin dataset needs its generator")
        yield FileRead(builtin_name, [Raw(builtin_name, f"item {i}", r)
                                      for i, r in enumerate(builtin(), 1)], "builtin", "")
    elif source.kind == "hub":
        yield read_hub(source.location, source.split)
    else:
        for f in source.files:
            yield read_file(f)
