"""The train step: launch the ranks (parent side) and fine-tune with ZeRO-3 (worker side).

Parent (`steps/train.py`, the process that owns the MLflow run):
  `plan()` resolves devices, precision, world size and whether to resume (a fingerprint file in
  output_dir keeps a checkpoint of other data or settings from being resumed silently);
  `launch()` starts the ranks with the DeepSpeed launcher and waits. The launcher ends every
  local rank as soon as one exits non-zero, and collectives time out after `rank_timeout_s`, so
  a dead or stuck rank ends the step with a non-zero exit instead of a hang.

Worker (`python -m dolly.training`, one process per rank): the Hugging Face Trainer with
DeepSpeed ZeRO-3, completion-only labels (dolly.collator), length-grouped batches
(dolly.batching), and rank 0 logging to the parent's MLflow run through the client API (it never
starts, resumes or ends a run). At the end all ranks take part in gathering the consolidated
weights into <output_dir>/final, and rank 0 writes train_result.json for the parent.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

from dolly.config import Config
from dolly.errors import ConfigError, DollyError

FINAL_DIR = "final"
RESULT_FILE = "train_result.json"
FINGERPRINT_FILE = "fingerprint.json"
PROBE_RECORDS = 8  # the fixed batch (first test records) whose loss train_result.json records
# Settings that make a checkpoint belong to another experiment; the duration (epochs,
# max_steps) is left out so that a run can be extended or finished in several goes.
RESUME_FIELDS = ("base_model", "tokenizer", "tiny_n_layer", "tiny_n_embd", "tiny_n_head",
                 "tiny_rotary_dim", "tiny_n_positions", "seed", "per_device_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_steps",
                 "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "batching",
                 "length_group_batches")


# ============================================================================ parent side ======

@dataclass
class Plan:
    """What the parent decided before launching: the config the ranks get, and why."""

    cfg: Config                # precision resolved; resume = a checkpoint path or 'never'
    gpu: bool
    procs_per_node: int
    world_size: int
    resumed_from: str | None   # checkpoint path or None
    notes: list[str]


def _visible_gpus() -> list[int]:
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if env:
        return [int(x) for x in env.split(",") if x.strip().isdigit()] or list(
            range(torch.cuda.device_count()))
    return list(range(torch.cuda.device_count()))


def resolve_precision(cfg: Config, gpu: bool) -> str:
    """'auto' -> bf16 on GPUs that have it, fp16 on older GPUs (V100), fp32 on CPU."""
    if not gpu:
        if cfg.precision == "fp16":
            raise ConfigError("config key 'precision': 'fp16' needs a GPU (use fp32 or bf16 on CPU)")
        return "fp32" if cfg.precision == "auto" else cfg.precision
    if cfg.precision != "auto":
        return cfg.precision
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _hostfile_world_size(cfg: Config) -> int:
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(cfg.hostfile)
    if not pool:
        raise ConfigError(f"config key 'hostfile': '{cfg.hostfile}' lists no hosts")
    hosts = list(pool.values())[: cfg.num_nodes]
    if len(hosts) < cfg.num_nodes:
        raise ConfigError(f"config key 'num_nodes': {cfg.num_nodes} nodes asked, hostfile "
                          f"'{cfg.hostfile}' lists {len(hosts)}")
    return sum(min(s, cfg.num_gpus) if cfg.num_gpus > 0 else s for s in hosts)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fingerprint(cfg: Config, data_hash: str, world_size: int, precision: str) -> dict[str, Any]:
    fields = {k: getattr(cfg, k) for k in RESUME_FIELDS}
    fields.update(data_hash=data_hash, world_size=world_size, precision=precision)
    return fields


def _checkpoints(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("checkpoint-*") if p.is_dir()),
                  key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def plan(cfg: Config, prepared: Path) -> Plan:
    """Devices, precision, world size and the resume decision; prepares output_dir."""
    from dolly import data

    _, _, summary = data.load_prepared(prepared)
    ds_path = Path(cfg.deepspeed_config)
    if not ds_path.is_file():
        raise ConfigError(f"config key 'deepspeed_config': '{ds_path}' does not exist")
    stage = json.loads(ds_path.read_text()).get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"config key 'deepspeed_config': '{ds_path}' has ZeRO stage {stage}, "
                          "the train step runs stage 3")
    notes: list[str] = []
    gpus = _visible_gpus() if cfg.num_gpus != 0 else []
    gpu = bool(gpus)
    if cfg.hostfile:
        gpu = cfg.num_gpus != 0  # the nodes of a hostfile are GPU nodes; ranks check themselves
        procs = cfg.num_gpus if cfg.num_gpus > 0 else max(len(gpus), 1)
        world = _hostfile_world_size(cfg)
    elif gpu:
        if cfg.num_gpus > len(gpus):
            raise ConfigError(f"config key 'num_gpus': {cfg.num_gpus} asked, {len(gpus)} visible")
        procs = cfg.num_gpus if cfg.num_gpus > 0 else len(gpus)
        world = procs * cfg.num_nodes
    else:
        if cfg.num_gpus > 0:
            raise ConfigError(f"config key 'num_gpus': {cfg.num_gpus} asked but no GPU is visible "
                              f"(on CPU the step runs cpu_ranks={cfg.cpu_ranks} processes)")
        procs = cfg.cpu_ranks
        world = procs * cfg.num_nodes
        if cfg.offload_optimizer or cfg.offload_params:
            notes.append("offload settings ignored: training already runs on CPU")
    precision = resolve_precision(cfg, gpu)
    port = cfg.master_port
    if cfg.num_nodes == 1 and not cfg.hostfile and not _port_free(port):
        port = _free_port()  # another run on this machine holds it; one node needs no fixed port
        notes.append(f"master_port {cfg.master_port} is in use on this machine: using {port}")

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, summary.get("data_hash", ""), world, precision)
    fp_file = out / FINGERPRINT_FILE
    old = json.loads(fp_file.read_text()) if fp_file.is_file() else None
    stale = _checkpoints(out)
    resumed_from = None
    if cfg.resume == "auto":
        # the Trainer writes trainer_state.json last: a checkpoint without it is incomplete
        last = next((p for p in reversed(stale) if (p / "trainer_state.json").is_file()), None)
        if last and old == fp:
            resumed_from = str(last)
        elif stale:
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fp.items()
                                if old.get(k) != v) if old else "no fingerprint file"
            notes.append(f"resume: {out} holds checkpoints of other data or settings ({changed}); "
                         f"starting fresh and removing {', '.join(p.name for p in stale)}")
    elif cfg.resume == "never":
        if stale:
            notes.append(f"resume=never: removing {', '.join(p.name for p in stale)} from {out}")
    else:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"config key 'resume': '{path}' is not a checkpoint folder "
                              "(no trainer_state.json)")
        resumed_from = str(path)
        if old != fp:
            notes.append(f"resume: {path} was not written with these settings; resuming it as asked")
    if resumed_from is None:
        for p in stale:  # left in place they would outrank the new run's checkpoints
            shutil.rmtree(p, ignore_errors=True)  # nodes sharing output_dir may race here
    for leftover in (out / FINAL_DIR, out / RESULT_FILE):  # never report a previous run's result
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink(missing_ok=True)
    fp_file.write_text(json.dumps(fp, indent=2, sort_keys=True))
    resolved = dataclasses.replace(cfg, precision=precision, resume=resumed_from or "never",
                                   master_port=port)
    return Plan(resolved, gpu, procs, world, resumed_from, notes)


@contextmanager
def exclusive(cfg: Config) -> Iterator[None]:
    """Hold output_dir for the whole step: a second train on the same folder (e.g. the default
    outputs/train of another `mlflow run` in the same project) fails at once instead of
    deleting or mixing the first one's checkpoints. Released when the process ends."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.node_rank != 0:  # nodes started one by one may share output_dir: node 0 holds it
        yield
        return
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DollyError(f"output_dir '{out}' is in use by another train run; wait for it "
                             "or pass -P output_dir=<another folder>") from None
        yield


