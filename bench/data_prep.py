"""data_prep's own work vs bare batched tokenization vs Dolly v1's `datasets.map`, same texts.

The Alpaca file is replicated 10x (50,010 records, Alpaca's size). Each replica's instructions
get a distinct suffix so data_prep's duplicate check does not discard 90% of the work: all
three ways tokenize the same 50,010 distinct texts with GPT-J's tokenizer.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import finish, load_records, parser, progress

from dolly import data, prompts
from dolly.config import load_config
from dolly.tokenizer import build_tokenizer


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--copies", type=int, default=10, help="Times the data is replicated.")
    p.add_argument("--repeats", type=int, default=2, help="Timed repeats; the best is reported.")
    args = p.parse_args()
    base = load_records(args.data)
    records = [dict(r, instruction=r["instruction"] + (f" (copy {k})" if k else ""))
               for k in range(args.copies) for r in base]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca_x.json"
        path.write_text(json.dumps(records))
        cfg = load_config(None, {"dataset": str(path), "tokenizer": "gpt-j", "max_length": 1024,
                                 "test_size": 0.02})
        tok = build_tokenizer(cfg)
        texts = [prompts.format_record(r["instruction"], r.get("input"), r["output"])
                 for r in records if r["output"].strip()]
        import datasets

        datasets.disable_progress_bars()
        ours, bare, dolly = [], [], []
        for i in range(args.repeats):
            progress(f"repeat {i + 1}: data_prep on {len(records)} records")
            t = time.perf_counter()
            result = data.prepare(cfg, Path(tmp) / f"prepared{i}", progress=False)
            ours.append(time.perf_counter() - t)
            progress(f"repeat {i + 1}: bare batched tokenization of {len(texts)} texts")
            t = time.perf_counter()
            tok(texts)
            bare.append(time.perf_counter() - t)
            progress(f"repeat {i + 1}: Dolly v1 datasets.map")
            t = time.perf_counter()
            ds = datasets.Dataset.from_dict({"text": texts})
            ds.map(lambda batch: tok(batch["text"]), batched=True, remove_columns=["text"])
            dolly.append(time.perf_counter() - t)
            progress(f"ours {ours[-1]:.2f}s, bare {bare[-1]:.2f}s, dolly {dolly[-1]:.2f}s")
    seconds, tok_s, base_s = min(ours), min(bare), min(dolly)
    finish({
        "bench": "data_prep", "records": len(records), "texts_tokenized": len(texts),
        "records_kept": result.counts["records_kept"], "seconds": round(seconds, 3),
        "tokenizer_only_seconds": round(tok_s, 3), "baseline_seconds": round(base_s, 3),
        "overhead_vs_tokenizer": round(seconds / tok_s, 3), "speedup": round(base_s / seconds, 3),
        "mean_tokens": result.summary["token_lengths"]["mean"],
    })


if __name__ == "__main__":
    main()
