"""The resume decision (pure) with literal cases, and the file side kept apart from it."""
from __future__ import annotations

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
        if complete:
            (c / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-notes.txt").write_text("a file, not a checkpoint")
    found = find_checkpoints(tmp_path)
    assert [(c.step, c.complete, c.world_size) for c in found] == [
        (9, True, 1), (10, True, 2), (11, False, None)]
    assert read_checkpoint(tmp_path / "missing").world_size is None
    apply(ResumeDecision(None, (found[0].path,)))
    assert [c.step for c in find_checkpoints(tmp_path)] == [10, 11]
