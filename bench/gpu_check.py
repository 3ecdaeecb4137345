"""The one GPU check: GPT-J 6B's shape through the real training code and the generation paths.

    python bench/gpu_check.py            # on one 80-141 GB GPU, no network: a few minutes
    python bench/gpu_check.py --smoke    # the same code at tiny shapes on CPU (the test suite)

(a) Training: `dolly.train.rank.train` (the function every rank of the train step runs: HF Trainer
    + DeepSpeed ZeRO-3, length-grouped batches, completion-only labels) in this one process
    (world size 1), bf16, on a randomly initialised GPT-J of 6B's shape (the tiny-gptj path with
    tiny_* = 28 x 4096, 16 heads, rotary 64, untied; GPT-J's BPE, 50,260 rows), on Alpaca-like
    records (--data, else a seeded synthetic set with Alpaca's length profile). The memory plan
    (dolly.train.memory_plan.choose) picks the micro-batch and gradient checkpointing for the GPU; if
    GPT-J 6B's states do not fit one GPU at all (an 80 GB H100 without offload), it keeps the
    shape's width and uses the most layers that do (`n_layer` in the JSON). The first
    `--timed-steps` steps are warm-up; the next `--timed-steps` are measured by the trainer's own
    counters (non-pad tokens/s, MFU, peak GPU memory, next to the plan's prediction).
    Needs DeepSpeed; skipped (with the reason in the JSON) where it is missing.
(b) Generation at the same shape: dolly.generation.generate (batched, left-padded, stops at
    `### End`) vs Dolly v1's generate_response (one prompt at a time) on the same `--prompts`
    instructions, greedy, the same max_new_tokens: rows/s, tokens/s, and `gen_agreement` (share
    of rows whose two answers are the same text). Needs neither DeepSpeed nor MLflow.

The last stdout line is one JSON object (see bench/README.md).
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, DEFAULT_DATA, finish, generate_response, progress, same_text

# GPT-J 6B (transformers' GPTJConfig() defaults) as tiny_* fields of the tiny-gptj path.
GPTJ_6B = {"tiny_n_layer": 28, "tiny_n_embd": 4096, "tiny_n_head": 16, "tiny_rotary_dim": 64,
           "tiny_n_positions": 2048, "tiny_tie_embeddings": False}
SMOKE = {"tiny_n_layer": 2, "tiny_n_embd": 64, "tiny_n_head": 4, "tiny_rotary_dim": 16,
         "tiny_n_positions": 512, "tiny_tie_embeddings": False}


def parse_args():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds)")
    p.add_argument("--data", default="", help="Alpaca-layout JSON list (default: "
                   "../shared/data/alpaca_5000.json if present, else synthetic Alpaca-like)")
    p.add_argument("--records", type=int, default=0, help="records to train on (0: as needed)")
    p.add_argument("--timed-steps", type=int, default=0, help="warm-up steps = timed steps "
                   "(default 20 on GPU, 2 in --smoke)")
    p.add_argument("--prompts", type=int, default=0, help="generation prompts (64; 6 in --smoke)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="(64; 4 in --smoke)")
    p.add_argument("--gen-batch-size", type=int, default=0, help="(64; 4 in --smoke)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    a = p.parse_args()
    d = (2, 6, 4, 4) if a.smoke else (20, 64, 64, 64)
    a.timed_steps = a.timed_steps or d[0]
    a.prompts, a.max_new_tokens, a.gen_batch_size = (a.prompts or d[1], a.max_new_tokens or d[2],
                                                     a.gen_batch_size or d[3])
    return a


def alpaca_like(n: int, seed: int = 0) -> list[dict]:
    """Seeded records whose token lengths follow Alpaca's profile (mean ~107 tokens with GPT-J's
    BPE in Dolly's format, long tail; bench/common.prepare notes the longest Alpaca record, 727)."""
    from dolly.tokenizer import gptj_offline

    words = [w[1:] for w in gptj_offline().get_vocab() if w.startswith("\u0120") and w[1:].isalpha()
             and w[1:].islower() and len(w) > 3]
    words.sort()
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, k))).capitalize() + "."

    out = []
    for _ in range(n):
        out.append({"instruction": text(int(rng.lognormvariate(2.5, 0.5))),
                    "input": text(int(rng.lognormvariate(2.5, 0.8))) if rng.random() < 0.4 else "",
                    "output": text(min(600, int(rng.lognormvariate(3.8, 0.9))))})
    return out