_DEFAULTS = Config().to_dict()


def _encode(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def launch_command(p: Plan, prepared: Path, prepared_uri: str) -> list[str]:
    """The DeepSpeed launcher command that starts this node's ranks of `dolly.training`."""
    cfg = p.cfg
    changed = {k: v for k, v in cfg.to_dict().items() if v != _DEFAULTS[k]}  # a short argv
    worker = ["--module", "dolly.training", "--config_b64", _encode(changed),
              "--prepared", str(Path(prepared).resolve()), "--prepared_uri", prepared_uri]
    py = [sys.executable, "-u", "-m"]
    if cfg.hostfile:  # the runner reaches the other nodes (pdsh by default) from this one
        cmd = py + ["deepspeed.launcher.runner", "--hostfile", cfg.hostfile,
                    "--num_nodes", str(cfg.num_nodes), "--master_port", str(cfg.master_port),
                    "--no_local_rank"]
        if cfg.num_gpus > 0:
            cmd += ["--num_gpus", str(cfg.num_gpus)]
        if cfg.master_addr not in ("", "127.0.0.1", "localhost") or cfg.num_nodes == 1:
            cmd += ["--master_addr", cfg.master_addr]  # else: the runner asks the first host
        return cmd + worker
    # One node, or nodes started one by one with node_rank: the world is known without a
    # hostfile, so call the per-node launcher directly.
    slots = _visible_gpus()[: p.procs_per_node] if p.gpu else list(range(p.procs_per_node))
    names = ["localhost"] if cfg.num_nodes == 1 else [f"node{i}" for i in range(cfg.num_nodes)]
    world_info = _encode({name: slots for name in names})
    return py + ["deepspeed.launcher.launch", f"--world_info={world_info}",
                 f"--node_rank={cfg.node_rank}", f"--master_addr={cfg.master_addr}",
                 f"--master_port={cfg.master_port}", "--no_local_rank"] + worker


def launch(p: Plan, prepared: Path, prepared_uri: str, run_id: str | None = None,
           tracking_uri: str | None = None) -> int:
    """Run this node's ranks to the end; the launcher's exit code (0 = every rank succeeded)."""
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    if run_id:  # rank 0 logs into the parent's run through the client (see RankZeroMlflow)
        env["MLFLOW_RUN_ID"] = run_id
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not p.gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.procs_per_node)))
    cmd = launch_command(p, prepared, prepared_uri)
    proc = subprocess.Popen(cmd, env=env)

    def stop(signum, frame):  # the launcher takes its ranks down with it
        proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_result(cfg: Config) -> dict[str, Any]:
    path = Path(cfg.output_dir) / RESULT_FILE
    if not path.is_file():
        raise DollyError(f"training ended without {path}: rank 0 did not finish")
    return json.loads(path.read_text())


