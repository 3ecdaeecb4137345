"""The train step's rank side: one process per rank, started by dolly.train.launch.

`python -m dolly.train.rank --config_b64 ... --device gpu|cpu --prepared ...` (the DeepSpeed
launcher) or `torchrun .../dolly/train/rank.py ...` (launcher=spark) runs the Hugging Face
Trainer with DeepSpeed ZeRO-3 (or DDP for adapters), completion-only labels (dolly.data.collator),
packed rows (dolly.data.packing) or padded batches (dolly.data.batching), logits only at labelled
positions (dolly.models.labelled_loss), and rank 0 logging to the parent's MLflow run through the client API (it never
starts, resumes or ends a run). At the end all ranks take part in gathering the consolidated
weights into <output_dir>/final, and rank 0 writes train_result.json for the parent. The device
is the parent's decision (`--device`); a rank never decides it again. Its command line, the
config on it and the result file are dolly.train.handoff; a rank never imports the launchers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import threading
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file (torchrun under Spark):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the project, not dolly/train/

from dolly.config import Config
from dolly.errors import DollyError
from dolly.train.handoff import FINAL_DIR, decode_config, rank_parser, write_result

PROBE_RECORDS = 8  # the fixed batch (first test records) whose loss train_result.json records


def _cpu_deepspeed_state(timeout_s: int) -> None:
    """Make accelerate (and so the Trainer) run DeepSpeed on CPU processes over gloo.

    accelerate enables DeepSpeed only when a GPU-type device exists; on CPU the Trainer would
    see world size 1 while DeepSpeed sees all ranks. Creating the PartialState ourselves with
    ACCELERATE_USE_DEEPSPEED set gives DistributedType.DEEPSPEED over gloo; TrainingArguments
    then reuses it (accelerator_config use_configured_state). Measured with transformers 5.17
    and 5.24, accelerate 1.15, deepspeed 0.19.8 on 2 CPU ranks: without this the Trainer's world
    size is 1 while DeepSpeed's is 2, and DeepSpeed's batch-size check fails ("train_batch_size
    is not equal to micro_batch_per_gpu * gradient_acc_step * world_size"); `use_cpu=True`
    turns DeepSpeed off while `zero.Init` still partitions. `timeout` bounds every collective.
    """
    import deepspeed.ops
    from accelerate import PartialState

    # DeepSpeed's shared-memory op serves inference all-reduce only; marking it unavailable
    # skips a ~2 minute JIT compile on a fresh machine. Training collectives use gloo.
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=timedelta(seconds=timeout_s))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def _cpu_ddp_state(timeout_s: int) -> None:
    """The process group of CPU ranks training adapters: plain data parallel over gloo, created
    here so that `timeout` bounds every collective, as _cpu_deepspeed_state does for ZeRO-3
    (TrainingArguments reuses it: accelerator_config use_configured_state)."""
    from accelerate import PartialState

    # cpu=True: accelerate's MULTI_CPU (DDP over gloo) exists only for a CPU state; without it
    # the Trainer sees no distributed state, wraps nothing in DDP, and each rank would train
    # alone (measured: transformers warned "parallel_mode != ParallelMode.DISTRIBUTED").
    import torch

    state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=timeout_s))
    # accelerate names the device cpu:<local rank>; the Trainer then resumes with
    # torch.load(map_location=that device), and torch cannot restore storages to "cpu:1"
    # (measured: "don't know how to restore data location ... (tagged with cpu:0)"). One CPU.
    state.device = torch.device("cpu")


def deepspeed_config(cfg: Config, gpu: bool, load_universal: bool = False) -> dict[str, Any]:
    """The ZeRO-3 JSON ("auto" values filled by the Trainer) plus offload from the config, and
    `checkpoint.load_universal` when the resumed checkpoint is a universal one.

    The JSON names no optimizer or scheduler: the Trainer's torch AdamW and its schedule
    (cosine, linear, ...) are used, which need no compiled op. With optimizer offload DeepSpeed's
    CPU Adam is chosen instead (a torch optimizer stepping on CPU would be far slower).
    """
    ds = json.loads(Path(cfg.deepspeed_config).read_text())
    zero = ds.setdefault("zero_optimization", {})
    if gpu and cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    if gpu and cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if not gpu:
        # gloo on CPU is latency-bound and has no streams to overlap with: one gradient bucket
        # and one prefetch bucket per step instead of ~50 hidden^2-sized ones ("auto") took the
        # tiny profile from 1.36 to 1.16 s/step (2 ranks, 2 cores), with the same loss.
        zero.update(overlap_comm=False, reduce_bucket_size=500_000_000,
                    stage3_prefetch_bucket_size=500_000_000)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def training_arguments(cfg: Config, gpu: bool, load_universal: bool = False):
    """The Trainer's TrainingArguments for this rank: batch sizes, schedule, precision, the
    ZeRO-3 config (`deepspeed_config`), checkpointing and logging intervals from `cfg`."""
    from transformers import TrainingArguments

    extra = {} if gpu else {"accelerator_config": {"use_configured_state": True}}
    if cfg.adapters:  # plain data parallel (DDP): see _cpu_ddp_state and docs/lora.md
        extra.update(ddp_backend=None if gpu else "gloo", ddp_find_unused_parameters=False)
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.peak_learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",  # multi-tensor (foreach) on GPU; no compiled op needed
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        prediction_loss_only=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=None if cfg.adapters else deepspeed_config(cfg, gpu, load_universal),
        ddp_timeout=cfg.rank_timeout_s,
        remove_unused_columns=False,  # the collator needs response_start
        dataloader_num_workers=0,
        dataloader_pin_memory=gpu,
        report_to="none",  # MLflow is logged by RankZeroMlflow, from rank 0 only
        **extra,
    )


class PreparedDataset:
    """A prepared split as a map-style dataset of {input_ids, response_start}."""

    def __init__(self, df):
        self.ids = list(df["input_ids"])
        self.starts = df["response_start"].to_numpy()
        self.lengths = df["length"].to_numpy()
        self.spans = list(df["label_spans"]) if "label_spans" in df else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.ids[i], "response_start": int(self.starts[i])}
        if self.spans is not None:
            item["label_spans"] = self.spans[i]
        return item


def _flops_inputs(model, precision: str, world: int, gpu: bool) -> dict[str, Any]:
    import torch

    from dolly.train import throughput
    from dolly.train.trainer import param_numel

    total = sum(param_numel(p) for p in model.parameters())  # a tied weight counts once
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    inp_w = getattr(inp, "weight", None)
    if inp_w is None:  # peft's wrapper of an embedding with trainable token rows
        inp_w = inp.token_adapter.base_layer.weight
    out_w = getattr(out, "weight", None) if out is not None else None
    if out is not None and out_w is None:
        out_w = out.token_adapter.base_layer.weight
    # the input embedding is a lookup, not a matmul, unless the LM head shares its weight
    embed = 0 if out_w is not None and out_w is inp_w else param_numel(inp_w)
    # frozen matmul weights (LoRA's base) need no weight gradient: 4 FLOPs a token, not 6
    frozen = sum(param_numel(p) for p in model.parameters() if not p.requires_grad) - \
        (0 if inp_w.requires_grad or embed == 0 else embed)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    return {"matmul_params": total - embed, "n_layer": int(model.config.num_hidden_layers),
            "frozen_matmul_params": max(frozen, 0) if model_is_adapted(model) else 0,
            "width": int(model.config.hidden_size),
            "peak_per_device": throughput.peak_flops(device, precision), "n_devices": world}


def frozen_digest(model) -> str:
    """sha256 over every frozen parameter (name, dtype, shape, bytes), in name order: equal
    before and after training when only the adapters changed. Read on the CPU (a 16-bit 6B base:
    about 12 GB hashed once at each end of the run)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_is_adapted(model) -> bool:
    """True for a peft model (LoRA adapters on a frozen base)."""
    return hasattr(model, "peft_config")


def probe_loss(engine, collator, records: PreparedDataset, device) -> float:
    """Loss of the model on a fixed batch (the first test records); all ranks must call it."""
    import torch

    batch = collator([records[i] for i in range(min(PROBE_RECORDS, len(records)))])
    batch = {k: v.to(device) for k, v in batch.items()}
    engine.eval()
    with torch.no_grad():
        return float(engine(**batch).loss.float().item())


def train(cfg: Config, prepared: Path, gpu: bool, run_id: str = "",
          load_universal: bool = False, extra_callbacks: list | None = None) -> dict[str, Any] | None:
    """One rank's whole job on the device the parent chose (`gpu`); `load_universal`: resume
    cfg.resume as a universal checkpoint; `extra_callbacks`: more TrainerCallbacks (e.g. a
    benchmark's log keeper). Returns the result on rank 0 (None elsewhere).
    Raises DollyError when told to use a GPU this rank cannot see."""
    import torch
    from transformers import GenerationConfig

    from dolly.data import collator_for, load_prepared, train_collator_for
    from dolly.models import labelled_loss, load_base_model
    from dolly.prompts import get_format
    from dolly.tokenizer import load_tokenizer
    from dolly.train.trainer import (DollyTrainer, PartitionRecord, RankZeroMlflow, ScheduleGuard,
                                     param_numel, rank_and_world)

    rank, world = rank_and_world()
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per call site
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    if gpu and not torch.cuda.is_available():
        raise DollyError(f"rank {rank} was started for a GPU but sees none")
    if cfg.finetune == "qlora":
        from dolly.models.lora import require_qlora_device

        require_qlora_device(cfg, gpu and torch.cuda.is_available())
    if not gpu:
        (_cpu_ddp_state if cfg.adapters else _cpu_deepspeed_state)(cfg.rank_timeout_s)
    args = training_arguments(cfg, gpu, load_universal)  # before the model: ZeRO-3 partitions it while loading

    tok = load_tokenizer(str(prepared / "tokenizer"))
    tok.padding_side = "left"  # what batched generation from the saved model needs;
    tok.init_kwargs["padding_side"] = "left"  # init_kwargs is what save_pretrained writes
    fmt = get_format(cfg.prompt_format, tok)
    train_df, test_df, _ = load_prepared(prepared)
    test_df = test_df.sort_values("length", kind="stable")  # eval batches of similar length
    train_ds, test_ds = PreparedDataset(train_df), PreparedDataset(test_df)
    collator = collator_for(fmt, tok)  # padded: evaluation, the probe loss
    train_collator = train_collator_for(cfg, fmt, tok)  # packed rows with batching=packed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    model = load_base_model(cfg, tok, dtype=dtype, pretrain_missing=False,  # the parent built it
                            grow_embeddings=not cfg.adapters,
                            quantize_4bit=cfg.finetune == "qlora")
    model.config.use_cache = False  # no generation during training
    model.config.pad_token_id = tok.pad_token_id
    trainable = None
    if cfg.adapters:
        from dolly.models.lora import add_adapters, trainable_counts

        model = add_adapters(model, cfg, tok)
        trainable = trainable_counts(model)[0]
        frozen_before = frozen_digest(model) if rank == 0 else ""
        if rank == 0:
            print(f"train: {cfg.finetune}: {trainable:,} trainable adapter parameters (r="
                  f"{cfg.lora_r}, alpha={cfg.lora_alpha:g}, {cfg.lora_target_modules}); the "
                  f"base's {trainable_counts(model)[1] - trainable:,} are frozen", flush=True)

    if not labelled_loss.install(model):  # logits only where the loss counts
        known = ", ".join(sorted(labelled_loss.PLAIN_HEAD_TYPES))
        if cfg.batching == "packed":  # the same records per step, each in a padded row
            train_collator = collator
        if rank == 0:
            print(f"train: {model.config.model_type} is not among the architectures whose "
                  f"packing and labelled-only logits are tested ({known}): "
                  f"{'padded rows (as batching=random) and ' if cfg.batching == 'packed' else ''}"
                  "the model's own logits for every position", flush=True)
    elif cfg.batching == "packed" and gpu:
        from dolly.models import varlen

        kernel = varlen.enable(model)  # GPT-J: its flash path would mix packed records
        if rank == 0 and kernel:
            print(f"train: packed rows: GPT-J attention through {kernel}", flush=True)
        elif rank == 0 and model.config.model_type == "gptj":
            try:
                varlen.find_kernel(int(model.config.n_embd) // int(model.config.n_head))
                why = "no kernel"
            except LookupError as e:
                why = str(e)
            print(f"train: packed rows: GPT-J attention stays eager ({why}); records are kept "
                  "apart by its mask, at eager attention's speed and memory", flush=True)

    resumed_from = None if cfg.resume == "never" else cfg.resume
    resumed_step = 0
    guard = []
    if resumed_from:
        state = json.loads((Path(resumed_from) / "trainer_state.json").read_text())
        resumed_step = int(state["global_step"])
        guard = [ScheduleGuard(resumed_from, state.get("max_steps"), cfg.lr_scheduler)]
        if rank == 0:
            print(f"train: resuming from {resumed_from} (step {resumed_step})", flush=True)
    flops = _flops_inputs(model, cfg.precision, world, gpu)
    params = {"zero_stage": 0 if cfg.adapters else 3, "world_size": world,
              "trainable_param_count": trainable if trainable is not None else "all", "effective_batch_size":
              cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world,
              "param_count": sum(param_numel(p) for p in model.parameters()),
              "resumed_from_step": resumed_step, "device": "gpu" if gpu else "cpu"}
    callbacks = guard + ([] if cfg.adapters else [PartitionRecord()]) + ([RankZeroMlflow(run_id, params)] if run_id else [])
    callbacks += list(extra_callbacks or [])
    trainer = DollyTrainer(
        model=model, args=args, train_dataset=train_ds,
        eval_dataset=test_ds if cfg.eval_steps else None, data_collator=train_collator,
        processing_class=tok, callbacks=callbacks, dolly_cfg=cfg, flops=flops,
        eval_collator=collator)

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resumed_from)
    step = trainer.state.global_step
    evaluated = any("eval_loss" in h and h.get("step") == step for h in trainer.state.log_history)
    if cfg.eval_steps and not evaluated:
        trainer.evaluate()  # a last eval_loss for the final weights

    final = Path(cfg.output_dir) / FINAL_DIR
    labelled_loss.uninstall(model)
    model.config.use_cache = True
    # Generation stops at `### End` (Dolly v1) or the template's end of turn. Set after train(),
    # which adds the tokenizer's eos to the eos ids (transformers' align_special_tokens).
    end_ids = fmt.end_ids(tok)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=end_ids[0] if len(end_ids) == 1 else end_ids,
        pad_token_id=tok.pad_token_id)
    trainer.save_model(str(final))  # every rank: gathers the 16-bit weights, rank 0 writes
    # (adapters: rank 0 writes adapter_config.json and adapter_model.safetensors only)
    if cfg.adapters and rank == 0:
        from dolly.models import base_location
        from dolly.models.lora import write_base_reference

        model.generation_config.save_pretrained(str(final))  # the adapter alone has none
        write_base_reference(final, *base_location(cfg, tok))
    probe = probe_loss(trainer.model_wrapped, collator, PreparedDataset(test_df.sort_index()), args.device)
    if rank != 0:
        return None
    (final / "training_args.bin").unlink(missing_ok=True)  # a pickle the model does not need
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "global_step": step, "max_steps": trainer.state.max_steps,
        "resumed_from_step": resumed_step, "resumed_from": resumed_from,
        "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
        # not the Trainer's training_loss: it divides this run's losses by all steps, resumed too
        "probe_loss": probe, "probe_records": PROBE_RECORDS,
        "seconds": round(time.perf_counter() - t0, 3), "world_size": world,
        "precision": cfg.precision, "final_dir": str(final.resolve()),
        "param_count": params["param_count"],
    }
    if cfg.adapters:  # the base is frozen: its weights must come out as they went in
        result.update(finetune=cfg.finetune, trainable_param_count=trainable,
                      frozen_digest_before=frozen_before, frozen_digest_after=frozen_digest(model))
    write_result(cfg, result)
    return result


