"""The resume decision (pure) with literal cases, and the file side kept apart from it."""
from __future__ import annotations

import json
import math

import pytest

from dolly.train.checkpoints import Checkpoint, ResumeDecision, apply, decide_resume, find_checkpoints, read_checkpoint

FP = {"learning_rate": 0.001, "world_size": 2, "data_hash": "h1"}
C4 = Checkpoint("out/checkpoint-4", 4, True, 2)
C8 = Checkpoint("out/checkpoint-8", 8, True, 2)
C12_PARTIAL = Checkpoint("out/checkpoint-12", 12, False, None)
REFUSAL = ("resume=auto: output_dir 'out' holds checkpoints of other data or settings "
           "({}); nothing was deleted. Set those back to continue them, or pass -P "
           "resume=never to delete them and start fresh (or -P output_dir=<another folder>)")


def test_auto_resumes_the_newest_complete_checkpoint_of_the_same_settings():
    assert decide_resume("auto", [C4, C8, C12_PARTIAL], FP, dict(FP), "out") == ResumeDecision(
        "out/checkpoint-8")


def test_auto_without_checkpoints_starts_fresh_and_removes_nothing():
    assert decide_resume("auto", [], None, FP, "out") == ResumeDecision(None)
    assert decide_resume("auto", [], {"old": 1}, FP, "out") == ResumeDecision(None)


def test_auto_with_only_interrupted_saves_starts_fresh_and_keeps_them():
    assert decide_resume("auto", [C12_PARTIAL], FP, FP, "out") == ResumeDecision(None, notes=(
        "resume: no complete checkpoint in out (checkpoint-12 were interrupted while saving); "
        "starting fresh",))


def test_auto_with_other_settings_refuses_naming_the_change_and_removes_nothing():
    d = decide_resume("auto", [C4, C8], {**FP, "learning_rate": 0.0005}, FP, "out")
    assert d == ResumeDecision(None, refuse=REFUSAL.format(
        "checkpoint-4, checkpoint-8; learning_rate: 0.0005 -> 0.001"))


def test_auto_without_a_fingerprint_file_refuses():
    assert decide_resume("auto", [C4], None, FP, "out") == ResumeDecision(None, refuse=(
        REFUSAL.format("checkpoint-4; no fingerprint file says which settings wrote them")))


def test_auto_on_another_world_size_resumes_through_the_universal_format():
    one = {**FP, "world_size": 1}
    assert decide_resume("auto", [C4, C8], FP, one, "out") == ResumeDecision(
        "out/checkpoint-8", universal=True, notes=(
            "resume: checkpoint-8 was written by 2 rank(s), this run has 1: resuming a copy "
            "converted to DeepSpeed's universal checkpoint format",))
    # a checkpoint already of the new world size needs no conversion, whatever the file says
    c1 = Checkpoint("out/checkpoint-12", 12, True, 1)
    assert decide_resume("auto", [C8, c1], FP, one, "out") == ResumeDecision("out/checkpoint-12")
    # another world size and another setting: still a refusal
    assert decide_resume("auto", [C8], {**FP, "seed": 1}, {**one, "seed": 2}, "out").refuse == \
        REFUSAL.format("checkpoint-8; seed: 1 -> 2")


def test_never_removes_every_checkpoint_and_says_so():
    assert decide_resume("never", [C4, C12_PARTIAL], FP, FP, "out") == ResumeDecision(
        None, ("out/checkpoint-4", "out/checkpoint-12"),
        ("resume=never: removing checkpoint-4, checkpoint-12 from out",))
    assert decide_resume("never", [], FP, FP, "out") == ResumeDecision(None)


def test_an_explicit_checkpoint_is_resumed_as_asked_and_nothing_is_removed():
    c3 = Checkpoint("elsewhere/checkpoint-3", 3, True, 2)
    assert decide_resume(c3.path, [C4], FP, FP, "out", c3) == ResumeDecision(c3.path)
    assert decide_resume(c3.path, [C4], {**FP, "seed": 1}, FP, "out", c3) == ResumeDecision(
        c3.path, notes=("resume: elsewhere/checkpoint-3 was not written with these settings; "
                        "resuming it as asked",))
    assert decide_resume(c3.path, [], FP, {**FP, "world_size": 4}, "out", c3).universal
    partial = Checkpoint("elsewhere/checkpoint-5", 5, False, 2)
    assert decide_resume(partial.path, [], FP, FP, "out", partial) == ResumeDecision(
        None, refuse="config key 'resume': 'elsewhere/checkpoint-5' is not a checkpoint folder "
                     "(no trainer_state.json)")