# ============================================================================ worker side ======

def _cpu_deepspeed_state(timeout_s: int) -> None:
    """Make accelerate (and so the Trainer) run DeepSpeed on CPU processes over gloo.

    accelerate enables DeepSpeed only when a GPU-type device exists; on CPU the Trainer would
    see world size 1 while DeepSpeed sees all ranks. Creating the PartialState ourselves with
    ACCELERATE_USE_DEEPSPEED set gives DistributedType.DEEPSPEED over gloo; TrainingArguments
    then reuses it (accelerator_config use_configured_state). Verified in
    ../shared/notes/verified-findings.md. `timeout` bounds every collective.
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


def deepspeed_config(cfg: Config, gpu: bool) -> dict[str, Any]:
    """The ZeRO-3 JSON ("auto" values filled by the Trainer) plus offload from the config.

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
    return ds


def training_arguments(cfg: Config, gpu: bool):
    from transformers import TrainingArguments

    extra = {} if gpu else {"accelerator_config": {"use_configured_state": True}}
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
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
        deepspeed=deepspeed_config(cfg, gpu),
        ddp_timeout=cfg.rank_timeout_s,
        remove_unused_columns=False,  # the collator needs response_start
        dataloader_num_workers=0,
        dataloader_pin_memory=gpu,
        report_to="none",  # MLflow is logged by RankZeroMlflow, from rank 0 only
        **extra,
    )


