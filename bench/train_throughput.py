"""Training throughput: our trainer's path vs Dolly v1's, same model, records, steps, batch size.

Both sides train a freshly initialised GPT-J of the same shape and seed with the same AdamW, for
the same optimizer steps of `--batch-size` records, over exactly the same records (a seeded
sample of `steps * batch_size` training records, one pass), so both see the same real tokens.
They differ only in what the trainers do with those records:

- ours: what dolly.train.rank's Trainer does for the config's `batching` (`--batching`; default
  the config's, packed), in one process:
  order: the sampler of that batching. packed and random: the Trainer's RandomSampler, the same
  seeded permutation as Dolly's side (common.random_order), so both sides train on identical
  micro-batches; length_grouped: dolly.data.batching.LengthGroupedSampler (config defaults).
  collator: dolly.data.packing.train_collator_for. packed: PackingCollator, each micro-batch's
  records in the fewest rows of at most the config's max_length tokens (1024, the max_length
  the records were prepared with, so every record fits a row), positions restarting per record,
  no attention mask; else the padded CompletionCollator, each record its own row.
  model: dolly.models.labelled_loss.install (logits only at labelled positions); on CUDA with
  packed rows also dolly.models.varlen.enable (GPT-J's attention through a varlen kernel).
- Dolly v1: the Trainer's RandomSampler + Dolly's DataCollatorForCompletionOnlyLM (transformers'
  LM collator, pad_to_multiple_of=8): each record its own row padded to the micro-batch's
  longest; the model's own forward (logits at every position).

Collation is timed with the step (it is part of each trainer's work). `--warmup-steps` random
batches of other records run first on each side, untimed. tokens_per_second counts real
(non-pad) tokens: a packed batch's num_real_tokens, a padded batch's attention-mask ones;
padding_efficiency is those over input_ids' size (tokens computed). Gradient checkpointing
(Dolly used it for 6B) is off on both sides unless asked for. Tokenizer: GPT-J's BPE by default
(its 50k-row embedding and LM head dominate a tiny model's cost on CPU); `--tokenizer
corpus-bpe` uses the pipeline's small corpus BPE instead. final_loss / baseline_final_loss are
each side's last step's loss.

With `--device cuda` the same comparison runs on the GPU (`--dtype bf16` for autocast, and the
model shape flags for a larger GPT-J); MFU is reported where the GPU's peak is known.
`--trainer` also runs the real train step on the same records with batching=packed (ours) and
batching=random (Dolly v1's sampler): trainer_*.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (add_model_args, ROOT, DollyV1Collator, add_limit, apply_threads, batches, finish, free_port,
                    parser, prepare, progress, random_order, sync)

from dolly.train import throughput
from dolly.data.batching import LengthGroupedSampler
from dolly.data.packing import take_counts, train_collator_for
from dolly.models import labelled_loss
from dolly.models.tiny import build_tiny
from dolly.prompts import get_format
from dolly.train.rank import PreparedDataset


def run_side(name, cfg, tok, records, order, warm, collate, labelled: bool, args):
    """Trains one side: `order` (record indices, cut into micro-batches of args.batch_size)
    after the untimed `warm` ones, each collated by `collate`; `labelled`: the model computes
    logits only at labelled positions (dolly.models.labelled_loss). Returns its counts (real and
    computed tokens, records), seconds, parameter counts and last loss."""
    import torch

    model = build_tiny(cfg, tok).to(args.device)
    model.config.use_cache = False
    if labelled and not labelled_loss.install(model):
        raise SystemExit(f"labelled_loss does not support {model.config.model_type}")
    if labelled and cfg.batching == "packed" and args.device == "cuda":
        from dolly.models import varlen

        # as dolly.train.rank does on GPUs: packed GPT-J rows through a varlen kernel
        progress(f"{name}: attention through {varlen.enable(model) or 'eager (no varlen kernel)'}")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2),
                            **({"fused": True} if args.device == "cuda" else {}))
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(idx):
        batch = collate([records[i] for i in idx])
        counts = [int(c) for c in take_counts(batch)]  # as DollyTrainer counts
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (*counts, loss)

    for b in batches(warm, args.batch_size):
        step(b)
    sync(args.device)
    real = computed = seqs = 0
    t0 = time.perf_counter()
    for k, b in enumerate(batches(order, args.batch_size), 1):
        r, c, s, loss = step(b)
        real, computed, seqs = real + r, computed + c, seqs + s
        if k % max(1, args.steps // 4) == 0:
            progress(f"{name}: step {k}/{args.steps}, loss {loss.item():.3f}")
    sync(args.device)
    secs = time.perf_counter() - t0
    last_loss = float(loss.item())
    params = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    # the input embedding is a lookup, not a matmul, unless the LM head shares its weight
    tied = outp is not None and outp.weight is inp.weight
    embed = 0 if tied else inp.weight.numel()
    del model, opt
    return {"real": real, "computed": computed, "seqs": seqs, "seconds": secs,
            "params": params, "matmul_params": params - embed, "tied": tied, "loss": last_loss}


def trainer_path(cfg, prepared_train, timed, tmp: Path, args) -> dict:
    """The real train step (`python -m steps.train`: DeepSpeed ZeRO-3, the HF Trainer, this
    machine's ranks) on exactly the timed records, one epoch, with batching=packed (ours: random
    micro-batches packed into rows of at most cfg.max_length tokens) and batching=random (Dolly
    v1's sampler, each record its own padded row); the rest of the step (our collator's labels,
    labelled-only logits) is ours on both sides. The figures are the step's own whole-run
    mean_train_tokens_per_second / mean_padding_efficiency tags."""
    import mlflow

    rows = prepared_train.iloc[timed]
    src = tmp / "trainer_records.json"
    src.write_text(json.dumps([{"instruction": r.instruction, "input": r.input,
                                "output": r.response} for r in rows.itertuples()]))
    _, prep, _ = prepare(str(src), tmp / "trainer_data", args.tokenizer, test_size=1,
                         tiny_n_layer=args.n_layer, tiny_n_embd=args.n_embd,
                         tiny_n_head=args.n_head, tiny_rotary_dim=args.rotary_dim)
    uri = f"sqlite:///{tmp / 'trainer_mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench-trainer", artifact_location=str(tmp / "artifacts"))
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=exp,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_RUN_ID", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = {}
    for batching in ("random", "packed"):
        overrides = {"tokenizer": args.tokenizer, "tiny_n_layer": args.n_layer,
                     "tiny_n_embd": args.n_embd, "tiny_n_head": args.n_head,
                     "tiny_rotary_dim": args.rotary_dim, "max_length": cfg.max_length,
                     "per_device_batch_size": args.batch_size, "epochs": 1, "max_steps": -1,
                     "eval_steps": 0, "save_steps": 0, "logging_steps": 1000, "warmup_steps": 0,
                     "resume": "never", "batching": batching, "master_port": free_port(),
                     "output_dir": str(tmp / f"train_{batching}"),
                     "precision": "bf16" if args.dtype == "bf16" else "auto"}
        cmd = [sys.executable, "-m", "steps.train", "--prepared", str(prep.out_dir)]
        for k, v in overrides.items():
            cmd += [f"--{k}", str(v)]
        progress(f"train step, batching={batching}: {' '.join(cmd[1:4])} ...")
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"train step failed:\n{proc.stderr[-3000:]}")
        run = max(client.search_runs([exp]), key=lambda r: r.info.start_time)
        # the whole run's figures: tags set once at the end (dolly.train.trainer.SUMMARY_TAGS)
        m = {k: float(run.data.tags[f"mean_{k}"])
             for k in ("train_tokens_per_second", "padding_efficiency")}
        out[batching] = {**m, "wall": wall}
        progress(f"train step, batching={batching}: {m['train_tokens_per_second']:.0f} non-pad "
                 f"tokens/s, padding efficiency {m['padding_efficiency']:.3f} ({wall:.0f}s)")
    ours, base = out["packed"], out["random"]
    return {"trainer_tokens_per_second": round(ours["train_tokens_per_second"], 1),
            "trainer_baseline_tokens_per_second": round(base["train_tokens_per_second"], 1),
            "trainer_speedup": round(ours["train_tokens_per_second"]
                                     / base["train_tokens_per_second"], 3),
            "trainer_padding_efficiency": round(ours["padding_efficiency"], 4),
            "trainer_baseline_padding_efficiency": round(base["padding_efficiency"], 4),
            "trainer_step_seconds": round(ours["wall"], 1),
            "trainer_baseline_step_seconds": round(base["wall"], 1)}


def main() -> None:
    p = parser(__doc__)
    add_limit(p)
    p.add_argument("--steps", type=int, default=24, help="Timed optimizer steps per side.")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="Alternating repeats; best per side.")
    add_model_args(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batching", default=None, choices=("packed", "length_grouped", "random"),
                   help="Our side's batching (default: the config's, packed).")
    p.add_argument("--trainer", action="store_true",
                   help="Also run the real train step (ZeRO-3, HF Trainer) with batching=packed "
                        "and batching=random: trainer_*.")
    args = p.parse_args()
    import torch

    apply_threads(args)
    tmpdir = tempfile.TemporaryDirectory()
    tmp = Path(tmpdir.name)
    progress(f"data_prep of {args.data} ({args.tokenizer} tokenizer)")
    cfg, prepared, tok = prepare(args.data, tmp, args.tokenizer, args.limit,
                                 tiny_n_layer=args.n_layer, tiny_n_embd=args.n_embd,
                                 tiny_n_head=args.n_head, tiny_rotary_dim=args.rotary_dim,
                                 **({"batching": args.batching} if args.batching else {}))
    records = PreparedDataset(prepared.train)
    # packed rows hold at most cfg.max_length tokens, the length the records were prepared with
    if int(records.lengths.max()) > cfg.max_length:
        raise SystemExit(f"a prepared record is longer than max_length {cfg.max_length}")
    need = (args.steps + args.warmup_steps) * args.batch_size
    if need > len(records):
        raise SystemExit(f"{need} records needed, {len(records)} prepared: fewer --steps")
    pick = np.random.default_rng(cfg.seed).permutation(len(records))
    warm = pick[:args.warmup_steps * args.batch_size].tolist()
    timed = pick[args.warmup_steps * args.batch_size:need]
    dolly_order = timed[random_order(len(timed), cfg.seed)].tolist()
    if cfg.batching == "length_grouped":
        ours_order = timed[LengthGroupedSampler(records.lengths[timed], args.batch_size, 1,
                                                cfg.length_group_batches,
                                                seed=cfg.seed).order()].tolist()
    else:  # packed and random: the Trainer's RandomSampler, the micro-batches of Dolly's side
        ours_order = dolly_order
    ours_collate = train_collator_for(cfg, get_format(cfg.prompt_format, tok), tok)
    dolly_collate = DollyV1Collator(tok)

    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name, order, collate, labelled in (
                ("dolly_v1", dolly_order, dolly_collate, False),
                ("ours", ours_order, ours_collate, True)):
            progress(f"repeat {rep + 1}: {name}, {args.steps} steps of {args.batch_size}")
            r = run_side(name, cfg, tok, records, order, warm, collate, labelled, args)
            tps = r["real"] / r["seconds"]
            progress(f"{name}: {tps:.0f} non-pad tokens/s, padding efficiency "
                     f"{r['real'] / r['computed']:.3f}, {r['seconds']:.1f}s")
            if name not in best or tps > best[name]["real"] / best[name]["seconds"]:
                best[name] = r
    ours, base = best["ours"], best["dolly_v1"]
    assert ours["real"] == base["real"], "both sides must train on the same tokens"
    tps, base_tps = ours["real"] / ours["seconds"], base["real"] / base["seconds"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    precision = args.dtype if args.device == "cuda" else "fp32"
    peak = throughput.peak_flops(device_name, precision)
    out = {"bench": "train_throughput", "tokenizer": args.tokenizer, "device": args.device,
           "dtype": args.dtype, "steps": args.steps, "batch_size": args.batch_size,
           "batching": cfg.batching, "max_length": cfg.max_length,
           "repeats": args.repeats, "params": ours["params"],
           "tied_embeddings": ours["tied"],
           "model_shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                           "vocab": len(tok)},
           "gradient_checkpointing": args.gradient_checkpointing,
           "real_tokens": ours["real"],
           "tokens_per_second": round(tps, 1), "baseline_tokens_per_second": round(base_tps, 1),
           "speedup": round(tps / base_tps, 3),
           "seconds": round(ours["seconds"], 2), "baseline_seconds": round(base["seconds"], 2),
           "padding_efficiency": round(ours["real"] / ours["computed"], 4),
           "baseline_padding_efficiency": round(base["real"] / base["computed"], 4),
           "computed_tokens_per_second": round(ours["computed"] / ours["seconds"], 1),
           "baseline_computed_tokens_per_second": round(base["computed"] / base["seconds"], 1),
           "final_loss": round(ours["loss"], 4), "baseline_final_loss": round(base["loss"], 4)}
    if args.trainer:
        out.update(trainer_path(cfg, prepared.train, timed, tmp, args))
    tmpdir.cleanup()
    for key, r in (("", ours), ("baseline_", base)):
        per_token = throughput.flops_per_token(r["matmul_params"], args.n_layer, args.n_embd,
                                               r["computed"] / r["seqs"])
        rate = r["real"] / r["seconds"]
        out[f"{key}model_tflops_per_second"] = round(rate * per_token / 1e12, 4)
        m = throughput.mfu(rate, per_token, peak, 1)
        if m is not None:
            out[f"{key}mfu"] = round(m, 4)
    finish(out)


if __name__ == "__main__":
    main()
