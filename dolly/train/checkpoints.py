"""Which checkpoint the train step resumes: finding them (file system), deciding (pure), acting.

A fingerprint file in output_dir records the settings the checkpoints there were written with
(`launch.fingerprint`). `decide_resume` compares it with the new run's and says what to resume,
whether to convert it first, what to remove, or why to refuse. Checkpoints are removed only when
the user asked for it (`resume=never`): checkpoints of other settings stop the step before
anything is touched, with the change named and the two ways on.

The run's length is not in the fingerprint; each checkpoint's own trainer_state.json records the
length of the schedule it was trained on (`max_steps`), and `schedule_conflict` compares it with
the new run's: a checkpoint at or past the new run's last step, or one of a schedule of another
length (cosine, linear), stops the step the same way. Measured (transformers 5.17, deepspeed
0.19.8, 2 CPU ranks, cosine, no warmup): checkpoint-6 of a 6-step run resumed with max_steps=3
trained a 7th step and handed back 7 steps (and save_total_limit deleted checkpoint-3);
checkpoint-3 of a 3-step run resumed with max_steps=6 trained step 4 at learning rate 0 (the end
of the 3-step schedule, restored with the optimizer) and steps 5-6 at the 6-step schedule's.

The number of ranks may change between runs: a checkpoint written by another world size is
converted (a copy; the original stays as it is) into DeepSpeed's universal checkpoint format
(`deepspeed.checkpoint.ds_to_universal`), which the ranks load with
`"checkpoint": {"load_universal": true}`. Verified with ZeRO-3 and the Trainer, 2 -> 1 and
1 -> 2 CPU ranks (deepspeed 0.19.8, transformers 5.17).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dolly.errors import DollyError
from dolly.train.handoff import LENGTH_FREE_SCHEDULES

# Fingerprint entries a checkpoint survives changing: ZeRO shards are regrouped for the new
# world size through the universal format.
RESHARDABLE = ("world_size",)
UNIVERSAL_DIR = "universal"  # <output_dir>/universal/checkpoint-<step>-from-<n>-ranks


@dataclass(frozen=True)
class Checkpoint:
    """A `checkpoint-<step>` folder the Trainer wrote in output_dir."""

    path: str
    step: int
    complete: bool           # trainer_state.json exists: the Trainer writes it last
    world_size: int | None = None  # ranks whose ZeRO shards it holds (None: no DeepSpeed state)
    max_steps: int | None = None   # length of the schedule it was trained on (trainer_state.json)


@dataclass(frozen=True)
class ResumeDecision:
    """What to resume (a checkpoint path or None = start fresh), whether it must first be
    converted to the universal format (written by another world size), what to delete, and why;
    or `refuse`: the one-line reason to stop before launching."""

    resume_from: str | None
    remove: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    universal: bool = False
    refuse: str | None = None


def _step(p: Path) -> int:
    tail = p.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def _world_size(ckpt: Path) -> int | None:
    """Ranks in the DeepSpeed state that `latest` names (one optim_states file per rank)."""
    latest = ckpt / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    state = ckpt / tag if tag else None
    if state is None or not state.is_dir():
        return None
    return len(list(state.glob("*zero_pp_rank_*_optim_states.pt"))) or None


def _max_steps(ckpt: Path) -> int | None:
    """The schedule length trainer_state.json records (None: no such file or entry)."""
    try:
        steps = json.loads((ckpt / "trainer_state.json").read_text()).get("max_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) and steps > 0 else None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """What a checkpoint-<step> folder is: its step, whether it is complete (the Trainer writes
    trainer_state.json last), the world size that wrote it and its schedule's length."""
    p = Path(path)
    return Checkpoint(str(p), _step(p), (p / "trainer_state.json").is_file(), _world_size(p),
                      _max_steps(p))


def find_checkpoints(out: Path) -> list[Checkpoint]:
    """The checkpoint-* folders of `out`, oldest step first."""
    found = sorted((p for p in Path(out).glob("checkpoint-*") if p.is_dir()), key=_step)
    return [read_checkpoint(p) for p in found]


def changed_fields(old: dict[str, Any] | None, new: dict[str, Any],
                   ignore: Sequence[str] = ()) -> str:
    """'key: old -> new, ...' for the fingerprint entries that differ (except `ignore`)."""
    if old is None:
        return "no fingerprint file says which settings wrote them"
    return ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                     if k not in ignore and old.get(k) != v)


def schedule_conflict(ckpt: Checkpoint, steps: int, scheduler: str) -> str | None:
    """Why resuming `ckpt` into a run whose `scheduler` schedule has `steps` optimizer steps
    would not continue the schedule it was trained on, as '<name> (step k of n, <scheduler>
    schedule) ...: resuming would ...'; None when it continues it exactly.

    Refused: a checkpoint at or past `steps` (the Trainer trains one more step whatever
    max_steps says), and one trained on a schedule of another length (or of an unrecorded one)
    unless the schedule's value at a step does not depend on the length (LENGTH_FREE_SCHEDULES):
    the learning rate restored with the optimizer is the old schedule's, the scheduler then
    follows the new one, and the steps already taken followed the old one.
    """
    of = f" of {ckpt.max_steps}" if ckpt.max_steps else ", length not recorded"
    head = (f"{Path(ckpt.path).name} (step {ckpt.step}{of}, {scheduler} schedule) and this "
            f"run's schedule has {steps} steps: resuming would")
    if ckpt.step >= steps:
        return f"{head} train past step {steps}"
    if ckpt.max_steps != steps and scheduler not in LENGTH_FREE_SCHEDULES:
        return f"{head} train the rest on a mix of both schedules"
    return None


