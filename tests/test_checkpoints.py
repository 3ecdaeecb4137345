"""The resume decision (pure) with literal cases, and the file side kept apart from it."""
from __future__ import annotations

from dolly.checkpoints import Checkpoint, ResumeDecision, apply, decide_resume, find_checkpoints

FP = {"learning_rate": 0.001, "world_size": 2, "data_hash": "h1"}
C4 = Checkpoint("out/checkpoint-4", 4, True)
C8 = Checkpoint("out/checkpoint-8", 8, True)
C12_PARTIAL = Checkpoint("out/checkpoint-12", 12, False)


def test_auto_resumes_the_newest_complete_checkpoint_of_the_same_settings():
    assert decide_resume("auto", [C4, C8, C12_PARTIAL], FP, dict(FP), "out") == ResumeDecision(
        "out/checkpoint-8")


def test_auto_without_checkpoints_starts_fresh_and_removes_nothing():
    assert decide_resume("auto", [], None, FP, "out") == ResumeDecision(None)
    assert decide_resume("auto", [], {"old": 1}, FP, "out") == ResumeDecision(None)


def test_auto_with_other_settings_starts_fresh_naming_the_change():
    d = decide_resume("auto", [C4, C8], {**FP, "learning_rate": 0.0005}, FP, "out")
    assert d.resume_from is None
    assert d.remove == ("out/checkpoint-4", "out/checkpoint-8")
    assert d.notes == ("resume: out holds checkpoints of other data or settings "
                       "(learning_rate: 0.0005 -> 0.001); starting fresh and removing "
                       "checkpoint-4, checkpoint-8",)


def test_auto_without_a_fingerprint_file_does_not_resume():
    d = decide_resume("auto", [C4], None, FP, "out")
    assert d.resume_from is None and d.remove == ("out/checkpoint-4",)
    assert "(no fingerprint file)" in d.notes[0]


def test_never_removes_every_checkpoint_and_says_so():
    assert decide_resume("never", [C4, C12_PARTIAL], FP, FP, "out") == ResumeDecision(
        None, ("out/checkpoint-4", "out/checkpoint-12"),
        ("resume=never: removing checkpoint-4, checkpoint-12 from out",))
    assert decide_resume("never", [], FP, FP, "out") == ResumeDecision(None)


def test_an_explicit_checkpoint_is_resumed_as_asked_and_nothing_is_removed():
    assert decide_resume("elsewhere/checkpoint-3", [C4], FP, FP, "out") == ResumeDecision(
        "elsewhere/checkpoint-3")
    d = decide_resume("elsewhere/checkpoint-3", [C4], {**FP, "seed": 1}, FP, "out")
    assert (d.resume_from, d.remove) == ("elsewhere/checkpoint-3", ())
    assert d.notes == ("resume: elsewhere/checkpoint-3 was not written with these settings; "
                       "resuming it as asked",)


def test_find_checkpoints_orders_by_step_and_marks_incomplete_ones(tmp_path):
    for step, complete in ((10, True), (9, True), (11, False)):
        c = tmp_path / f"checkpoint-{step}"
        c.mkdir()
        if complete:
            (c / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-notes.txt").write_text("a file, not a checkpoint")
    found = find_checkpoints(tmp_path)
    assert [(c.step, c.complete) for c in found] == [(9, True), (10, True), (11, False)]
    apply(ResumeDecision(None, (found[0].path,)))
    assert [c.step for c in find_checkpoints(tmp_path)] == [10, 11]