def _exit_with_parent(rank: int) -> None:
    """End this process when its launcher (torchrun) is gone: pyspark's distributor does not end
    ranks left behind when its Spark task is killed. The kernel's parent-death signal also ends
    a rank that hangs; the thread covers a parent gone before that was set, and other systems."""
    from dolly.train.torchrun_guard import die_with_parent

    parent = os.getppid()
    die_with_parent()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        print(f"\nrank {rank} failed: its launcher (pid {parent}) is gone", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> None:
    a = rank_parser().parse_args(argv)
    cfg = decode_config(a.config_b64)
    if a.deepspeed_config:
        cfg = dataclasses.replace(cfg, deepspeed_config=a.deepspeed_config)
    run_id = os.environ.pop("MLFLOW_RUN_ID", "")  # nothing in this process may resume the run
    run_id = a.mlflow_run_id or run_id
    if a.mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = a.mlflow_tracking_uri
    gpu = a.device == "gpu"
    if not gpu:  # before DeepSpeed is imported: it picks its accelerator once
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks on a GPU machine (num_gpus=0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = int(os.environ.get("RANK", "0"))
    if a.exit_with_parent:
        _exit_with_parent(rank)
    prepared = Path(a.prepared)
    if not prepared.is_dir() and a.prepared_uri:
        from dolly.tracking import local_path

        prepared = local_path(a.prepared_uri, "prepared data")
    try:
        train(cfg, prepared, gpu, run_id if rank == 0 else "", a.load_universal)
    except BaseException as e:
        print(f"\nrank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    from dolly import cli

    cli.run(main)
