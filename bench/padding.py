"""Padding: the batches our trainer builds vs Dolly v1's random batches padded to the longest.

Both sides batch the same prepared training split (GPT-J's tokenizer, Dolly's training text),
8 records a micro-batch, one epoch, and count from the collated tensors themselves:
padding efficiency = real tokens / tokens computed (the size of the batch's input_ids).

- ours (the primary figure, padding_efficiency): batching=packed, the config's default: the
  Trainer's RandomSampler (the same seeded permutation as Dolly's side, so the very same
  micro-batches), each micro-batch packed by dolly.data.packing.PackingCollator (from
  train_collator_for) into the fewest rows of at most the config's max_length tokens (1024, the
  max_length the records were prepared with), padded to the longest row; real tokens are its
  num_real_tokens. The number of ranks does not change it (each rank packs its own random
  micro-batches). packed_rows: the rows of all micro-batches together.
- ours, length-grouped (secondary, batching=length_grouped):
  dolly.data.batching.LengthGroupedSampler with the config's defaults (length_group_batches,
  seed), its order cut into micro-batches of 8 as the Trainer's DataLoader does, collated by
  dolly.data.collator.CompletionCollator (real tokens: attention mask 1), reported per world
  size as length_grouped_padding_efficiency_world<N> (with more ranks a megabatch spans
  batch * world records and each rank takes every world-th batch); length_grouped_computed_tokens
  is world size 1's.
- Dolly v1: the Trainer's RandomSampler (a seeded permutation), collated by Dolly's
  DataCollatorForCompletionOnlyLM (transformers' LM collator, pad_to_multiple_of=8).
  baseline_padding_efficiency_longest is the same batches padded to exactly the longest record.
compute_saved: 1 - ours' computed tokens (packed) / Dolly's.
"""
from __future__ import annotations

import tempfile
import time

from common import (DollyV1Collator, add_limit, batches, finish, parser, prepare, progress,
                    random_order)

from dolly.data.batching import LengthGroupedSampler
from dolly.data.collator import collator_for
from dolly.data.packing import (PackingCollator, packed_efficiency, take_counts,
                                train_collator_for)
from dolly.prompts import get_format
from dolly.train.rank import PreparedDataset


def efficiency(records: PreparedDataset, order, batch_size: int,
               collate) -> tuple[float, int, int, int]:
    """(real / computed, real tokens, tokens computed, rows) over the micro-batches of
    `batch_size` records that `order` is cut into, counted from what `collate` returns: a packed
    batch's num_real_tokens, else the attention mask's ones; computed: input_ids' size."""
    real = computed = rows = 0
    for b in batches(order, batch_size):
        batch = collate([records[i] for i in b])
        r, c, _ = take_counts(batch)  # as DollyTrainer counts
        real, computed = real + int(r), computed + c
        rows += batch["input_ids"].shape[0]
    return real / computed, real, computed, rows


def main() -> None:
    p = parser(__doc__)
    add_limit(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default="gpt-j", choices=("gpt-j", "corpus-bpe"))
    p.add_argument("--worlds", default="1,2,8",
                   help="World sizes of the length-grouped figures.")
    args = p.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"data_prep of {args.data} ({args.tokenizer} tokenizer)")
        cfg, prepared, tok = prepare(args.data, tmp, args.tokenizer, args.limit,
                                     batching="packed")
    train = prepared.train
    records = PreparedDataset(train)
    lengths = train["length"].to_numpy()
    progress(f"{len(records)} training records, mean {lengths.mean():.1f} tokens")
    if int(lengths.max()) > cfg.max_length:  # rows hold max_length tokens: every record fits
        raise SystemExit(f"a prepared record is longer than max_length {cfg.max_length}")
    fmt = get_format(cfg.prompt_format, tok)
    packed_collate = train_collator_for(cfg, fmt, tok)
    assert isinstance(packed_collate, PackingCollator)
    assert packed_collate.max_length == cfg.max_length
    grouped_collate = collator_for(fmt, tok)
    dolly_collate = DollyV1Collator(tok)
    dolly_longest = DollyV1Collator(tok, pad_to_multiple_of=None)

    t = time.perf_counter()
    order = random_order(len(records), cfg.seed)
    result = {"bench": "padding", "tokenizer": args.tokenizer, "batch_size": args.batch_size,
              "records": len(records), "mean_tokens": round(float(lengths.mean()), 2),
              "batching": cfg.batching, "max_length": cfg.max_length,
              "length_group_batches": cfg.length_group_batches}
    eff, real, computed, rows = efficiency(records, order, args.batch_size, packed_collate)
    # the collated tensors and the lengths-only figure must agree
    assert abs(eff - packed_efficiency(lengths, order, args.batch_size, cfg.max_length)) < 1e-12
    progress(f"ours, packed random micro-batches: padding efficiency {eff:.4f} ({rows} rows)")
    result.update(padding_efficiency=round(eff, 4), real_tokens=real, computed_tokens=computed,
                  packed_rows=rows)
    for w in worlds:
        sampler = LengthGroupedSampler(lengths, args.batch_size, w, cfg.length_group_batches,
                                       seed=cfg.seed)
        g_eff, _, g_computed, _ = efficiency(records, sampler.order(), args.batch_size,
                                             grouped_collate)
        progress(f"ours, length-grouped, world size {w}: padding efficiency {g_eff:.4f}")
        result[f"length_grouped_padding_efficiency_world{w}"] = round(g_eff, 4)
        if w == 1:
            result["length_grouped_computed_tokens"] = g_computed
    b_eff, _, b_computed, _ = efficiency(records, order, args.batch_size, dolly_collate)
    progress(f"Dolly v1 random batches: padding efficiency {b_eff:.4f}")
    longest, _, _, _ = efficiency(records, order, args.batch_size, dolly_longest)
    result.update(baseline_padding_efficiency=round(b_eff, 4),
                  baseline_padding_efficiency_longest=round(longest, 4),
                  baseline_computed_tokens=b_computed,
                  compute_saved=round(1 - computed / b_computed, 4),
                  seconds=round(time.perf_counter() - t, 2))
    finish(result)


if __name__ == "__main__":
    main()
