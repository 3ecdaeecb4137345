"""The one GPU check: GPT-J 6B's shape through the real training code and the generation paths.

    python bench/gpu_check.py            # on one 80-141 GB GPU, no network: a few minutes
    python bench/gpu_check.py --smoke    # the same code at tiny shapes on CPU (the test suite)

(a) Training: `dolly.train.rank.train` (the function every rank of the train step runs: HF Trainer
    + DeepSpeed ZeRO-3, length-grouped padded batches (batching=length_grouped, set here
    whatever the profile's default: the padded figure (a4) is compared with), completion-only
    labels) in this one process
    (world size 1), bf16, on a randomly initialised GPT-J of 6B's shape (the tiny-gptj path with
    tiny_* = 28 x 4096, 16 heads, rotary 64, untied; GPT-J's BPE, 50,260 rows), on Alpaca-like
    records (--data, else a seeded synthetic set with Alpaca's length profile). The memory plan
    (dolly.train.memory_plan.choose) picks the micro-batch and gradient checkpointing for the GPU; if
    GPT-J 6B's states do not fit one GPU at all (an 80 GB H100 without offload), it keeps the
    shape's width and uses the most layers that do (`n_layer` in the JSON). The first
    `--timed-steps` steps are warm-up; the next `--timed-steps` are measured by the trainer's own
    counters (non-pad tokens/s, MFU, peak GPU memory, next to the plan's prediction).
    Needs DeepSpeed; skipped (with the reason in the JSON) where it is missing.
(a2) LoRA and (a3) QLoRA training at the same shape, through the same `dolly.train.rank.train`
    with finetune=lora / qlora (peft adapters, r 16, all linear layers, on a frozen base; plain
    data parallel, no DeepSpeed), each in a child process of its own (a fresh CUDA context and
    peak-memory counter, nothing left over from the other parts) that cannot import MLflow or
    DeepSpeed (so the check proves they need neither). A LoRA adapter refers to its base by
    folder, so the randomly initialised base is saved first (bf16 on the GPU) and is the
    `base_model` of both. The micro-batch comes from the memory plan as for (a); where the plan
    does not handle adapters yet, the plan figure is null and `<part>_plan_note` says why.
    `--adapter-timed-steps` warm-up + timed steps (default 10 + 10): non-pad tokens/s, MFU,
    peak GPU memory next to the plan, trainable parameters, and whether the frozen base's digest
    is the same after training. QLoRA needs bitsandbytes and a GPU: skipped (the reason in the
    JSON) without them and in --smoke.
(a4) Packed rows (batching=packed, dolly.data.packing) on GPT-J through the varlen attention path
    (dolly.models.varlen), two parts:
    - the check, in this process: a randomly initialised GPT-J of (a)'s full shape (bf16 on the
      GPU; fp32 at the tiny shape in --smoke), eval, labelled-only logits
      (dolly.models.labelled_loss installed). Each of `--packed-records` prepared records (16; 8
      in --smoke) alone (CompletionCollator, one row, eager attention) against the same records
      packed into rows of max_length by PackingCollator, with varlen attention enabled: a
      record's loss in the packed batch is read by keeping only its labels. Within 1e-2
      relative on the GPU (bf16, flash kernel vs eager), 1e-5 absolute in --smoke (fp32, where
      no varlen kernel exists: CUDA only, so the packed path runs eager attention with
      transformers' packed-sequence mask and `packed_varlen_skipped` says so). Proof that the
      kernel ran: `packed_varlen_calls` (dolly.models.varlen.calls(): one per layer per forward)
      and the CUDA kernel names of one packed forward under torch.profiler that contain
      "flash" (`packed_flash_kernels`). A control lets the records see each other (an all-ones
      attention mask, which the varlen layers refuse, so eager attention mixes the records):
      `packed_control_max_rel_diff` should be far above the tolerance, else this model cannot
      tell mixed records from separate ones (`packed_control_separates`). The script exits
      with status 1 after its JSON when the packed losses are outside the tolerance.
    - training (`packed_train_*`): the same `dolly.train.rank.train` as (a) (ZeRO-3, bf16, the
      same layers) with batching=packed and varlen attention enabled at train begin (a
      TrainerCallback), in a child process as (a2) (MLflow blocked; DeepSpeed allowed). Gradient
      checkpointing off at the largest power-of-two micro-batch (<= (a)'s) that
      dolly.train.memory_plan says fits without it (planned at (a)'s longest record: a packed
      micro-batch of b records holds at most b x longest tokens; the plan counts eager
      attention's s x s scores and every position's logits, which the varlen kernel and the
      labelled-only logits do not keep, so it is an upper bound; without a varlen kernel rows
      up to max_length are planned), with gradient accumulation so that an optimizer step
      sees (a)'s records per step; checkpointing on at (a)'s micro-batch where no micro-batch
      fits without it (`packed_train_plan_note`). `--packed-timed-steps` warm-up + timed steps
      (10 + 10; 2 + 2 in --smoke). `packed_over_padded_tokens_per_second` compares with (a).
      Skipped (the reason in `packed_train_skipped`) without DeepSpeed.
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
import subprocess
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
ADAPTERS = ("lora", "qlora")  # parts (a2) and (a3), in this order
# micro-batch (with gradient checkpointing) of an adapter part when the memory plan chooses none:
# a bf16 6B base (12 GiB) + checkpointed activations of 16 x 727 tokens take ~25 GiB
ADAPTER_FALLBACK_MICRO_BATCH = 16
# modules a child process may not import, by part: lora/qlora train without either; the packed
# full fine-tune (a4) needs DeepSpeed, not MLflow
BLOCKED_MODULES = {"adapter": ("mlflow", "deepspeed"), "packed": ("mlflow",)}


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
    p.add_argument("--adapter-timed-steps", type=int, default=0, help="warm-up steps = timed "
                   "steps of the LoRA and QLoRA parts (default 10 on GPU, 2 in --smoke)")
    p.add_argument("--skip-train", action="store_true", help="no training part at all")
    p.add_argument("--skip-full", action="store_true", help="no full fine-tune (a)")
    p.add_argument("--skip-adapters", action="store_true", help="no LoRA / QLoRA (a2, a3)")
    p.add_argument("--skip-packed", action="store_true", help="no packed rows (a4)")
    p.add_argument("--packed-records", type=int, default=0, help="records of the packed check "
                   "(default 16 on GPU, 8 in --smoke)")
    p.add_argument("--packed-timed-steps", type=int, default=0, help="warm-up steps = timed "
                   "steps of the packed training (default 10 on GPU, 2 in --smoke)")
    p.add_argument("--skip-generate", action="store_true")
    # internal: this script started as one part's child process (run_child)
    p.add_argument("--child", "--adapter-child", dest="child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    d = (2, 6, 4, 4) if a.smoke else (20, 64, 64, 64)
    a.timed_steps = a.timed_steps or d[0]
    a.adapter_timed_steps = a.adapter_timed_steps or (2 if a.smoke else 10)
    a.packed_timed_steps = a.packed_timed_steps or (2 if a.smoke else 10)
    a.packed_records = a.packed_records or (8 if a.smoke else 16)
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


def training_data(args, work: Path):
    """The records every training part trains on, prepared once: (cfg, prepared, tok, longest)."""
    from dolly.data import load_prepared

    n = args.records or (64 if args.smoke else 4 * 64 * args.timed_steps)
    cfg, prepared, tok = prepare(args, work, SMOKE if args.smoke else GPTJ_6B, n)
    _, _, summary = load_prepared(prepared)
    return cfg, prepared, tok, int(summary["token_lengths"]["max"])


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


def log_keeper(kept: list):
    """A TrainerCallback that appends the Trainer's logs (throughput, MFU, memory) to `kept`."""
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            kept.append(dict(logs or {}))

    return Keep()


