"""Padding: the batches our trainer builds vs Dolly v1's random batches padded to the longest.

Both sides batch the same prepared training split (GPT-J's tokenizer, Dolly's training text),
8 records a batch, one epoch, and count from the collated tensors themselves:
padding efficiency = real tokens (attention mask 1) / tokens computed (the batch tensor's size).

- ours: dolly.data.batching.LengthGroupedSampler with the config's defaults (length_group_batches,
  seed), its order cut into batches of 8 as the Trainer's DataLoader does, collated by
  dolly.data.collator.CompletionCollator. The primary figure is one device (world size 1); with more
  ranks a megabatch spans batch * world records and each rank takes every world-th batch, which
  is reported as padding_efficiency_world<N>.
- Dolly v1: the Trainer's RandomSampler (a seeded permutation), collated by Dolly's
  DataCollatorForCompletionOnlyLM (transformers' LM collator, pad_to_multiple_of=8).
  baseline_padding_efficiency_longest is the same batches padded to exactly the longest record.
"""
from __future__ import annotations

import tempfile
import time

from common import (DollyV1Collator, add_limit, batches, finish, parser, prepare, progress,
                    random_order)

from dolly.data.batching import LengthGroupedSampler
from dolly.data.collator import CompletionCollator
from dolly.prompts import special_ids
from dolly.train.rank import PreparedDataset


def efficiency(records: PreparedDataset, order, batch_size: int, collate) -> tuple[float, int, int]:
    real = computed = 0
    for b in batches(order, batch_size):
        mask = collate([records[i] for i in b])["attention_mask"]
        real += int(mask.sum())
        computed += mask.numel()
    return real / computed, real, computed


def main() -> None:
    p = parser(__doc__)
    add_limit(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default="gpt-j", choices=("gpt-j", "corpus-bpe"))
    p.add_argument("--worlds", default="1,2,8",
                   help="World sizes to report (the first is primary).")
    args = p.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"data_prep of {args.data} ({args.tokenizer} tokenizer)")
        cfg, prepared, tok = prepare(args.data, tmp, args.tokenizer, args.limit)
    train = prepared.train
    records = PreparedDataset(train)
    lengths = train["length"].to_numpy()
    progress(f"{len(records)} training records, mean {lengths.mean():.1f} tokens")
    resp_id, _ = special_ids(tok)
    ours_collate = CompletionCollator(pad_token_id=tok.pad_token_id, response_key_id=resp_id)
    dolly_collate = DollyV1Collator(tok)
    dolly_longest = DollyV1Collator(tok, pad_to_multiple_of=None)

    t = time.perf_counter()
    result = {"bench": "padding", "tokenizer": args.tokenizer, "batch_size": args.batch_size,
              "records": len(records), "mean_tokens": round(float(lengths.mean()), 2),
              "length_group_batches": cfg.length_group_batches}
    for w in worlds:
        sampler = LengthGroupedSampler(lengths, args.batch_size, w, cfg.length_group_batches,
                                       seed=cfg.seed)
        eff, real, computed = efficiency(records, sampler.order(), args.batch_size, ours_collate)
        progress(f"ours, world size {w}: padding efficiency {eff:.4f}")
        result[f"padding_efficiency_world{w}"] = round(eff, 4)
        if w == worlds[0]:
            result.update(padding_efficiency=round(eff, 4), real_tokens=real,
                          computed_tokens=computed, world_size=w)
    order = random_order(len(records), cfg.seed)
    eff, real, computed = efficiency(records, order, args.batch_size, dolly_collate)
    progress(f"Dolly v1 random batches: padding efficiency {eff:.4f}")
    longest, _, _ = efficiency(records, order, args.batch_size, dolly_longest)
    result.update(baseline_padding_efficiency=round(eff, 4),
                  baseline_padding_efficiency_longest=round(longest, 4),
                  baseline_computed_tokens=computed,
                  compute_saved=round(1 - result["computed_tokens"] / computed, 4),
                  seconds=round(time.perf_counter() - t, 2))
    finish(result)


if __name__ == "__main__":
    main()
