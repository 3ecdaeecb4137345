"""The rank side's Trainer callbacks, imported and driven directly (no launch)."""
from __future__ import annotations

import json
import os

from helpers import fresh_store, tracking_to


def test_rank_zero_mlflow_charts_the_curves_at_their_step_and_the_summary_as_tags(tmp_path):
    import mlflow
    from transformers import TrainerState

    from dolly.train.trainer import RankZeroMlflow

    with tracking_to(fresh_store(tmp_path)):
        client = mlflow.MlflowClient()
        run_id = client.create_run("0").info.run_id
        cb = RankZeroMlflow(run_id, {"zero_stage": 3, "world_size": 2})
        state = TrainerState(global_step=7, is_world_process_zero=True)
        cb.on_train_begin(None, state, None)
        cb.on_log(None, state, None, logs={"loss": 1.5, "epoch": 2, "flag": True, "note": "x",
                                           "train_tokens_per_second": 900.0,
                                           "peak_rss_mb_rank1": 700.5})
        cb.on_log(None, state, None, logs={"eval_loss": 1.25, "eval_runtime": 0.5, "epoch": 2,
                                           "eval_samples_per_second": 80.0})
        # the Trainer's end-of-training entry, with DollyTrainer's whole-run figures
        cb.on_log(None, state, None, logs={
            "train_runtime": 12.345678, "train_samples_per_second": 5.0, "total_flos": 7.7e7,
            "train_steps_per_second": 0.5, "train_loss": 2.42, "epoch": 2.0,
            "train_tokens_per_second": 812.3456789, "padding_efficiency": 0.875,
            "model_tflops_per_second": 0.0012, "peak_rss_mb_rank1": 701.0})
        other = TrainerState(global_step=8, is_world_process_zero=False)
        cb.on_log(None, other, None, logs={"loss": 9.0})  # another rank: nothing logged
        run = client.get_run(run_id)
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
                   for k in run.data.metrics}
    assert run.data.params == {"zero_stage": "3", "world_size": "2"}
    assert history == {"loss": [(7, 1.5)], "train_tokens_per_second": [(7, 900.0)],
                       "peak_rss_mb_rank1": [(7, 700.5)], "eval_loss": [(7, 1.25)]}
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    assert tags == {"train_runtime_s": "12.3457", "mean_train_tokens_per_second": "812.346",
                    "mean_padding_efficiency": "0.875", "mean_model_tflops_per_second": "0.0012"}


def test_partition_record_writes_what_this_rank_holds_once(tmp_path, monkeypatch):
    import torch
    from transformers import TrainerState, TrainingArguments

    from dolly.train.trainer import PartitionRecord

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(3, 2)  # not partitioned: each tensor counts whole
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    cb = PartitionRecord()
    cb.on_step_end(args, TrainerState(global_step=1), None, model=model)
    cb.on_step_end(args, TrainerState(global_step=2), None, model=model)
    rec = json.loads((tmp_path / "zero3_rank1.json").read_text())
    assert rec == {"rank": 1, "world_size": 2, "pid": os.getpid(), "step": 1, "tensors": 2,
                   "partitioned_tensors": 0, "full_numel": 8, "local_numel": 8,
                   "materialized_numel": 8}


def test_schedule_guard_stops_a_resume_past_the_end_or_into_another_length_before_a_step():
    import pytest
    from transformers import TrainerState

    from dolly.errors import DollyError
    from dolly.train.trainer import ScheduleGuard

    def begin(guard, step, steps):
        guard.on_train_begin(None, TrainerState(global_step=step, max_steps=steps), None)

    with pytest.raises(DollyError) as past:
        begin(ScheduleGuard("out/checkpoint-6", 6, "cosine"), 6, 3)
    assert str(past.value) == ("resuming out/checkpoint-6 (step 6) would train past this run's "
                               "last step, 3; stopped before training")
    with pytest.raises(DollyError) as mixed:
        begin(ScheduleGuard("out/checkpoint-3", 3, "cosine"), 3, 6)
    assert str(mixed.value) == ("resuming out/checkpoint-3 (step 3) would train the rest of its "
                                "3-step cosine schedule as a 6-step one; stopped before training")
    with pytest.raises(DollyError, match="past this run's last step, 3"):
        begin(ScheduleGuard("out/checkpoint-3", 6, "constant"), 3, 3)
    begin(ScheduleGuard("out/checkpoint-3", 6, "cosine"), 3, 6)  # the same schedule: continues
    begin(ScheduleGuard("out/checkpoint-3", 3, "constant"), 3, 6)  # a length-free one extends
