"""batch_score's output folder: new or empty, or one only batch_score wrote; nothing the step did
not write is ever deleted or overwritten. The new output is staged beside the folder and moved in
only when it is complete, so a failed job leaves the old output as it was."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dolly.errors import DollyError

MARKER = "_dolly_batch_score.json"  # what the step wrote into an output folder (file names)
MODES = ("error", "overwrite")


@dataclass
class OutputFolder:
    """Where batch_score writes, checked before any work: `replace` lists the files an earlier
    batch_score run wrote there (deleted only when the new output is complete)."""

    path: Path
    replace: list[str]


def check_output(output: str | Path, input: str | Path, mode: str = "error") -> OutputFolder:
    """Refuse an output that would overwrite or delete anything the step did not write.

    A new or empty folder is fine. A non-empty one is refused, unless `mode` is "overwrite" and
    everything in it was written by an earlier batch_score run (listed in its MARKER file). An
    output that is, holds or lies inside the input is refused. Raises DollyError (one line).
    """
    if mode not in MODES:
        raise DollyError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    out, src = Path(output).resolve(), Path(input).resolve()
    if out == src or out in src.parents or src in out.parents:
        how = "is" if out == src else "holds" if out in src.parents else "is inside"
        raise DollyError(f"output {output} {how} the input {input}: choose an output folder "
                         "outside it")
    if out.exists() and not out.is_dir():
        raise DollyError(f"output {output} is a file: give a folder")
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if not p.is_dir()) if out.exists() else []
    if not present:
        return OutputFolder(out, [])
    if mode != "overwrite":
        raise DollyError(f"output folder {output} is not empty ({len(present)} files, e.g. "
                         f"{present[0]}): batch_score writes only into a new or empty folder; "
                         "give another one, or -P mode=overwrite to replace what an earlier "
                         "batch_score run wrote there")
    try:
        written = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DollyError(f"output folder {output} was not written by batch_score (no valid "
                         f"{MARKER}): -P mode=overwrite only replaces batch_score's own "
                         "output; give another folder") from None
    if foreign := [p for p in present if p not in written and p != MARKER]:
        raise DollyError(f"output folder {output} holds {len(foreign)} files batch_score did not "
                         f"write (e.g. {foreign[0]}): move them or give another folder")
    return OutputFolder(out, sorted(written & set(present)))


def publish(staging: Path, folder: OutputFolder) -> list[str]:
    """Move a finished Spark output from `staging` into the folder, replacing only the files an
    earlier batch_score run wrote (folder.replace); returns the files now in it."""
    folder.path.mkdir(parents=True, exist_ok=True)
    for name in folder.replace:
        (folder.path / name).unlink(missing_ok=True)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    for name in files:
        (folder.path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, folder.path / name)
    shutil.rmtree(staging)
    return files


def write_sidecar(output: str | Path, info: dict) -> None:
    """`_scored_by.json` next to the Parquet parts (Spark and pandas skip `_` files)."""
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "_scored_by.json").write_text(json.dumps(info, indent=2))
