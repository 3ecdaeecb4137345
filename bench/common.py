"""Helpers shared by the benchmark scripts: argument parsing, data loading, the JSON last line."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca-layout JSON list of records.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="Where to run.")
    return p


def load_records(path: str, limit: int | None = None) -> list[dict]:
    records = json.loads(Path(path).read_text())
    return records[:limit] if limit else records


def machine() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def finish(result: dict) -> None:
    """Print the one JSON object that ends every benchmark's stdout."""
    result = {**result, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, sort_keys=True), flush=True)