class Records:
    """A prepared split as a map-style dataset of {input_ids, response_start}."""

    def __init__(self, df):
        self.ids = list(df["input_ids"])
        self.starts = df["response_start"].to_numpy()
        self.lengths = df["length"].to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "response_start": int(self.starts[i])}


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _param_numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _make_trainer_class():
    """The Trainer subclass (built lazily: transformers is imported only in the workers)."""
    import torch
    import torch.distributed as dist
    from transformers import Trainer

    from dolly import throughput
    from dolly.batching import LengthGroupedSampler

    class DollyTrainer(Trainer):
        """Adds length-grouped sampling and throughput / padding / memory metrics to the logs."""

        def __init__(self, *args, dolly_cfg: Config, flops: dict, **kwargs):
            super().__init__(*args, **kwargs)
            self.dolly_cfg = dolly_cfg
            self.flops = flops
            self.counter = throughput.TokenCounter()
            self.started = False
            self.totals = [0.0, 0.0, 0.0, 0.0]  # real, computed, sequences, seconds (all ranks)

        def _get_train_sampler(self, train_dataset=None):
            if self.dolly_cfg.batching != "length_grouped":
                return super()._get_train_sampler(train_dataset)
            ds = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedSampler(ds.lengths, self.args.per_device_train_batch_size,
                                        self.args.world_size, self.dolly_cfg.length_group_batches,
                                        seed=self.dolly_cfg.seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self.started:  # the first interval starts here, not at engine set-up
                self.counter.take()
                self.started = True
            mask = inputs["attention_mask"]
            self.counter.add(mask.sum(), mask.numel(), mask.shape[0])  # a tensor: no sync here
            return super().training_step(model, inputs, num_items_in_batch)

        def evaluate(self, *args, **kwargs):
            with self.counter.pause():
                return super().evaluate(*args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            with self.counter.pause():
                return super()._save_checkpoint(*args, **kwargs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Training logs and the end-of-training summary reach every rank at the same step.
            if "loss" in logs or "train_runtime" in logs:
                logs.update(self._efficiency(final="train_runtime" in logs))
            super().log(logs, start_time)

        def _efficiency(self, final: bool) -> dict[str, float]:
            real, computed, seqs, secs = self.counter.take()
            dev = self.args.device
            sums = torch.tensor([float(real), float(computed), float(seqs)], dtype=torch.float64,
                                device=dev)
            wall = torch.tensor([secs], dtype=torch.float64, device=dev)
            world, rank = self.args.world_size, self.args.process_index
            mem = torch.zeros(2 * world, dtype=torch.float64, device=dev)
            mem[rank] = _peak_rss_mb()
            if dev.type == "cuda":
                mem[world + rank] = torch.cuda.max_memory_allocated(dev) / 2**20
            if world > 1:
                dist.all_reduce(sums)
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(mem)
            real, computed, seqs = sums.tolist()
            secs = wall.item()
            if final:  # the whole run (this session) instead of the last interval
                t = self.totals
                real, computed, seqs, secs = (t[0] + real, t[1] + computed, t[2] + seqs,
                                              t[3] + secs)
            else:
                self.totals = [a + b for a, b in zip(self.totals, (real, computed, seqs, secs))]
            out = throughput.summarize(real, computed, seqs, secs, **self.flops)
            for r in range(world):
                out[f"peak_rss_mb_rank{r}"] = mem[r].item()
                if dev.type == "cuda":
                    out[f"peak_gpu_mb_rank{r}"] = mem[world + r].item()
            return out

    return DollyTrainer


def _callbacks(cfg: Config, run_id: str, params: dict[str, Any]):
    from transformers import TrainerCallback

    class RankZeroMlflow(TrainerCallback):
        """Params once and every numeric log entry as a metric, from rank 0, into `run_id`.

        The client API only: starting or resuming the run here would let this process end it
        (transformers' MLflowCallback does that), so the parent stays its only owner.
        """

        def __init__(self):
            import mlflow

            self.client = mlflow.MlflowClient()

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._safe(lambda: self.client.log_batch(run_id, params=[
                    _mlflow_param(k, v) for k, v in params.items()]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ts, state.global_step) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            self._safe(lambda: self.client.log_batch(run_id, metrics=metrics))

        @staticmethod
        def _safe(fn):
            try:
                fn()
            except Exception as e:  # a tracking hiccup must not cost the training run
                print(f"warning: MLflow logging failed: {str(e).splitlines()[0]}", flush=True)

    class PartitionRecord(TrainerCallback):
        """After the first step, each rank writes how many parameter elements it holds.

        Under ZeRO-3 a parameter's `ds_numel` is its full size and `ds_tensor` this rank's
        partition; the module's own tensor is empty outside forward/backward.
        """

        done = False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.done or model is None:
                return
            self.done = True
            rank, world = _rank()
            params = list(model.parameters())
            rec = {
                "rank": rank, "world_size": world, "pid": os.getpid(), "step": state.global_step,
                "tensors": len(params),
                "partitioned_tensors": sum(hasattr(p, "ds_tensor") for p in params),
                "full_numel": sum(_param_numel(p) for p in params),
                "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                   for p in params),
                "materialized_numel": sum(p.numel() for p in params),
            }
            Path(args.output_dir, f"zero3_rank{rank}.json").write_text(json.dumps(rec))
            print(f"rank {rank}: ZeRO-3 holds {rec['local_numel']:,} of {rec['full_numel']:,} "
                  f"parameter elements locally ({rec['partitioned_tensors']} of {rec['tensors']} "
                  "tensors partitioned)", flush=True)

    callbacks = [PartitionRecord()]
    if run_id:
        callbacks.append(RankZeroMlflow())
    return callbacks


def _mlflow_param(k: str, v: Any):
    from mlflow.entities import Param

    return Param(k, str(v)[:500])


def _flops_inputs(model, precision: str, world: int, gpu: bool) -> dict[str, Any]:
    import torch

    from dolly import throughput

    total = sum(_param_numel(p) for p in model.parameters())  # a tied weight counts once
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    # the input embedding is a lookup, not a matmul, unless the LM head shares its weight
    embed = 0 if out is not None and out.weight is inp.weight else _param_numel(inp.weight)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    return {"matmul_params": total - embed, "n_layer": int(model.config.num_hidden_layers),
            "width": int(model.config.hidden_size),
            "peak_per_device": throughput.peak_flops(device, precision), "n_devices": world}


def probe_loss(engine, collator, records: Records, device) -> float:
    """Loss of the model on a fixed batch (the first test records); all ranks must call it."""
    import torch

    batch = collator([records[i] for i in range(min(PROBE_RECORDS, len(records)))])
    batch = {k: v.to(device) for k, v in batch.items()}
    engine.eval()
    with torch.no_grad():
        return float(engine(**batch).loss.float().item())


def train(cfg: Config, prepared: Path, run_id: str = "") -> dict[str, Any] | None:
    """One rank's whole job. Returns the result on rank 0 (None elsewhere)."""
    import torch
    from transformers import GenerationConfig

    from dolly import data
    from dolly.collator import CompletionCollator
    from dolly.modeling import load_base_model
    from dolly.tokenizer import load_tokenizer, special_ids

    rank, world = _rank()
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per call site
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    gpu = os.environ.get("DS_ACCELERATOR") != "cpu" and torch.cuda.is_available()
    if not gpu:
        _cpu_deepspeed_state(cfg.rank_timeout_s)
    args = training_arguments(cfg, gpu)  # before the model: ZeRO-3 partitions it while loading

    tok = load_tokenizer(str(prepared / "tokenizer"))
    tok.padding_side = "left"  # what batched generation from the saved model needs;
    tok.init_kwargs["padding_side"] = "left"  # init_kwargs is what save_pretrained writes
    resp_id, end_id = special_ids(tok)
    train_df, test_df, _ = data.load_prepared(prepared)
    test_df = test_df.sort_values("length", kind="stable")  # eval batches of similar length
    train_ds, test_ds = Records(train_df), Records(test_df)
    collator = CompletionCollator(pad_token_id=tok.pad_token_id, response_key_id=resp_id)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    model = load_base_model(cfg, tok, dtype=dtype)
    model.config.use_cache = False  # no generation during training
    model.config.pad_token_id = tok.pad_token_id

    resumed_from = None if cfg.resume == "never" else cfg.resume
    resumed_step = 0
    if resumed_from:
        state = json.loads((Path(resumed_from) / "trainer_state.json").read_text())
        resumed_step = int(state["global_step"])
        if rank == 0:
            print(f"train: resuming from {resumed_from} (step {resumed_step})", flush=True)
    flops = _flops_inputs(model, cfg.precision, world, gpu)
    params = {"zero_stage": 3, "world_size": world, "effective_batch_size":
              cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world,
              "param_count": sum(_param_numel(p) for p in model.parameters()),
              "resumed_from_step": resumed_step, "device": "gpu" if gpu else "cpu"}
    trainer = _make_trainer_class()(
        model=model, args=args, train_dataset=train_ds,
        eval_dataset=test_ds if cfg.eval_steps else None, data_collator=collator,
        processing_class=tok, callbacks=_callbacks(cfg, run_id, params),
        dolly_cfg=cfg, flops=flops)

    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resumed_from)
    step = trainer.state.global_step
    evaluated = any("eval_loss" in h and h.get("step") == step for h in trainer.state.log_history)
    if cfg.eval_steps and not evaluated:
        trainer.evaluate()  # a last eval_loss for the final weights

    final = Path(cfg.output_dir) / FINAL_DIR
    model.config.use_cache = True
    # Generation stops at `### End` (Dolly v1). Set after train(), which adds the tokenizer's
    # <|endoftext|> to the eos ids (transformers' align_special_tokens).
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=end_id, pad_token_id=tok.pad_token_id)
    trainer.save_model(str(final))  # every rank: gathers the 16-bit weights, rank 0 writes
    probe = probe_loss(trainer.model_wrapped, collator, Records(test_df.sort_index()), args.device)
    if rank != 0:
        return None
    (final / "training_args.bin").unlink(missing_ok=True)  # a pickle the model does not need
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "global_step": step, "max_steps": trainer.state.max_steps,
        "resumed_from_step": resumed_step, "resumed_from": resumed_from,
        "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
        "train_loss": output.training_loss, "probe_loss": probe, "probe_records": PROBE_RECORDS,
        "seconds": round(time.perf_counter() - t0, 3), "world_size": world,
        "precision": cfg.precision, "final_dir": str(final.resolve()),
        "param_count": params["param_count"],
    }
    (Path(cfg.output_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m dolly.training",
                                 description="One rank of the train step (started by the launcher).")
    ap.add_argument("--config_b64", required=True,
                    help="the resolved config's non-default fields, JSON in base64")
    ap.add_argument("--prepared", required=True, help="local prepared/ folder")
    ap.add_argument("--prepared_uri", default="", help="fetched on nodes that lack --prepared")
    a = ap.parse_args(argv)
    cfg = Config(**json.loads(base64.urlsafe_b64decode(a.config_b64)))
    run_id = os.environ.pop("MLFLOW_RUN_ID", "")  # nothing in this process may resume the run
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks on a GPU machine (num_gpus=0)
    prepared = Path(a.prepared)
    if not prepared.is_dir() and a.prepared_uri:
        from dolly import tracking

        prepared = tracking.local_path(a.prepared_uri, "prepared data")
    rank, _ = _rank()
    try:
        train(cfg, prepared, run_id if rank == 0 else "")
    except BaseException as e:
        print(f"\nrank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    from dolly import cli

    cli.run(main)