def as_one_rank() -> None:
    """The environment of rank 0 of a world of one, as the launchers set it."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def timed_figures(kept: list[dict]) -> dict:
    """The last logging interval's figures (the timed steps; the first interval is warm-up)."""
    timed = [entry for entry in kept if "loss" in entry and "train_tokens_per_second" in entry]
    last = timed[-1] if timed else {}
    peak = last.get("peak_gpu_mb_rank0")
    return {"train_tokens_per_second_per_gpu": last.get("train_tokens_per_second"),
            "padding_efficiency": last.get("padding_efficiency"), "mfu": last.get("mfu"),
            "peak_gpu_gib": peak / 1024 if peak is not None else None}


def train_part(args, work: Path, gpu: bool, data) -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"train_skipped": "DeepSpeed is not installed"}
    import dataclasses

    import torch

    from dolly.train import rank as training

    cfg, prepared, _, longest = data
    cfg, plan = plan_training(cfg, longest, gpu, args.smoke)
    steps = 2 * args.timed_steps  # two logging intervals: warm-up, then the timed one
    cfg = dataclasses.replace(cfg, max_steps=steps, logging_steps=args.timed_steps, eval_steps=0,
                              save_steps=0, warmup_steps=0, resume="never",
                              lr_scheduler="constant", learning_rate=1e-5,
                              batching="length_grouped")  # the padded figure
    progress(f"train: {cfg.tiny_n_layer} x {cfg.tiny_n_embd}, micro-batch "
             f"{cfg.per_device_batch_size}, checkpointing {cfg.gradient_checkpointing}, "
             f"{steps} steps; plan: {plan.verdict()}")
    kept: list[dict] = []
    as_one_rank()
    if gpu:  # the peak of this part, not of the generation model or the saved base before it
        torch.cuda.reset_peak_memory_stats()
    result = training.train(cfg, prepared, gpu, extra_callbacks=[log_keeper(kept)])
    return {
        "n_layer": cfg.tiny_n_layer, "n_embd": cfg.tiny_n_embd,
        "param_count": result["param_count"], "micro_batch": cfg.per_device_batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing, "timed_steps": args.timed_steps,
        "longest_record": longest, "final_loss": result["final_loss"],
        **timed_figures(kept),
        "planned_gpu_gib": plan.need / 2**30,
        "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                                   if gpu else None),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- LoRA / QLoRA (a2, a3) ------


def random_gptj(cfg, tok, gpu: bool):
    """A randomly initialised GPT-J of the config's tiny shape (`tiny_config`), seeded with
    cfg.seed, built directly on the device in its dtype: bf16 on the GPU, fp32 on the CPU."""
    import torch
    from transformers import GPTJForCausalLM

    from dolly.models.tiny import tiny_config

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    torch.manual_seed(cfg.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return GPTJForCausalLM(tiny_config(cfg, tok))
    finally:
        torch.set_default_dtype(default)

def save_random_base(cfg, tok, folder: Path, gpu: bool) -> Path:
    """The randomly initialised base of cfg's tiny_* shape saved in `folder` (bf16 on a GPU,
    fp32 on CPU): what a LoRA adapter's base_reference.json points to (the tiny base with
    pretrain_steps=0 is built in memory and has no folder of its own)."""
    import gc

    import torch

    progress(f"adapters: saving a random {cfg.tiny_n_layer} x {cfg.tiny_n_embd} base "
             f"({'bf16' if gpu else 'fp32'}) for LoRA and QLoRA in {folder}")
    model = random_gptj(cfg, tok, gpu)
    model.save_pretrained(str(folder))
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return folder


def plan_adapter(cfg, longest: int, gpu: bool):
    """(cfg with micro-batch and checkpointing, planned bytes or None, note or None) for one
    adapter part, from dolly.train.memory_plan (`choose`, `plan_for`) as for the full fine-tune.

    The plan figure is None, with the reason in the note, when the plan fails or does not
    handle adapters (its figure equals the full ZeRO-3 fine-tune's at the same setting); on a
    GPU the micro-batch is then `choose`'s if it chose one, else ADAPTER_FALLBACK_MICRO_BATCH
    with gradient checkpointing."""
    import dataclasses

    from dolly.train import memory_plan as mp

    if gpu:
        cfg = dataclasses.replace(cfg, precision="bf16")
    else:  # CPU: a fixed tiny setting, as for the full fine-tune
        cfg = dataclasses.replace(cfg, per_device_batch_size=2, precision="fp32")
    fallback = dataclasses.replace(cfg, per_device_batch_size=ADAPTER_FALLBACK_MICRO_BATCH,
                                   gradient_checkpointing=True)
    note = None
    try:
        shape = mp.model_shape(cfg)
        if gpu:
            chosen = mp.choose(shape, mp.setting_of(cfg, 1, longest), mp.visible_gpu()[1])
            if chosen is None:
                cfg, note = fallback, (f"the memory plan fits no micro-batch: micro-batch "
                                       f"{ADAPTER_FALLBACK_MICRO_BATCH} with checkpointing")
            else:
                cfg = dataclasses.replace(cfg, per_device_batch_size=chosen.micro_batch,
                                          gradient_checkpointing=chosen.gradient_checkpointing)
        plan = mp.plan_for(cfg, gpus_per_node=1, seq_len=longest, shape=shape)
        full = mp.plan_for(dataclasses.replace(cfg, finetune="full"), gpus_per_node=1,
                           seq_len=longest, shape=shape)
    except Exception as e:  # noqa: BLE001 (the plan is reported, never needed to train)
        why = f"memory plan failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not gpu:
            return cfg, None, why
        return fallback, None, (f"{why}; micro-batch {ADAPTER_FALLBACK_MICRO_BATCH} with "
                                "checkpointing")
    if plan.need == full.need:
        unhandled = (f"the memory plan does not handle finetune={cfg.finetune} yet: it planned "
                     f"{full.need / 2**30:.2f} GiB, the full ZeRO-3 fine-tune's figure at the "
                     "same setting")
        return cfg, None, f"{unhandled}; {note}" if note else unhandled
    return cfg, plan.need, note


def adapter_parts(args, work: Path, gpu: bool, data) -> dict:
    """(a2) LoRA and (a3) QLoRA: the base saved once, each part trained in a child process."""
    import dataclasses
    import importlib.util

    from dolly.train.handoff import encode_config

    cfg, prepared, tok, longest = data
    out: dict = {"adapter_timed_steps": args.adapter_timed_steps, "adapter_r": cfg.lora_r,
                 "adapter_target_modules": cfg.lora_target_modules}
    skipped = {}
    if args.smoke:
        skipped["qlora"] = ("--smoke runs on CPU: QLoRA's 4-bit NF4 base needs bitsandbytes "
                            "on a CUDA GPU")
    elif importlib.util.find_spec("bitsandbytes") is None:
        skipped["qlora"] = "bitsandbytes is not installed"
    base = save_random_base(cfg, tok, work / "base", gpu)
    steps = 2 * args.adapter_timed_steps
    for part in ADAPTERS:
        if part in skipped:
            out[f"{part}_skipped"] = skipped[part]
            progress(f"{part}: skipped: {skipped[part]}")
            continue
        trial, planned, note = plan_adapter(dataclasses.replace(cfg, finetune=part), longest, gpu)
        trial = dataclasses.replace(
            trial, base_model=str(base), output_dir=str(work / part), max_steps=steps,
            logging_steps=args.adapter_timed_steps, eval_steps=0, save_steps=0, warmup_steps=0,
            resume="never", lr_scheduler="constant", learning_rate=1e-5)
        progress(f"{part}: {trial.tiny_n_layer} x {trial.tiny_n_embd}, micro-batch "
                 f"{trial.per_device_batch_size}, checkpointing {trial.gradient_checkpointing}, "
                 f"{steps} steps; plan: " + (f"{planned / 2**30:.2f} GiB" if planned is not None
                                             else f"none ({note})"))
        got = run_child(args, work / f"{part}.json", encode_config(trial), prepared, "adapter")
        out.update({f"{part}_{k}": v for k, v in got.items()})
        out.update({f"{part}_micro_batch": trial.per_device_batch_size,
                    f"{part}_gradient_checkpointing": trial.gradient_checkpointing,
                    f"{part}_planned_gpu_gib": planned / 2**30 if planned is not None else None,
                    f"{part}_plan_note": note})
    return out


def run_child(args, result_file: Path, config_b64: str, prepared: Path, kind: str) -> dict:
    """This script again as one part's process (`child_main`; kind "adapter": (a2) / (a3),
    "packed": (a4)'s training): its figures, or {"skipped": why} / {"error": why}. Its output
    goes to ours; its result comes in a file."""
    spec = {"config_b64": config_b64, "prepared": str(prepared), "result": str(result_file),
            "kind": kind}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=600 if args.smoke else 2400)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {e.timeout:.0f} s"}
    seconds = time.perf_counter() - t0
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "seconds": seconds}
    return {"error": f"the child process exited with status {proc.returncode} and no result "
                     "(its output is above)"}


