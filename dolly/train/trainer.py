"""The rank side's Trainer pieces: DollyTrainer and its callbacks (imported by the ranks only).

`DollyTrainer` adds length-grouped sampling, packed training batches and throughput / padding /
memory metrics to the Hugging Face Trainer; `RankZeroMlflow` logs from rank 0 into the parent's MLflow run;
`PartitionRecord` writes what each rank holds under ZeRO-3.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from dolly.train import throughput
from dolly.train.handoff import LENGTH_FREE_SCHEDULES
from dolly.data.batching import LengthGroupedSampler
from dolly.data.packing import take_counts
from dolly.config import Config
from dolly.errors import DollyError

# What RankZeroMlflow charts: the curves a run is read by, a point every `logging_steps`
# (eval_loss: every `eval_steps`), and DollyTrainer's efficiency figures of each interval
# (throughput.summarize; peak memory per rank, `peak_rss_mb_rank<r>`, `peak_gpu_mb_rank<r>`).
CURVES = frozenset({"loss", "grad_norm", "learning_rate", "eval_loss", "train_tokens_per_second",
                    "padding_efficiency", "model_tflops_per_second", "mfu"})
PER_RANK_CURVES = ("peak_rss_mb_rank", "peak_gpu_mb_rank")
# The Trainer's end-of-training log entry (the one with `train_runtime`) is one-off facts about
# this run's steps, not a point of any curve: these keys become tags (log key -> tag), formatted
# to 6 significant digits. train_runtime: seconds of Trainer.train() (evaluation and checkpoint
# writes included); the means are DollyTrainer's figures over all the steps this run trained
# (a resumed run: those after its checkpoint), evaluation and checkpoint writes excluded.
SUMMARY_TAGS = {"train_runtime": "train_runtime_s",
                "train_tokens_per_second": "mean_train_tokens_per_second",
                "padding_efficiency": "mean_padding_efficiency",
                "model_tflops_per_second": "mean_model_tflops_per_second",
                "mfu": "mean_mfu"}
# Not logged at all: `epoch` (the step times a constant), eval_runtime and eval_*_per_second
# (evaluation's own speed), and the rest of the end-of-training entry: train_samples_per_second
# and train_steps_per_second (the means above say it in tokens), total_flos (the Trainer counts
# 6 x parameters x tokens with only the parameters ZeRO-3 leaves whole; measured on the tiny
# profile: 1,024 of its 100,083 non-embedding parameters, so about 1/100 of the real count) and
# train_loss (this run's summed losses divided by all steps, the resumed ones included; measured:
# 2.42 for a run resumed at step 4 of 8 whose four losses were 5.25 to 4.47). The loss curve
# and model_tflops_per_second are the measures.


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher set them (0, 1 when run alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def param_numel(p) -> int:
    """A parameter's full element count, also when ZeRO-3 holds only a partition (`ds_numel`) or
    bitsandbytes stores it packed in 4 bits (two weights a byte; its `quant_state.shape` is the
    weight's own shape)."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


class DollyTrainer(Trainer):
    """Adds length-grouped sampling, packed batches (their counts taken out before the model
    sees them) and throughput / padding / memory metrics to the logs.

    dolly_cfg: the run's Config (batching, length_group_batches, seed); flops: the keyword
    arguments of `throughput.summarize` that describe the model and devices; eval_collator: the
    padded collator evaluation batches use when the training ones are packed.
    """

    def __init__(self, *args, dolly_cfg: Config, flops: dict, eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dolly_cfg = dolly_cfg
        self.flops = flops
        self.eval_collator = eval_collator
        self.counter = throughput.TokenCounter()
        self.started = False
        self.totals = [0.0, 0.0, 0.0, 0.0]  # real, computed, sequences, seconds (all ranks)

    def get_eval_dataloader(self, eval_dataset=None):
        # eval_loss from padded batches whatever the training batches: comparable across runs
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _get_train_sampler(self, train_dataset=None):
        # packed: the random micro-batches of batching=random, each packed by the collator
        if self.dolly_cfg.batching != "length_grouped":
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(ds.lengths, self.args.per_device_train_batch_size,
                                    self.args.world_size, self.dolly_cfg.length_group_batches,
                                    seed=self.dolly_cfg.seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, counting the batch's tokens first: `inputs` is the collator's
        batch, padded (`input_ids`, `attention_mask`, `labels`: each `(batch, seq) int64`) or
        packed (dolly.data.packing: `input_ids`, `labels`, `position_ids` and the counts
        `num_real_tokens`, `num_records`, which are taken out here: the model gets no mask)."""
        if not self.started:  # the first interval starts here, not at engine set-up
            self.counter.take()
            self.started = True
        inputs = dict(inputs)
        self.counter.add(*take_counts(inputs))  # tensors: no sync here
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
        mem[rank] = peak_rss_mb()
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


class RankZeroMlflow(TrainerCallback):
    """From rank 0 into `run_id`: params once, the CURVES (and PER_RANK_CURVES) of each log entry
    as metrics at its step, and the end-of-training entry as SUMMARY_TAGS.

    The client API only: starting or resuming the run here would let this process end it
    (transformers' MLflowCallback does that), so the parent stays its only owner.
    """

    def __init__(self, run_id: str, params: dict[str, Any]):
        import mlflow

        self.run_id = run_id
        self.params = params
        self.client = mlflow.MlflowClient()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from mlflow.entities import Param

            self._safe(lambda: self.client.log_batch(self.run_id, params=[
                Param(k, str(v)[:500]) for k, v in self.params.items()]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        from mlflow.entities import Metric, RunTag

        numbers = {k: float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "train_runtime" in logs:  # the end-of-training entry
            tags = [RunTag(tag, f"{numbers[k]:.6g}") for k, tag in SUMMARY_TAGS.items()
                    if k in numbers]
            self._safe(lambda: self.client.log_batch(self.run_id, tags=tags))
            return
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, state.global_step) for k, v in numbers.items()
                   if k in CURVES or k.startswith(PER_RANK_CURVES)]
        if metrics:
            self._safe(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    @staticmethod
    def _safe(fn):
        try:
            fn()
        except Exception as e:  # a tracking hiccup must not cost the training run
            print(f"warning: MLflow logging failed: {str(e).splitlines()[0]}", flush=True)


class PartitionRecord(TrainerCallback):
    """After the first step, each rank writes how many parameter elements it holds
    (<output_dir>/zero3_rank<r>.json).

    Under ZeRO-3 a parameter's `ds_numel` is its full size and `ds_tensor` this rank's
    partition; the module's own tensor is empty outside forward/backward.
    """

    def __init__(self):
        self.done = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.done or model is None:
            return
        self.done = True
        rank, world = rank_and_world()
        params = list(model.parameters())
        rec = {
            "rank": rank, "world_size": world, "pid": os.getpid(), "step": state.global_step,
            "tensors": len(params),
            "partitioned_tensors": sum(hasattr(p, "ds_tensor") for p in params),
            "full_numel": sum(param_numel(p) for p in params),
            "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                               for p in params),
            "materialized_numel": sum(p.numel() for p in params),
        }
        Path(args.output_dir, f"zero3_rank{rank}.json").write_text(json.dumps(rec))
        print(f"rank {rank}: ZeRO-3 holds {rec['local_numel']:,} of {rec['full_numel']:,} "
              f"parameter elements locally ({rec['partitioned_tensors']} of {rec['tensors']} "
              "tensors partitioned)", flush=True)


class ScheduleGuard(TrainerCallback):
    """The ranks' own check of a resume against the Trainer's step count, before the first step:
    the parent refuses these before launch (checkpoints.schedule_conflict); this catches a
    parent whose count of the schedule's steps differs from the Trainer's.

    resumed: the checkpoint's path; old_max_steps: the length of the schedule it was trained on
    (its trainer_state.json; None: not recorded); scheduler: this run's lr_scheduler.
    """

    def __init__(self, resumed: str, old_max_steps: int | None, scheduler: str):
        self.resumed, self.old_max_steps, self.scheduler = resumed, old_max_steps, scheduler

    def on_train_begin(self, args, state, control, **kwargs):
        step, steps = state.global_step, state.max_steps
        if step >= steps:
            why = f"train past this run's last step, {steps}"
        elif self.old_max_steps != steps and self.scheduler not in LENGTH_FREE_SCHEDULES:
            old = f"{self.old_max_steps}-step" if self.old_max_steps else "unrecorded-length"
            why = f"train the rest of its {old} {self.scheduler} schedule as a {steps}-step one"
        else:
            return
        raise DollyError(f"resuming {self.resumed} (step {step}) would {why}; stopped before "
                         "training")
