"""The train step's parent side: plan the run, start the ranks, wait for them.

`prepare_launch()` resolves devices, precision, world size and whether to resume
(dolly.train.checkpoints) and prepares output_dir;
`start_ranks()` is the one place that picks the launcher: it starts the ranks (`python -m
dolly.train.rank`, one process per rank) with the DeepSpeed launcher and waits, or hands the plan
to dolly.train.spark (launcher=spark). What the ranks get and give back is dolly.train.handoff.
The DeepSpeed launcher ends every local rank as soon as one exits non-zero, and
collectives time out after `rank_timeout_s`, so a dead or stuck rank ends the step with a non-zero
exit instead of a hang. `exclusive()` holds output_dir for the whole step.

This module imports neither torch nor transformers at module level: the parent process stays
light, and the GPU-vs-CPU decision made here travels to the ranks as `--device`.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dolly.config import Config, fields_where
from dolly.errors import ConfigError, DollyError
from dolly.train import checkpoints, spark
from dolly.train.handoff import FINAL_DIR, RANK_MODULE, RESULT_FILE, Plan, b64_json, rank_args

FINGERPRINT_FILE = "fingerprint.json"
# Settings that make a checkpoint belong to another experiment, declared on the Config fields
# (checkpoint=True). The duration (epochs, max_steps) is not among them: the schedule's length in
# steps (`schedule_steps`) is checked against each checkpoint's own (checkpoints.schedule_conflict),
# so an interrupted run is finished in several goes and a constant schedule can be extended.
RESUME_FIELDS = fields_where(checkpoint=True)


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
    """What makes a checkpoint belong to this experiment: the checkpoint fields of Config, the
    prepared data's hash, the world size and the resolved precision (fingerprint.json)."""
    fields = {k: getattr(cfg, k) for k in RESUME_FIELDS}
    fields.update(data_hash=data_hash, world_size=world_size, precision=precision)
    return fields


def schedule_steps(cfg: Config, records: int, world_size: int) -> int:
    """The optimizer steps of the run's learning-rate schedule, counted as the Trainer counts
    them: max_steps when set, else ceil(epochs x updates per epoch). An epoch is
    ceil(records / per_device_batch_size) micro-batches shared out by accelerate, ceil(that /
    world_size) per rank (it evens them out), and an update takes gradient_accumulation_steps of
    them (a short last one counts)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = -(-records // cfg.per_device_batch_size)
    per_rank = -(-batches // world_size)
    updates = max(-(-per_rank // cfg.gradient_accumulation_steps), 1)
    return math.ceil(cfg.epochs * updates)


def _spark_world(cfg: Config, gpus: list[int]) -> tuple[bool, int, int]:
    """(gpu, ranks per node, world size) on Spark executors: num_gpus > 0 means GPU executors
    even when this driver has none; -1 follows this machine's GPUs; else CPU ranks."""
    if cfg.hostfile:
        raise ConfigError("config key 'hostfile': launcher=spark places the ranks on Spark "
                          "executors; leave hostfile empty")
    if cfg.node_rank != 0:
        raise ConfigError("config key 'node_rank': launcher=spark starts every node from this "
                          "one; leave node_rank at 0")
    per_node = cfg.num_gpus if cfg.num_gpus > 0 else len(gpus)
    if per_node:
        return True, per_node, per_node * cfg.num_nodes
    return False, cfg.cpu_ranks, cfg.cpu_ranks * cfg.num_nodes


def _world(cfg: Config, notes: list[str]) -> tuple[bool, int, int]:
    """(gpu, processes per node, world size) for the launcher."""
    gpus = _visible_gpus() if cfg.num_gpus != 0 else []
    gpu = bool(gpus)
    if cfg.launcher == "spark":
        gpu, procs, world = _spark_world(cfg, gpus)
        if not gpu and (cfg.offload_optimizer or cfg.offload_params):
            notes.append("offload settings ignored: training already runs on CPU")
        return gpu, procs, world
    if cfg.hostfile:
        gpu = cfg.num_gpus != 0  # the nodes of a hostfile are GPU nodes
        return gpu, cfg.num_gpus if cfg.num_gpus > 0 else max(len(gpus), 1), \
            _hostfile_world_size(cfg)
    if gpu:
        if cfg.num_gpus > len(gpus):
            raise ConfigError(f"config key 'num_gpus': {cfg.num_gpus} asked, {len(gpus)} visible")
        procs = cfg.num_gpus if cfg.num_gpus > 0 else len(gpus)
        return gpu, procs, procs * cfg.num_nodes
    if cfg.num_gpus > 0:
        raise ConfigError(f"config key 'num_gpus': {cfg.num_gpus} asked but no GPU is visible "
                          f"(on CPU the step runs cpu_ranks={cfg.cpu_ranks} processes)")
    if cfg.offload_optimizer or cfg.offload_params:
        notes.append("offload settings ignored: training already runs on CPU")
    return gpu, cfg.cpu_ranks, cfg.cpu_ranks * cfg.num_nodes


def _check_deepspeed_config(cfg: Config) -> None:
    ds_path = Path(cfg.deepspeed_config)
    if not ds_path.is_file():
        raise ConfigError(f"config key 'deepspeed_config': '{ds_path}' does not exist")
    stage = json.loads(ds_path.read_text()).get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"config key 'deepspeed_config': '{ds_path}' has ZeRO stage {stage}, "
                          "the train step runs stage 3")