def records(args, n: int) -> list[dict]:
    path = Path(args.data) if args.data else DEFAULT_DATA
    if path.is_file() and (args.data or not args.smoke):
        got = json.loads(path.read_text())
        return got[:n] if n else got
    if args.data:
        sys.exit(f"error: --data '{args.data}' does not exist")
    return alpaca_like(n)


def prepare(args, work: Path, shape: dict, n: int):
    """dolly.data.prepare on n records with GPT-J's offline BPE: (cfg, prepared folder, tok)."""
    from dolly import data
    from dolly.config import load_config
    from dolly.tokenizer import load_tokenizer

    src = work / "records.json"
    src.write_text(json.dumps(records(args, n)))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {
        "dataset": str(src), "tokenizer": "gpt-j", "max_length": 1024 if not args.smoke else 256,
        "too_long": "truncate", "test_size": 2, "output_dir": str(work / "train"),
        # the check measures a randomly initialised model of GPT-J's shape: no pretrained base
        "pretrain_steps": 0,
        "deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero3.json"), **shape})
    data.prepare(cfg, work / "prepared", progress=False)
    return cfg, work / "prepared", load_tokenizer(str(work / "prepared" / "tokenizer"))


# ------------------------------------------------------------------------------ training ------

def plan_training(cfg, longest: int, gpu: bool, smoke: bool):
    """(cfg with micro-batch / checkpointing / layers chosen, the plan) from dolly.train.memory_plan."""
    import dataclasses

    from dolly.train import memory_plan as mp

    if not gpu:  # CPU: nothing to plan against; a fixed tiny setting, the plan for the record
        cfg = dataclasses.replace(cfg, per_device_batch_size=2, precision="fp32")
        return cfg, mp.plan_for(cfg, gpus_per_node=1, seq_len=longest)
    _, gpu_bytes = mp.visible_gpu()
    cfg = dataclasses.replace(cfg, precision="bf16")
    one, two = (mp.model_shape(dataclasses.replace(cfg, tiny_n_layer=k)) for k in (1, 2))
    per_layer = two.n_params - one.n_params  # parameters grow linearly with depth
    for layers in range(cfg.tiny_n_layer, 0, -1):
        trial = dataclasses.replace(cfg, tiny_n_layer=layers)
        shape = dataclasses.replace(one, n_params=one.n_params + (layers - 1) * per_layer,
                                    n_layer=layers, source=f"GPT-J 6B's width, {layers} layers")
        chosen = mp.choose(shape, mp.setting_of(trial, 1, longest), gpu_bytes)
        if chosen is not None and chosen.micro_batch >= 2:
            cfg = dataclasses.replace(trial, per_device_batch_size=chosen.micro_batch,
                                      gradient_checkpointing=chosen.gradient_checkpointing)
            return cfg, mp.plan_for(cfg, gpus_per_node=1, seq_len=longest, shape=shape)
    raise SystemExit("error: not even one layer of this shape fits the GPU")