def child_main(args) -> None:
    """One part in this process (started by run_child) as rank 0 of one: an adapter part
    (dolly.train.rank.train with finetune=lora|qlora, MLflow and DeepSpeed unimportable) or
    (a4)'s packed training (MLflow unimportable); writes the figures (or {"skipped"/"error":
    why}) to the result file the parent named."""
    spec = json.loads(args.child)
    kind = spec.get("kind", "adapter")
    for name in BLOCKED_MODULES[kind]:  # `import mlflow` now raises ImportError
        sys.modules[name] = None
    out_file = Path(spec["result"])
    try:
        work = _adapter_train if kind == "adapter" else _packed_train
        out_file.write_text(json.dumps(work(args, spec)))
    except BaseException as e:
        out_file.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"[:2000]}))
        raise


def _adapter_train(args, spec: dict) -> dict:
    import torch

    from dolly.train import rank as training
    from dolly.train.handoff import decode_config

    cfg = decode_config(spec["config_b64"])
    gpu = torch.cuda.is_available() and not args.smoke
    if cfg.finetune == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 (missing, or its CUDA library does not load)
            return {"skipped": f"bitsandbytes is not importable: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}"}
    from transformers import TrainerCallback

    unpacked: list[int] = []

    class Count(TrainerCallback):
        """The model's parameter elements by their logical shapes: a 4-bit weight holds two
        elements a byte, so its own numel() (what the trainer's param_count and MFU count) is
        half its shape's."""

        def on_train_begin(self, _args, state, control, model=None, **kwargs):
            if model is not None:
                unpacked.append(sum(
                    p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None
                    else p.numel() for p in model.parameters()))

    kept: list[dict] = []
    as_one_rank()
    result = training.train(cfg, Path(spec["prepared"]), gpu,
                            extra_callbacks=[log_keeper(kept), Count()])
    figures = timed_figures(kept)  # lora_tokens_per_second_per_gpu, not lora_train_...
    figures["tokens_per_second_per_gpu"] = figures.pop("train_tokens_per_second_per_gpu")
    return {"n_layer": cfg.tiny_n_layer, "param_count": result["param_count"],
            "param_count_unpacked": unpacked[0] if unpacked else None,
            "trainable_param_count": result["trainable_param_count"],
            "frozen_digests_match": result["frozen_digest_before"] == result["frozen_digest_after"],
            "final_loss": result["final_loss"], **figures,
            "adapter_files": sorted(p.name for p in Path(result["final_dir"]).iterdir())}


