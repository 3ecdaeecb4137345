"""One Spark task's torchrun, ended with its task, exiting with torchrun's exit code.

Started by dolly.train.spark in place of `python -m torch.distributed.run` (same arguments).
pyspark's own `torch_run_process_wrapper` ends torchrun when the task's Python worker is gone,
but always exits 0, so a failed rank never fails the Spark job (measured, pyspark 4.3.0); the
DeepSpeed distributor starts torchrun with no wrapper, so ranks outlive a killed task. This file
runs as a script on the executors (the standard library only).

Spark may SIGKILL this process (pyspark's `_execute_command` gives it 0.5 s after SIGTERM), so
the clean-up cannot depend on it running: torchrun is started with the kernel's parent-death
signal (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`), and each rank sets the same for itself
(`die_with_parent`, called by dolly.train.rank), so the chain task -> guard -> torchrun -> rank
ends even when a rank hangs or is stopped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 5.0  # between SIGTERM (torchrun passes it to its ranks) and SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux); False where
    that is not available. Also for subprocess `preexec_fn` (it survives exec)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's process group (torchrun and its ranks), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + GRACE_S
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    parent = os.getppid()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv],
                            start_new_session=True, preexec_fn=die_with_parent)

    def on_sigterm(signum, frame):  # Spark ends a task's worker this way, too
        _stop(proc)
        os._exit(128 + signum)

    def watch() -> None:
        while proc.poll() is None:
            if os.getppid() != parent:  # the Spark task's Python worker is gone
                print("torchrun_guard: the Spark task is gone; ending its ranks", flush=True)
                _stop(proc)
                os._exit(1)
            time.sleep(0.5)

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=watch, daemon=True).start()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