def train_part(args, work: Path, gpu: bool) -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"train_skipped": "DeepSpeed is not installed"}
    import dataclasses

    import torch

    from dolly.train import rank as training

    n = args.records or (64 if args.smoke else 4 * 64 * args.timed_steps)
    cfg, prepared, _ = prepare(args, work, SMOKE if args.smoke else GPTJ_6B, n)
    from dolly.data import load_prepared

    _, _, summary = load_prepared(prepared)
    longest = int(summary["token_lengths"]["max"])
    cfg, plan = plan_training(cfg, longest, gpu, args.smoke)
    steps = 2 * args.timed_steps  # two logging intervals: warm-up, then the timed one
    cfg = dataclasses.replace(cfg, max_steps=steps, logging_steps=args.timed_steps, eval_steps=0,
                              save_steps=0, warmup_steps=0, resume="never",
                              lr_scheduler="constant", learning_rate=1e-5)
    progress(f"train: {cfg.tiny_n_layer} x {cfg.tiny_n_embd}, micro-batch "
             f"{cfg.per_device_batch_size}, checkpointing {cfg.gradient_checkpointing}, "
             f"{steps} steps; plan: {plan.verdict()}")
    kept: list[dict] = []
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        """Keeps the Trainer's logs (throughput, MFU, memory) for the JSON line."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            kept.append(dict(logs or {}))

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    result = training.train(cfg, prepared, gpu, extra_callbacks=[Keep()])
    timed = [entry for entry in kept if "loss" in entry and "train_tokens_per_second" in entry]
    last = timed[-1] if timed else {}
    peak = last.get("peak_gpu_mb_rank0")
    out = {
        "n_layer": cfg.tiny_n_layer, "n_embd": cfg.tiny_n_embd,
        "param_count": result["param_count"], "micro_batch": cfg.per_device_batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing, "timed_steps": args.timed_steps,
        "longest_record": longest, "final_loss": result["final_loss"],
        "train_tokens_per_second_per_gpu": last.get("train_tokens_per_second"),
        "padding_efficiency": last.get("padding_efficiency"),
        "mfu": last.get("mfu"),
        "peak_gpu_gib": peak / 1024 if peak is not None else None,
        "planned_gpu_gib": plan.need / 2**30,
        "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                                   if gpu else None),
    }
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- generation ------

def generate_part(args, gpu: bool) -> dict:
    import torch
    from transformers import GPTJForCausalLM

    from dolly.config import load_config
    from dolly.generation import generate
    from dolly.models.tiny import tiny_config
    from dolly.tokenizer import build_tokenizer

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      {"tokenizer": "gpt-j", **(SMOKE if args.smoke else GPTJ_6B)})
    tok = build_tokenizer(cfg)
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    progress(f"generate: building a random GPT-J {cfg.tiny_n_layer} x {cfg.tiny_n_embd} on {device}")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPTJForCausalLM(tiny_config(cfg, tok)).eval()
    finally:
        torch.set_default_dtype(default)
    instructions = [r["instruction"] for r in records(args, args.prompts)][: args.prompts]
    n_new = args.max_new_tokens

    def timed(fn):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if gpu:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    generate(model, tok, instructions[:2], max_new_tokens=2, batch_size=2)  # warm-up
    ours, s_ours = timed(lambda: generate(model, tok, instructions, max_new_tokens=n_new,
                                          batch_size=args.gen_batch_size))
    ours_tokens = sum(g.new_tokens for g in ours.generations)

    def dolly_loop():
        with torch.inference_mode():
            return [generate_response(i, model=model, tokenizer=tok, do_sample=False,
                                      max_new_tokens=n_new) for i in instructions]

    theirs, s_theirs = timed(dolly_loop)
    theirs_tokens = sum(len(tok(t or "", add_special_tokens=False)["input_ids"]) for t in theirs)
    agree = sum(same_text(g.response, t) for g, t in zip(ours.generations, theirs))
    rows = len(instructions)
    return {"gen_rows": rows, "gen_max_new_tokens": n_new, "gen_batch_size": args.gen_batch_size,
            "gen_rows_per_second": rows / s_ours, "gen_tokens_per_second": ours_tokens / s_ours,
            "gen_baseline_rows_per_second": rows / s_theirs,
            "gen_baseline_tokens_per_second": theirs_tokens / s_theirs,
            "gen_speedup": s_theirs / s_ours, "gen_agreement": agree / rows}


def main() -> None:
    args = parse_args()
    if args.smoke:  # CPU ranks even on a GPU machine; DeepSpeed reads this when imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        sys.exit("error: no GPU visible (run with --smoke for the CPU check)")
    result = {"bench": "gpu_check", "mode": "smoke" if args.smoke else "gpu"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        # generation first: its plain torch model is freed completely before ZeRO-3 starts
        if not args.skip_generate:
            result.update(generate_part(args, gpu))
        if gpu:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        if not args.skip_train:
            result.update(train_part(args, Path(tmp), gpu))
    result["seconds"] = time.perf_counter() - t0
    finish(result)


if __name__ == "__main__":
    main()
