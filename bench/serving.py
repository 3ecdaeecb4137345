"""Serving: `mlflow models serve` of the registered model under concurrent clients.

A tiny GPT-J (freshly initialised, GPT-J's tokenizer, generation stopping at `### End`) is saved
as the train step saves it, logged with dolly.registry.log_model into a sqlite store, registered,
and served with `mlflow models serve -m models:/<name>/1 --env-manager local` (one worker, MLflow's
default). `--concurrency` client threads send `--requests` POST /invocations requests in all, one
instruction each (the first records of --data), greedy with `--max-new-tokens`. Latency is per
request, from send to the full response; an error is a non-200 answer, a wrong number of
predictions or a failed connection. One warm-up request goes first and is not counted.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (add_model_args, add_limit, apply_threads, finish, free_port, load_records, parser,
                    percentile, progress, tiny_registered_model)


def wait_ready(proc, url: str, log: Path, timeout: float) -> float:
    import requests

    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"server did not answer /ping within {timeout:.0f}s")
        time.sleep(0.5)


def stop(proc) -> None:
    """End the server's own process group (it was started in a new session)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def main() -> None:
    p = parser(__doc__)
    add_limit(p, default=1000)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    add_model_args(p)
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (MLflow's default 1).")
    p.add_argument("--start-timeout", type=float, default=300)
    args = p.parse_args()
    apply_threads(args)
    import requests

    instructions = [r["instruction"] for r in load_records(args.data)]
    params = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, _, registered = tiny_registered_model(args, tmp, "bench-serving")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp / "serve.log"
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", registered,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
               "-w", str(args.workers)]
        progress(f"starting {' '.join(cmd[1:])}")
        with log.open("w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            start_s = wait_ready(proc, url, log, args.start_timeout)
            progress(f"server ready in {start_s:.1f}s")
            session = requests.Session()
            t = time.perf_counter()
            warm = session.post(f"{url}/invocations", timeout=300,
                                json={"inputs": instructions[:1], "params": params})
            warm_ms = (time.perf_counter() - t) * 1000
            if warm.status_code != 200:
                raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text[:500]}")

            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            next_i = iter(range(args.requests))

            def client():
                s = requests.Session()
                while True:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    body = {"inputs": [instructions[i % len(instructions)]], "params": params}
                    t0 = time.perf_counter()
                    try:
                        r = s.post(f"{url}/invocations", json=body, timeout=300)
                        ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                        why = "" if ok else f"{r.status_code}: {r.text[:200]}"
                    except Exception as e:  # connection refused, timeout, bad JSON
                        ok, why = False, f"{type(e).__name__}: {e}"
                    ms = (time.perf_counter() - t0) * 1000
                    with lock:
                        latencies.append(ms)
                        if not ok:
                            errors.append(why)
                        if len(latencies) % 16 == 0:
                            progress(f"{len(latencies)}/{args.requests} requests")

            progress(f"{args.requests} requests from {args.concurrency} concurrent clients")
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
        finally:
            stop(proc)
    for e in errors[:5]:
        progress(f"error: {e}")
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    finish({"bench": "serving", "requests": len(latencies), "concurrency": args.concurrency,
            "max_new_tokens": args.max_new_tokens, "tokenizer": args.tokenizer,
            "device": args.device, "workers": args.workers,
            "p50_ms": round(p50, 1), "p90_ms": round(percentile(latencies, 90), 1),
            "p99_ms": round(p99, 1), "max_ms": round(max(latencies), 1),
            "mean_ms": round(sum(latencies) / len(latencies), 1),
            "p99_over_p50": round(p99 / p50, 3), "errors": len(errors),
            "requests_per_second": round(len(latencies) / wall, 3),
            "warmup_ms": round(warm_ms, 1), "server_start_seconds": round(start_s, 1)})


if __name__ == "__main__":
    main()