def _schedule_ways(ckpt: Checkpoint, rest: str) -> str:
    """The ways on after a schedule refusal: finishing the checkpoint's own run when it is not
    finished, then `rest`."""
    if ckpt.max_steps is not None and ckpt.step < ckpt.max_steps:
        return f"Set -P max_steps={ckpt.max_steps} to finish its run, or {rest}"
    return rest[0].upper() + rest[1:]


def _resume(ckpt: Checkpoint, world: int | None, notes: tuple[str, ...] = ()) -> ResumeDecision:
    if ckpt.world_size is None or world is None or ckpt.world_size == world:
        return ResumeDecision(ckpt.path, notes=notes)
    return ResumeDecision(ckpt.path, notes=notes + (
        f"resume: {Path(ckpt.path).name} was written by {ckpt.world_size} rank(s), this run has "
        f"{world}: resuming a copy converted to DeepSpeed's universal checkpoint format",),
        universal=True)


def decide_resume(resume: str, found: Sequence[Checkpoint], old: dict[str, Any] | None,
                  new: dict[str, Any], out: str, explicit: Checkpoint | None = None,
                  steps: int | None = None) -> ResumeDecision:
    """The resume decision, from facts only (no file access).

    resume: the config's `resume` ('auto', 'never' or a checkpoint path); found: output_dir's
    checkpoints, oldest first; old: the fingerprint file's content (None when absent); new: this
    run's fingerprint (its `world_size` is the new number of ranks, its `lr_scheduler` the
    schedule); out: output_dir (for the messages); explicit: the checkpoint `resume` names, when
    it names one; steps: the optimizer steps of this run's schedule (None: not checked).
    """
    world = new.get("world_size")
    names = ", ".join(Path(c.path).name for c in found)
    if resume == "never":
        notes = (f"resume=never: removing {names} from {out}",) if found else ()
        return ResumeDecision(None, tuple(c.path for c in found), notes)
    if resume != "auto":
        if explicit is None or not explicit.complete:
            return ResumeDecision(None, refuse=f"config key 'resume': '{resume}' is not a "
                                  "checkpoint folder (no trainer_state.json)")
        conflict = None if steps is None else schedule_conflict(
            explicit, steps, new.get("lr_scheduler"))
        if conflict:
            return ResumeDecision(None, refuse=(
                f"resume={resume}: {conflict}; nothing was deleted. " + _schedule_ways(
                    explicit, "resume another checkpoint (or pass -P resume=never to start "
                    "fresh)")))
        notes = () if old == new else (
            f"resume: {resume} was not written with these settings; resuming it as asked",)
        return _resume(explicit, world, notes)
    if not found:
        return ResumeDecision(None)
    changed = changed_fields(old, new, RESHARDABLE)
    if changed:
        return ResumeDecision(None, refuse=(
            f"resume=auto: output_dir '{out}' holds checkpoints of other data or settings "
            f"({names}; {changed}); nothing was deleted. Set those back to continue them, or "
            "pass -P resume=never to delete them and start fresh (or -P output_dir=<another "
            "folder>)"))
    last = next((c for c in reversed(found) if c.complete), None)
    if last is None:  # only interrupted saves: the new run overwrites them as it reaches them
        return ResumeDecision(None, notes=(
            f"resume: no complete checkpoint in {out} ({names} were interrupted while saving); "
            "starting fresh",))
    conflict = None if steps is None else schedule_conflict(last, steps, new.get("lr_scheduler"))
    if conflict:
        return ResumeDecision(None, refuse=(
            f"resume=auto: output_dir '{out}' holds {conflict}; nothing was deleted. "
            + _schedule_ways(last, f"pass -P resume=never to delete {names} and start fresh (or "
                             "-P output_dir=<another folder>)")))
    return _resume(last, world)


def apply(decision: ResumeDecision) -> None:
    """Carry out the deletions `decision` names (nodes sharing output_dir may race here)."""
    for path in decision.remove:
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of the weights on the same file system
    except OSError:
        shutil.copy2(src, dst)


def to_universal(ckpt: Checkpoint, out: Path) -> Path:
    """A copy of `ckpt` whose DeepSpeed state is in the universal format, for another world size.

    Written to <out>/universal/<name>-from-<n>-ranks (files other than the ZeRO shards are
    hard-linked where possible; the original checkpoint is not changed) and reused when already
    there. Every rank's shards must be in `ckpt` (one file system). Raises DollyError with the
    converter's last line when DeepSpeed cannot convert it.
    """
    src = Path(ckpt.path)
    dest = out / UNIVERSAL_DIR / f"{src.name}-from-{ckpt.world_size}-ranks"
    tag = (src / "latest").read_text().strip()
    if (dest / "trainer_state.json").is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)  # a conversion of ours that did not finish
    shutil.copytree(src, dest, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(
        "global_step*", "latest", "trainer_state.json"))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(src / tag), "--output_folder", str(dest / f"{tag}_universal"),
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / "latest_universal").is_file():
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        shutil.rmtree(dest, ignore_errors=True)
        raise DollyError(f"cannot convert {src} to DeepSpeed's universal checkpoint format "
                         f"({lines[-1] if lines else 'no output'}); resume it with "
                         f"{ckpt.world_size} rank(s) or pass -P resume=never")
    # like the Trainer, write trainer_state.json last: it marks a finished conversion
    _link_or_copy(str(src / "trainer_state.json"), str(dest / "trainer_state.json"))
    return dest
