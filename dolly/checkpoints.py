"""Which checkpoint the train step resumes: finding them (file system), deciding (pure), acting.

A fingerprint file in output_dir records the settings the checkpoints there were written with
(`launch.fingerprint`); `decide_resume` compares it with the new run's and says what to resume
and what to remove, and `apply` is the only code that deletes checkpoints.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Checkpoint:
    """A `checkpoint-<step>` folder the Trainer wrote in output_dir."""

    path: str
    step: int
    complete: bool  # trainer_state.json exists: the Trainer writes it last


@dataclass(frozen=True)
class ResumeDecision:
    """What to resume (a checkpoint path or None = start fresh), what to delete, and why."""

    resume_from: str | None
    remove: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _step(p: Path) -> int:
    tail = p.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def find_checkpoints(out: Path) -> list[Checkpoint]:
    """The checkpoint-* folders of `out`, oldest step first."""
    found = sorted((p for p in Path(out).glob("checkpoint-*") if p.is_dir()), key=_step)
    return [Checkpoint(str(p), _step(p), (p / "trainer_state.json").is_file()) for p in found]


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """'key: old -> new, ...' for the fingerprint entries that differ."""
    if old is None:
        return "no fingerprint file"
    return ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v)


def decide_resume(resume: str, found: Sequence[Checkpoint], old: dict[str, Any] | None,
                  new: dict[str, Any], out: str) -> ResumeDecision:
    """The resume decision, from facts only (no file access).

    resume: the config's `resume` ('auto', 'never' or a checkpoint path, already checked to be
    one); found: output_dir's checkpoints, oldest first; old: the fingerprint file's content
    (None when absent); new: this run's fingerprint; out: output_dir (for the notes).
    """
    names = ", ".join(Path(c.path).name for c in found)
    if resume == "never":
        notes = (f"resume=never: removing {names} from {out}",) if found else ()
        return ResumeDecision(None, tuple(c.path for c in found), notes)
    if resume != "auto":
        notes = () if old == new else (
            f"resume: {resume} was not written with these settings; resuming it as asked",)
        return ResumeDecision(resume, (), notes)
    last = next((c for c in reversed(found) if c.complete), None)
    if last and old == new:
        return ResumeDecision(last.path)
    if not found:
        return ResumeDecision(None)
    # left in place they would outrank the new run's checkpoints
    return ResumeDecision(None, tuple(c.path for c in found), (
        f"resume: {out} holds checkpoints of other data or settings ({changed_fields(old, new)}); "
        f"starting fresh and removing {names}",))


def apply(decision: ResumeDecision) -> None:
    """Carry out the deletions `decision` names (nodes sharing output_dir may race here)."""
    for path in decision.remove:
        shutil.rmtree(path, ignore_errors=True)