# ------------------------------------------------------------------------ packed rows (a4) ------

PACKED_GPU_RTOL = 1e-2   # bf16 on the GPU: flash kernel (packed) vs eager attention (alone)
PACKED_CPU_ATOL = 1e-5   # fp32 in --smoke: eager attention on both sides


def packed_features(prepared: Path, n: int) -> list[dict]:
    """The first n prepared training records as collator features."""
    from dolly.data import load_prepared

    train_df, _, _ = load_prepared(prepared)
    out = []
    for _, row in train_df.head(n).iterrows():
        f = {"input_ids": [int(t) for t in row["input_ids"]],
             "response_start": int(row["response_start"])}
        if "label_spans" in row and row["label_spans"] is not None:
            f["label_spans"] = [int(t) for t in row["label_spans"]]
        out.append(f)
    return out


def record_spans(batch: dict, feats: list[dict]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each feature's record in a PackingCollator batch, in feature order:
    a record starts where its position id is 0 and is found by its token ids."""
    pos, ids = batch["position_ids"], batch["input_ids"]
    where: dict[tuple, list] = {}
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        for a, b in zip(starts, starts[1:]):
            where.setdefault(tuple(ids[r, a:b].tolist()), []).append((r, a, b))
    return [where[tuple(f["input_ids"])].pop(0) for f in feats]


def flash_kernel_names(model, call: dict) -> list[str]:
    """The CUDA kernels of one forward of `model(**call)` under torch.profiler whose names
    contain "flash" (case-insensitive), each cut to 120 characters."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**call)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if "flash" in e.key.lower()}
    return sorted(n[:120] for n in names)


def packed_check(args, data, gpu: bool) -> dict:
    """(a4)'s check: per-record loss packed (varlen attention where a kernel runs) vs each
    record alone (eager), the varlen call count, the profiler's flash kernels, the control."""
    import gc

    import torch

    from dolly.data import PackingCollator, collator_for
    from dolly.data.collator import IGNORE_INDEX
    from dolly.models import labelled_loss, varlen
    from dolly.prompts import get_format

    cfg, prepared, tok, _ = data
    padded = collator_for(get_format(cfg.prompt_format, tok), tok)
    feats = packed_features(prepared, args.packed_records)
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    progress(f"packed: {len(feats)} records alone and packed, a random GPT-J "
             f"{cfg.tiny_n_layer} x {cfg.tiny_n_embd} ({dtype}) on {device}")
    model = random_gptj(cfg, tok, gpu).eval()
    model.config.use_cache = False  # as training calls it
    assert labelled_loss.install(model)

    def loss(**call) -> float:  # labelled-only loss: the mean over the labels given
        with torch.no_grad():
            return model(**{k: v.to(device) for k, v in call.items()}).loss.float().item()

    alone = []
    for f in feats:  # eager attention: varlen is not enabled yet
        one = padded([f])
        alone.append(loss(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                          labels=one["labels"]))
    out: dict = {"packed_records": len(feats), "packed_labelled_loss": True}
    kernel = varlen.enable(model) if gpu else None
    if kernel is None:
        try:
            varlen.find_kernel(model.config.n_embd // model.config.n_head)
            why = "no varlen kernel"
        except LookupError as e:
            why = str(e)
        out["packed_varlen_skipped"] = (f"{why}: the packed path ran with eager attention "
                                        "(transformers' packed-sequence mask)")
        progress(f"packed: varlen attention skipped: {why}")
    out["packed_attention"] = f"varlen ({kernel})" if kernel else "eager"
    out["packed_varlen_kernel"] = kernel
    batch = PackingCollator(padded.pad_token_id, padded.response_key_id, cfg.max_length)(feats)
    batch.pop("num_records")
    out.update(packed_rows=int(batch["input_ids"].shape[0]),
               packed_width=int(batch["input_ids"].shape[1]),
               packed_real_tokens=int(batch.pop("num_real_tokens")))
    spans = record_spans(batch, feats)

    def per_record(**extra) -> list[float]:
        got = []
        for r, a, b in spans:  # one record's labels kept: its mean loss
            labels = torch.full_like(batch["labels"], IGNORE_INDEX)
            labels[r, a:b] = batch["labels"][r, a:b]
            got.append(loss(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            labels=labels, **extra))
        return got

    def diff(got: list[float]) -> tuple[float, float]:  # (max absolute, max relative)
        return (max(abs(x - y) for x, y in zip(got, alone)),
                max(abs(x - y) / abs(y) for x, y in zip(got, alone)))

    calls = varlen.calls()
    packed = per_record()
    out["packed_varlen_calls"] = varlen.calls() - calls
    # control: an all-ones mask lets the records see each other (the varlen layers find it
    # differs from their segments and run eager attention, which mixes the records)
    control = per_record(attention_mask=torch.ones_like(batch["input_ids"]))
    tolerance = PACKED_GPU_RTOL if gpu else PACKED_CPU_ATOL
    which = 1 if gpu else 0  # the tolerance is relative on the GPU, absolute in --smoke
    (out["packed_loss_max_abs_diff"], out["packed_loss_max_rel_diff"]) = got = diff(packed)
    (out["packed_control_max_abs_diff"], out["packed_control_max_rel_diff"]) = mixed = diff(control)
    out.update(packed_loss_tolerance=tolerance,
               packed_loss_tolerance_kind="relative (bf16)" if gpu else "absolute (fp32)",
               packed_loss_ok=got[which] <= tolerance,
               packed_control_separates=mixed[which] > tolerance,
               packed_mean_loss_alone=sum(alone) / len(alone))
    if kernel:
        call = {"input_ids": batch["input_ids"].to(device),
                "position_ids": batch["position_ids"].to(device),
                "labels": batch["labels"].to(device)}
        try:
            out["packed_flash_kernels"] = flash_kernel_names(model, call)
        except Exception as e:  # noqa: BLE001 (the profiler is evidence, not the check)
            out["packed_flash_kernels_error"] = f"{type(e).__name__}: {e}"[:300]
    progress(f"packed: loss max rel diff {out['packed_loss_max_rel_diff']:.2e} "
             f"(ok: {out['packed_loss_ok']}), control {out['packed_control_max_rel_diff']:.2e}, "
             f"attention {out['packed_attention']}, varlen calls {out['packed_varlen_calls']}")
    del model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


def plan_packed(cfg, longest: int, gpu: bool, kernel: bool):
    """(cfg for (a4)'s training, planned bytes or None, note or None): (a)'s layers and records
    per optimizer step, batching=packed, gradient checkpointing off at the largest power-of-two
    micro-batch (<= (a)'s) the memory plan fits without it (see the module docstring), with
    gradient accumulation making up (a)'s micro-batch; (a)'s setting where none fits."""
    import dataclasses

    from dolly.train import memory_plan as mp

    padded, plan = plan_training(cfg, longest, gpu, not gpu)
    cfg = dataclasses.replace(padded, batching="packed")
    if not gpu:  # CPU: half (a)'s tiny micro-batch, accumulated twice (the GPU path's shape)
        b = max(1, padded.per_device_batch_size // 2)
        return dataclasses.replace(cfg, per_device_batch_size=b, gradient_checkpointing=False,
                                   gradient_accumulation_steps=max(
                                       1, padded.per_device_batch_size // b)), plan.need, None
    seq = longest if kernel else max(cfg.max_length, longest)
    gpu_bytes = mp.visible_gpu()[1]
    b = padded.per_device_batch_size
    while b >= 1:
        setting = dataclasses.replace(mp.setting_of(cfg, 1, seq), micro_batch=b,
                                      gradient_checkpointing=False)
        trial = mp.make_plan(plan.shape, setting, gpu_bytes, suggest=False)
        if trial.fits:
            steps = max(1, padded.per_device_batch_size // b)
            return dataclasses.replace(cfg, per_device_batch_size=b, gradient_checkpointing=False,
                                       gradient_accumulation_steps=steps), trial.need, None
        b //= 2
    note = (f"the memory plan fits no micro-batch without gradient checkpointing at {seq} "
            f"tokens: (a)'s micro-batch {padded.per_device_batch_size} with checkpointing")
    return cfg, plan.need, note


def packed_train(args, work: Path, gpu: bool, data, kernel: bool) -> dict:
    """(a4)'s training in a child process: `packed_train_*` figures, or the reason it did not
    run."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"packed_train_skipped": "DeepSpeed is not installed"}
    import dataclasses

    from dolly.train.handoff import encode_config

    cfg, prepared, _, longest = data
    cfg, planned, note = plan_packed(cfg, longest, gpu, kernel)
    steps = 2 * args.packed_timed_steps
    cfg = dataclasses.replace(cfg, output_dir=str(work / "packed"), max_steps=steps,
                              logging_steps=args.packed_timed_steps, eval_steps=0, save_steps=0,
                              warmup_steps=0, resume="never", lr_scheduler="constant",
                              learning_rate=1e-5)
    progress(f"packed train: {cfg.tiny_n_layer} x {cfg.tiny_n_embd}, micro-batch "
             f"{cfg.per_device_batch_size} x {cfg.gradient_accumulation_steps} accumulated, "
             f"checkpointing {cfg.gradient_checkpointing}, {steps} steps; plan: "
             f"{planned / 2**30:.2f} GiB" + (f" ({note})" if note else ""))
    got = run_child(args, work / "packed.json", encode_config(cfg), prepared, "packed")
    out = {f"packed_train_{k}": v for k, v in got.items()}
    out.update(packed_train_micro_batch=cfg.per_device_batch_size,
               packed_train_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
               packed_train_gradient_checkpointing=cfg.gradient_checkpointing,
               packed_train_planned_gpu_gib=planned / 2**30, packed_train_plan_note=note,
               packed_timed_steps=args.packed_timed_steps)
    return out


def _packed_train(args, spec: dict) -> dict:
    """(a4)'s training in this child process: dolly.train.rank.train with batching=packed and
    varlen attention enabled when training begins."""
    import torch
    from transformers import TrainerCallback

    from dolly.models import varlen
    from dolly.train import rank as training
    from dolly.train.handoff import decode_config

    cfg = decode_config(spec["config_b64"])
    gpu = torch.cuda.is_available() and not args.smoke
    chosen: dict = {}

    class Varlen(TrainerCallback):
        """Varlen attention on the model the Trainer trains (after rank.train built it)."""

        def on_train_begin(self, _args, state, control, model=None, **kwargs):
            if model is None or "kernel" in chosen:
                return
            chosen["kernel"] = varlen.enable(model) if gpu else None
            chosen["calls"] = varlen.calls()
            if chosen["kernel"] is None:
                try:
                    varlen.find_kernel(cfg.tiny_n_embd // cfg.tiny_n_head)
                    chosen["skipped"] = "no varlen kernel"
                except LookupError as e:
                    chosen["skipped"] = str(e)
            progress(f"packed train: varlen attention: {chosen['kernel'] or chosen['skipped']}")

    kept: list[dict] = []
    as_one_rank()
    result = training.train(cfg, Path(spec["prepared"]), gpu,
                            extra_callbacks=[log_keeper(kept), Varlen()])
    figures = timed_figures(kept)
    figures["tokens_per_second_per_gpu"] = figures.pop("train_tokens_per_second_per_gpu")
    return {"n_layer": cfg.tiny_n_layer, "param_count": result["param_count"],
            "final_loss": result["final_loss"], **figures,
            "varlen_kernel": chosen.get("kernel"), "varlen_skipped": chosen.get("skipped"),
            "varlen_calls": varlen.calls() - chosen.get("calls", 0)}


def packed_part(args, work: Path, gpu: bool, data) -> dict:
    """(a4): the check in this process, then the training in a child process."""
    out = packed_check(args, data, gpu)
    if gpu:  # the check's model gone before the training process wants the GPU
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    out.update(packed_train(args, work, gpu, data, kernel=out["packed_varlen_kernel"] is not None))
    return out


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
    if args.child:
        return child_main(args)
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
            data = training_data(args, Path(tmp))
            # the adapter parts' processes before ZeRO-3 in this one: they need the GPU free
            if not args.skip_adapters:
                result.update(adapter_parts(args, Path(tmp), gpu, data))
            if not args.skip_packed:  # its training's child process also before ZeRO-3 here
                result.update(packed_part(args, Path(tmp), gpu, data))
            if not args.skip_full:
                result.update(train_part(args, Path(tmp), gpu, data))
    packed, padded = (result.get("packed_train_tokens_per_second_per_gpu"),
                      result.get("train_tokens_per_second_per_gpu"))
    if packed and padded:
        result["packed_over_padded_tokens_per_second"] = packed / padded
    result["seconds"] = time.perf_counter() - t0
    finish(result)
    if result.get("packed_loss_ok") is False:
        sys.exit("error: packed records' losses differ from their losses alone beyond "
                 f"{result['packed_loss_tolerance']:g} (packed_loss_max_abs_diff "
                 f"{result['packed_loss_max_abs_diff']:.3g}, packed_loss_max_rel_diff "
                 f"{result['packed_loss_max_rel_diff']:.3g})")


if __name__ == "__main__":
    main()
