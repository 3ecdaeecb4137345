"""dolly/train/torchrun_guard.py: torchrun's exit code reaches the Spark task (pyspark's own wrapper
always exits 0, so a failed rank would not fail the job)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

GUARD = ROOT / "dolly" / "train" / "torchrun_guard.py"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("code, expected", [(0, 0), (3, 1)])  # torchrun reports a failure as 1
def test_the_guard_exits_with_torchruns_code(tmp_path, code, expected):
    script = tmp_path / "rank.py"
    script.write_text(f"import os, sys\nprint('rank', os.environ['RANK'], 'ran')\nsys.exit({code})\n")
    proc = subprocess.run([sys.executable, str(GUARD), "--standalone", "--nnodes=1",
                           "--nproc_per_node=1", str(script)], capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == expected, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 0 ran" in proc.stdout