def prepare_launch(cfg: Config, prepared: Path) -> Plan:
    """Plan the launch (devices, precision, world size, the resume decision) and prepare
    output_dir for it: carries out the resume decision (resume=never removes old checkpoints)
    and removes a previous run's final weights and result.

    Raises ConfigError for settings that cannot run here (missing or non-stage-3 DeepSpeed
    config, more GPUs than visible, fp16 on CPU, a `resume` path that is no checkpoint) and,
    before anything in output_dir changes, when resume=auto finds checkpoints of other settings
    or the checkpoint to resume does not continue into this run's schedule (past its last step,
    or a schedule of another length);
    DollyError when a checkpoint of another world size cannot be converted.
    """
    from dolly.data import load_prepared

    train_df, _, summary = load_prepared(prepared)
    _check_deepspeed_config(cfg)
    notes: list[str] = []
    gpu, procs, world = _world(cfg, notes)
    precision = resolve_precision(cfg, gpu)
    port = cfg.master_port
    if cfg.launcher == "deepspeed" and cfg.num_nodes == 1 and not cfg.hostfile and \
            not _port_free(port):
        port = _free_port()  # another run on this machine holds it; one node needs no fixed port
        notes.append(f"master_port {cfg.master_port} is in use on this machine: using {port}")

    out = Path(cfg.output_dir)
    if cfg.launcher == "spark":  # executors do not share this process's working directory
        out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, summary.get("data_hash", ""), world, precision)
    fp_file = out / FINGERPRINT_FILE
    old = json.loads(fp_file.read_text()) if fp_file.is_file() else None
    explicit = None if cfg.resume in ("auto", "never") else checkpoints.read_checkpoint(cfg.resume)
    if explicit is not None and explicit.complete:
        _require_same_kind(cfg, Path(explicit.path))
    decision = checkpoints.decide_resume(cfg.resume, checkpoints.find_checkpoints(out), old, fp,
                                         str(out), explicit,
                                         schedule_steps(cfg, len(train_df), world))
    if decision.refuse:
        raise ConfigError(decision.refuse)
    notes.extend(decision.notes)
    checkpoints.apply(decision)
    resume_from = decision.resume_from
    if decision.universal:
        resume_from = str(checkpoints.to_universal(checkpoints.read_checkpoint(resume_from), out))
    for leftover in (out / FINAL_DIR, out / RESULT_FILE):  # never report a previous run's result
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink(missing_ok=True)
    fp_file.write_text(json.dumps(fp, indent=2, sort_keys=True))
    resolved = dataclasses.replace(cfg, precision=precision, resume=resume_from or "never",
                                   master_port=port, output_dir=str(out))
    return Plan(resolved, gpu, procs, world, resume_from, notes, decision.universal)


def _require_same_kind(cfg: Config, ckpt: Path) -> None:
    """Raise ConfigError when the checkpoint `resume` names holds another kind of training than
    cfg's: adapters (adapter_config.json) for a full fine-tune or the reverse, or adapters of
    another rank, scale or targets. The Trainer would otherwise load what matches, silently."""
    conf_file = ckpt / "adapter_config.json"
    if not cfg.adapters:
        if conf_file.is_file():
            raise ConfigError(f"config key 'resume': {ckpt} holds LoRA adapters; this run is "
                              "finetune=full (set finetune=lora to continue it)")
        return
    if not conf_file.is_file():
        raise ConfigError(f"config key 'resume': {ckpt} is a full fine-tune's checkpoint; this "
                          f"run trains {cfg.finetune} adapters (set finetune=full to continue it)")
    conf = json.loads(conf_file.read_text())
    targets = conf.get("target_modules")
    wanted = cfg.lora_target_modules.strip()
    theirs = {"r": conf.get("r"), "lora_alpha": conf.get("lora_alpha")}
    ours = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
    differ = [f"lora_{k.removeprefix('lora_')} {theirs[k]} -> {ours[k]}" for k in theirs
              if theirs[k] is not None and float(theirs[k]) != float(ours[k])]
    if wanted != "all-linear" and isinstance(targets, list) and \
            sorted(targets) != sorted(t.strip() for t in wanted.split(",")):
        differ.append(f"lora_target_modules {','.join(sorted(targets))} -> {wanted}")
    if differ:
        raise ConfigError(f"config key 'resume': {ckpt} holds adapters of other settings "
                          f"({'; '.join(differ)}); set them back to continue it")


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


# --- launching -----------------------------------------------------------------------------------

def launch_command(p: Plan, prepared: Path, prepared_uri: str) -> list[str]:
    """The DeepSpeed launcher command that starts this node's ranks of `dolly.train.rank`."""
    cfg = p.cfg
    worker = ["--module", RANK_MODULE] + rank_args(p, prepared, prepared_uri)
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
    world_info = b64_json({name: slots for name in names})
    return py + ["deepspeed.launcher.launch", f"--world_info={world_info}",
                 f"--node_rank={cfg.node_rank}", f"--master_addr={cfg.master_addr}",
                 f"--master_port={cfg.master_port}", "--no_local_rank"] + worker


def rank_env(p: Plan, run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    """The ranks' environment: rank 0 logs into `run_id` through the client (RankZeroMlflow)."""
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not p.gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // p.procs_per_node)))
    return env


def start_ranks(p: Plan, prepared: Path, prepared_uri: str, run_id: str | None = None,
                tracking_uri: str | None = None) -> int:
    """Run this node's ranks to the end; the launcher's exit code (0 = every rank succeeded).
    With launcher=spark the ranks run as a Spark barrier job (dolly.train.spark)."""
    if p.cfg.launcher == "spark":
        return spark.launch(p, prepared, prepared_uri, run_id, tracking_uri)
    proc = subprocess.Popen(launch_command(p, prepared, prepared_uri),
                            env=rank_env(p, run_id, tracking_uri))

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
