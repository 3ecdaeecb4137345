"""Serving: `mlflow models serve` of the registered model under concurrent clients, with and
without batching across requests, and what a timed-out request costs.

`--api chat` (the default): OpenAI chat completion requests (POST /v1/chat/completions, one
user message, temperature 0, `max_tokens` = --max-new-tokens), first whole, then streamed (the
same count, from the same clients) for the time to the first streamed token (the first event
after the role chunk: the first text, or the finish chunk of an answer without any); `--api
invocations`: MLflow's own `{"inputs": [...]}` requests to /invocations.

A tiny GPT-J (freshly initialised, GPT-J's tokenizer, generation stopping at `### End`) is saved
as the train step saves it, logged with dolly.registry.log_model into a sqlite store, registered,
and served with `mlflow models serve -m models:/<name>/1 --env-manager local` (one worker, MLflow's
default), twice in one run: with batching across requests off (DOLLY_SERVE_BATCH_WAIT_MS=0: each
request generates alone, as MLflow's server does for any model) and on (the logged
serve_batch_wait_ms, or --batch-wait-ms). For each server: one warm-up request (not counted),
`--lone` requests one after another (a lone request's latency: their median), then
`--concurrency` client threads send `--requests` POST /invocations requests in all, one
instruction each (the first records of --data), greedy with `--max-new-tokens`. Latency is per
request, from send to the full response; an error is a non-200 answer, a wrong number of
predictions or a failed connection.

The timeout test (batching on, `mlflow models serve -t --timeout-s`): one request of
`--timeout-rows` instructions and `--timeout-new-tokens` tokens, far more work than the timeout
allows; after its 504, the CPU time of the server's processes is sampled every 0.25 s
(/proc/<pid>/stat) until a 1 s window uses under 10% of one core: `seconds_to_idle_after_504`.
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


def cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every live process in process group `group` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == group:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


class Server:
    """`mlflow models serve` of `model_uri` in its own process group, with `env` added."""

    def __init__(self, args, model_uri: str, tmp: Path, name: str, env: dict, timeout_s=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{name}.log"
        full = {**os.environ, **env}
        full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full.get('PATH', '')}"
        if args.device == "cpu":
            full["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port),
               "-w", str(args.workers), *(["-t", str(timeout_s)] if timeout_s else [])]
        progress(f"{name}: starting {' '.join(cmd[1:])} ({env})")
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(cmd, env=full, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.start_s = wait_ready(self.proc, self.url, self.log, args.start_timeout)
        progress(f"{name}: ready in {self.start_s:.1f}s")

    def post(self, session, body, timeout=300, route="/invocations", **kw):
        return session.post(f"{self.url}{route}", json=body, timeout=timeout, **kw)


class Api:
    """One request of one instruction and whether its answer is well-formed, for `--api`."""

    def __init__(self, args):
        self.chat, self.tokens = args.api == "chat", args.max_new_tokens

    def send(self, server: Server, session, instruction: str, stream: bool = False):
        """(ok, why not, ms to the first streamed token or None) of one request."""
        if not self.chat:
            r = server.post(session, {"inputs": [instruction], "params": {
                "max_new_tokens": self.tokens, "do_sample": False}})
            ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
            return ok, "" if ok else f"{r.status_code}: {r.text[:200]}", None
        body = {"model": "dolly", "messages": [{"role": "user", "content": instruction}],
                "temperature": 0, "max_tokens": self.tokens, "stream": stream}
        t0 = time.perf_counter()
        r = server.post(session, body, route="/v1/chat/completions", stream=stream)
        if not stream:
            ok = r.status_code == 200 and len(r.json()["choices"]) == 1
            return ok, "" if ok else f"{r.status_code}: {r.text[:200]}", None
        # the first event after the role chunk: the first text, or the finish chunk of an
        # answer that has none (an untrained model's whitespace)
        first, done = None, False
        for line in r.iter_lines():
            if first is None and line.startswith(b"data: ") and b'"role"' not in line:
                first = (time.perf_counter() - t0) * 1000
            done = done or line == b"data: [DONE]"
        ok = r.status_code == 200 and done
        return ok, "" if ok else f"{r.status_code}: stream did not finish", first


def measure(args, server: Server, instructions: list[str], name: str) -> dict:
    """A lone request's latency, then `--requests` requests from `--concurrency` clients (with
    --api chat: whole, then streamed)."""
    import requests

    api = Api(args)
    session = requests.Session()
    t = time.perf_counter()
    ok, why, _ = api.send(server, session, instructions[0])
    warm_ms = (time.perf_counter() - t) * 1000
    if not ok:
        raise SystemExit(f"warm-up request failed: {why}")
    lone = []
    for i in range(args.lone):
        t = time.perf_counter()
        ok, why, _ = api.send(server, session, instructions[i % len(instructions)])
        lone.append((time.perf_counter() - t) * 1000)
        if not ok:
            raise SystemExit(f"lone request failed: {why}")
    out = concurrent(args, server, instructions, name, api, stream=False)
    lone_ms = percentile(lone, 50)
    out.update({"lone_ms": round(lone_ms, 1), "p50_over_lone": round(out["p50_ms"] / lone_ms, 3),
                "warmup_ms": round(warm_ms, 1), "server_start_seconds": round(server.start_s, 1)})
    if api.chat:
        lone_first = [api.send(server, session, instructions[i % len(instructions)], True)[2]
                      for i in range(args.lone)]
        streamed = concurrent(args, server, instructions, name + " streamed", api, stream=True)
        out.update({"lone_first_token_ms": round(percentile(lone_first, 50), 1),
                    **{f"streamed_{k}": v for k, v in streamed.items()}})
        out["errors"] += streamed["errors"]
    progress(f"{name}: {out}")
    return out


def concurrent(args, server: Server, instructions: list[str], name: str, api: Api,
               stream: bool) -> dict:
    """`--requests` requests from `--concurrency` client threads: latency percentiles,
    requests/s, errors (and the time to the first streamed token)."""
    import requests

    latencies: list[float] = []
    firsts: list[float] = []
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
            t0 = time.perf_counter()
            first = None
            try:
                ok, why, first = api.send(server, s, instructions[i % len(instructions)], stream)
            except Exception as e:  # connection refused, timeout, bad JSON
                ok, why = False, f"{type(e).__name__}: {e}"
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(ms)
                if first is not None:
                    firsts.append(first)
                if not ok:
                    errors.append(why)
                if len(latencies) % 32 == 0:
                    progress(f"{name}: {len(latencies)}/{args.requests} requests")

    progress(f"{name}: {args.requests} requests from {args.concurrency} concurrent clients")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for e in errors[:5]:
        progress(f"{name}: error: {e}")
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    out = {"p50_ms": round(p50, 1), "p90_ms": round(percentile(latencies, 90), 1),
           "p99_ms": round(p99, 1), "max_ms": round(max(latencies), 1),
           "mean_ms": round(sum(latencies) / len(latencies), 1),
           "p99_over_p50": round(p99 / p50, 3), "errors": len(errors),
           "requests_per_second": round(len(latencies) / wall, 3), "requests": len(latencies)}
    if firsts:
        out.update({"first_token_p50_ms": round(percentile(firsts, 50), 1),
                    "first_token_p99_ms": round(percentile(firsts, 99), 1)})
    return out


def timeout_test(args, server: Server, instructions: list[str]) -> dict:
    """One request far longer than the server's timeout; how soon the server is idle after its
    504, and whether it answers the next request."""
    import requests

    rows = [instructions[i % len(instructions)] for i in range(args.timeout_rows)]
    body = {"inputs": rows, "params": {"max_new_tokens": args.timeout_new_tokens,
                                       "do_sample": False}}
    session = requests.Session()
    progress(f"timeout: {len(rows)} rows x {args.timeout_new_tokens} tokens, server timeout "
             f"{args.timeout_s}s")
    t0 = time.perf_counter()
    r = server.post(session, body)
    status, answered_s = r.status_code, time.perf_counter() - t0
    group = server.proc.pid
    samples = [(time.monotonic(), cpu_seconds(group))]
    idle_s = None
    while time.monotonic() - samples[0][0] < args.idle_timeout:
        time.sleep(0.25)
        samples.append((time.monotonic(), cpu_seconds(group)))
        # the CPU used over the last second (4 samples)
        t_then, c_then = next(((t, c) for t, c in samples if samples[-1][0] - t <= 1.0))
        if samples[-1][0] - t_then >= 0.74 and (samples[-1][1] - c_then) / (
                samples[-1][0] - t_then) < 0.10:
            idle_s = t_then - samples[0][0]
            break
    t = time.perf_counter()
    after = server.post(session, {"inputs": instructions[:1],
                                  "params": {"max_new_tokens": args.max_new_tokens}})
    after_ms = (time.perf_counter() - t) * 1000
    out = {"timeout_status": status, "timeout_answered_s": round(answered_s, 2),
           "seconds_to_idle_after_504": None if idle_s is None else round(idle_s, 2),
           "next_request_status": after.status_code, "next_request_ms": round(after_ms, 1),
           "timeout_rows": len(rows), "timeout_new_tokens": args.timeout_new_tokens,
           "server_timeout_s": args.timeout_s}
    progress(f"timeout: {out}")
    return out


def main() -> None:
    p = parser(__doc__)
    add_limit(p, default=1000)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--api", choices=("chat", "invocations"), default="chat",
                   help="OpenAI chat requests (/v1/chat/completions) or MLflow's /invocations.")
    p.add_argument("--lone", type=int, default=8, help="Requests sent one after another.")
    p.add_argument("--batch-wait-ms", type=int, default=None,
                   help="DOLLY_SERVE_BATCH_WAIT_MS of the batched server (default: as logged).")
    p.add_argument("--timeout-s", type=int, default=3, help="The timeout test's server timeout.")
    p.add_argument("--timeout-rows", type=int, default=256)
    p.add_argument("--timeout-new-tokens", type=int, default=64)
    p.add_argument("--idle-timeout", type=float, default=120,
                   help="Give up waiting for the server to fall idle after this many seconds.")
    p.add_argument("--no-timeout-test", action="store_true")
    add_model_args(p)
    p.add_argument("--workers", type=int, default=1, help="uvicorn workers (MLflow's default 1).")
    p.add_argument("--start-timeout", type=float, default=300)
    args = p.parse_args()
    apply_threads(args)

    instructions = [r["instruction"] for r in load_records(args.data)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, _, registered = tiny_registered_model(args, tmp, "bench-serving")
        batched_env = ({} if args.batch_wait_ms is None
                       else {"DOLLY_SERVE_BATCH_WAIT_MS": str(args.batch_wait_ms)})
        for name, env in (("unbatched", {"DOLLY_SERVE_BATCH_WAIT_MS": "0"}),
                          ("batched", batched_env)):
            server = Server(args, registered, tmp, name, env)
            try:
                results[name] = measure(args, server, instructions, name)
            finally:
                stop(server.proc)
        timeout = {}
        if not args.no_timeout_test:
            server = Server(args, registered, tmp, "timeout", batched_env, args.timeout_s)
            try:
                timeout = timeout_test(args, server, instructions)
            finally:
                stop(server.proc)
    b, u = results["batched"], results["unbatched"]
    finish({"bench": "serving", "api": args.api, "concurrency": args.concurrency,
            "max_new_tokens": args.max_new_tokens, "tokenizer": args.tokenizer,
            "device": args.device, "workers": args.workers,
            "batch_wait_ms": args.batch_wait_ms if args.batch_wait_ms is not None else "logged",
            **b, "errors": b["errors"] + u["errors"],
            **{f"unbatched_{k}": v for k, v in u.items()},
            "requests_per_second_over_unbatched": round(
                b["requests_per_second"] / u["requests_per_second"], 3),
            **timeout})


if __name__ == "__main__":
    main()
