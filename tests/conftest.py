"""Shared fixtures. Each test builds its own tiny data; e2e tests run the real entry points."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent


def project_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess: this venv first on PATH, the given sqlite store, offline."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("MLFLOW_RUN_ID", None)
    env.update(extra)
    return env


def mlflow_run(entry_point: str, params: dict[str, str], tracking_uri: str,
               timeout: int = 600, **env_extra: str) -> subprocess.CompletedProcess:
    """`mlflow run . -e <entry_point> --env-manager local -P k=v ...` from the project root."""
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, cwd=ROOT, env=project_env(tracking_uri, **env_extra),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh sqlite tracking store and registry for one test."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def alpaca_sample() -> Path:
    return FIXTURES / "alpaca_sample.json"