def test_find_checkpoints_orders_by_step_and_reads_complete_and_world_size(tmp_path):
    for step, complete, ranks in ((10, True, 2), (9, True, 1), (11, False, 0)):
        c = tmp_path / f"checkpoint-{step}"
        (c / f"global_step{step}").mkdir(parents=True)
        (c / "latest").write_text(f"global_step{step}")
        for r in range(ranks):
            (c / f"global_step{step}" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
            (c / f"global_step{step}" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").touch()
        if complete:  # checkpoint-9: a trainer_state.json without max_steps
            (c / "trainer_state.json").write_text("{}" if step == 9 else json.dumps(
                {"global_step": step, "max_steps": 12}))
    (tmp_path / "checkpoint-notes.txt").write_text("a file, not a checkpoint")
    found = find_checkpoints(tmp_path)
    assert [(c.step, c.complete, c.world_size, c.max_steps) for c in found] == [
        (9, True, 1, None), (10, True, 2, 12), (11, False, None, None)]
    assert read_checkpoint(tmp_path / "missing").world_size is None
    apply(ResumeDecision(None, (found[0].path,)))
    assert [c.step for c in find_checkpoints(tmp_path)] == [10, 11]


# --- issue 23, case 9: the schedule (its length) changed between the checkpoint's run and now ---

COS = {**FP, "lr_scheduler": "cosine"}
C3_OF_6 = Checkpoint("out/checkpoint-3", 3, True, 2, 6)
C6_OF_6 = Checkpoint("out/checkpoint-6", 6, True, 2, 6)
C3_OF_3 = Checkpoint("out/checkpoint-3", 3, True, 2, 3)


def test_auto_refuses_a_checkpoint_at_or_past_the_runs_last_step_and_removes_nothing():
    # trained 6 steps with save_steps=3, rerun with max_steps=3: no 7th step, nothing deleted
    assert decide_resume("auto", [C3_OF_6, C6_OF_6], COS, COS, "out", steps=3) == ResumeDecision(
        None, refuse="resume=auto: output_dir 'out' holds checkpoint-6 (step 6 of 6, cosine "
        "schedule) and this run's schedule has 3 steps: resuming would train past step 3; "
        "nothing was deleted. Pass -P resume=never to delete checkpoint-3, checkpoint-6 and "
        "start fresh (or -P output_dir=<another folder>)")
    # the same command again after it finished: not one more step either
    assert decide_resume("auto", [C3_OF_6, C6_OF_6], COS, COS, "out", steps=6).refuse == (
        "resume=auto: output_dir 'out' holds checkpoint-6 (step 6 of 6, cosine schedule) and "
        "this run's schedule has 6 steps: resuming would train past step 6; nothing was "
        "deleted. Pass -P resume=never to delete checkpoint-3, checkpoint-6 and start fresh (or "
        "-P output_dir=<another folder>)")
    # interrupted after step 3 of 6, rerun with max_steps=3: finishing its own run is a way on
    assert decide_resume("auto", [C3_OF_6], COS, COS, "out", steps=3).refuse == (
        "resume=auto: output_dir 'out' holds checkpoint-3 (step 3 of 6, cosine schedule) and "
        "this run's schedule has 3 steps: resuming would train past step 3; nothing was "
        "deleted. Set -P max_steps=6 to finish its run, or pass -P resume=never to delete "
        "checkpoint-3 and start fresh (or -P output_dir=<another folder>)")
    # a length-free schedule does not make a step past the end trainable
    const = {**FP, "lr_scheduler": "constant"}
    assert "resuming would train past step 3" in decide_resume(
        "auto", [C6_OF_6], const, const, "out", steps=3).refuse


def test_auto_refuses_a_cosine_or_linear_checkpoint_of_another_schedule_length():
    # 3 -> 6: step 4 would train at the 3-step schedule's end (0), steps 5-6 at the 6-step one's
    assert decide_resume("auto", [C3_OF_3], COS, COS, "out", steps=6) == ResumeDecision(
        None, refuse="resume=auto: output_dir 'out' holds checkpoint-3 (step 3 of 3, cosine "
        "schedule) and this run's schedule has 6 steps: resuming would train the rest on a mix "
        "of both schedules; nothing was deleted. Pass -P resume=never to delete checkpoint-3 "
        "and start fresh (or -P output_dir=<another folder>)")
    lin = {**FP, "lr_scheduler": "linear"}
    assert decide_resume("auto", [C3_OF_6], lin, lin, "out", steps=8).refuse == (
        "resume=auto: output_dir 'out' holds checkpoint-3 (step 3 of 6, linear schedule) and "
        "this run's schedule has 8 steps: resuming would train the rest on a mix of both "
        "schedules; nothing was deleted. Set -P max_steps=6 to finish its run, or pass -P "
        "resume=never to delete checkpoint-3 and start fresh (or -P output_dir=<another "
        "folder>)")
    unrecorded = Checkpoint("out/checkpoint-3", 3, True, 2, None)
    assert decide_resume("auto", [unrecorded], COS, COS, "out", steps=6).refuse == (
        "resume=auto: output_dir 'out' holds checkpoint-3 (step 3, length not recorded, cosine "
        "schedule) and this run's schedule has 6 steps: resuming would train the rest on a mix "
        "of both schedules; nothing was deleted. Pass -P resume=never to delete checkpoint-3 "
        "and start fresh (or -P output_dir=<another folder>)")
    # another world size with epochs: another step count (schedule_steps), refused the same way
    two = {**COS, "world_size": 1}
    assert "resuming would train the rest on a mix" in decide_resume(
        "auto", [C3_OF_6], COS, two, "out", steps=12).refuse


def test_auto_continues_the_same_schedule_and_extends_a_length_free_one():
    # interrupted and rerun with the same schedule: continued
    assert decide_resume("auto", [C3_OF_6], COS, COS, "out", steps=6) == ResumeDecision(
        "out/checkpoint-3")
    # constant (with or without warmup): the rate at each step does not depend on the length
    for name in ("constant", "constant_with_warmup"):
        fp = {**FP, "lr_scheduler": name}
        assert decide_resume("auto", [C3_OF_3], fp, fp, "out", steps=6) == ResumeDecision(
            "out/checkpoint-3")
    # the fingerprint's refusal (another setting) comes first
    assert decide_resume("auto", [C3_OF_3], {**COS, "warmup_steps": 0},
                         {**COS, "warmup_steps": 2}, "out", steps=6).refuse == REFUSAL.format(
        "checkpoint-3; warmup_steps: 0 -> 2")


def test_an_explicit_checkpoint_of_another_schedule_length_or_past_the_end_is_refused():
    c3 = Checkpoint("elsewhere/checkpoint-3", 3, True, 2, 3)
    assert decide_resume(c3.path, [], COS, COS, "out", c3, steps=6) == ResumeDecision(
        None, refuse="resume=elsewhere/checkpoint-3: checkpoint-3 (step 3 of 3, cosine "
        "schedule) and this run's schedule has 6 steps: resuming would train the rest on a mix "
        "of both schedules; nothing was deleted. Resume another checkpoint (or pass -P "
        "resume=never to start fresh)")
    c6 = Checkpoint("elsewhere/checkpoint-6", 6, True, 2, 12)
    assert decide_resume(c6.path, [C3_OF_6], COS, COS, "out", c6, steps=4).refuse == (
        "resume=elsewhere/checkpoint-6: checkpoint-6 (step 6 of 12, cosine schedule) and this "
        "run's schedule has 4 steps: resuming would train past step 4; nothing was deleted. "
        "Set -P max_steps=12 to finish its run, or resume another checkpoint (or pass -P "
        "resume=never to start fresh)")
    assert decide_resume(c3.path, [], COS, COS, "out", c3, steps=3).refuse.endswith(
        "would train past step 3; nothing was deleted. Resume another checkpoint (or pass -P "
        "resume=never to start fresh)")


def test_the_settings_that_shape_the_schedule_are_in_the_fingerprint():
    """Learning rate, schedule, warmup and the batch sizes (steps per epoch) refuse through the
    fingerprint, the data (its size) through data_hash; the length through schedule_steps."""
    from dolly.config import load_config
    from dolly.train import launch

    fp = launch.fingerprint(load_config(None, {}), "h", 2, "fp32")
    assert {"learning_rate", "lr_scheduler", "warmup_steps", "per_device_batch_size",
            "gradient_accumulation_steps", "data_hash", "world_size"} <= set(fp)
    assert not {"max_steps", "epochs"} & set(fp)  # checked per checkpoint instead


@pytest.mark.parametrize("records, batch, world, accum, epochs", [
    (180, 8, 2, 1, 1.0), (181, 8, 2, 1, 1.0), (180, 8, 1, 1, 2.5), (100, 16, 2, 4, 3.0),
    (7, 8, 2, 1, 10.0), (200, 3, 3, 2, 0.5)])
def test_schedule_steps_counts_an_epoch_as_the_trainer_does(records, batch, world, accum, epochs):
    """Epochs -> steps: each rank's batches as accelerate shards them (the Trainer's
    dataloader), then the Trainer's own formula (set_initial_training_values)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from dolly.config import load_config
    from dolly.data.batching import LengthGroupedSampler
    from dolly.train.launch import schedule_steps

    lengths = list(range(records))
    loader = DataLoader(lengths, batch_size=batch,
                        sampler=LengthGroupedSampler(lengths, batch, world, 4))
    per_rank = len(prepare_data_loader(loader, num_processes=world, process_index=0,
                                       put_on_device=False))
    expected = math.ceil(epochs * max(per_rank // accum + int(per_rank % accum > 0), 1))
    cfg = load_config(None, {"epochs": epochs, "per_device_batch_size": batch,
                             "gradient_accumulation_steps": accum})
    assert schedule_steps(cfg, records, world) == expected
    assert schedule_steps(load_config(None, {"max_steps": 6}), records, world) == 6
