"""Registering memory: peak RSS of logging + registering a >= 300M-parameter GPT-J checkpoint.

A GPT-J-shaped model (default: 20 layers, 1,024 wide, 16 heads, rotary 64, vocabulary 50,400:
about 355M parameters) is created with random weights and saved as safetensors, with GPT-J's
tokenizer and Dolly's tokens, the way the train step leaves its final folder. fp32 by default
(what the train step writes on CPU); `--dtype bf16` is what a GPU run's 16-bit gather writes.

Then a CHILD process does what the train and register steps do with it: dolly.registry.log_model
(the folder, logged without loading the weights) into a run of a sqlite tracking store, then
mlflow.register_model. The parent polls the child's RSS (with any processes it starts) every
10 ms, and the child reports its own peak (getrusage ru_maxrss) when it ends; peak_rss_bytes is
the larger of the two. Nothing is subtracted: baseline_rss_bytes is the peak RSS of a child that
only imports what the logging child imports (python, torch, transformers, mlflow, dolly), for
reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_limit, finish, parser, progress

HERE = Path(__file__).resolve()


def child(mode: str, folder: str, args) -> None:
    """Runs in a child process; prints one JSON line."""
    import resource

    if mode == "build":
        t = time.perf_counter()
        n = build(Path(folder), args)
        import mlflow

        mlflow.MlflowClient().create_experiment(
            os.environ["MLFLOW_EXPERIMENT_NAME"],
            artifact_location=str(Path(folder).parent / "artifacts"))
        print("CHILD " + json.dumps({
            "params": n, "seconds": time.perf_counter() - t,
            "self_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "children_maxrss_bytes": 0}), flush=True)
        return
    t0 = time.perf_counter()
    import mlflow  # noqa: F401  (the import cost is part of both children)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from common import config
    from dolly import registry

    out: dict = {"import_seconds": round(time.perf_counter() - t0, 2)}
    if mode == "log":
        t = time.perf_counter()
        cfg = config({"base_model": folder, "tokenizer": "", "dataset": "builtin"})
        with mlflow.start_run(run_name="register_memory"):
            uri = registry.log_model(folder, cfg)
        out["log_seconds"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        mv = mlflow.register_model(uri, "bench-register-memory")
        out.update(register_seconds=round(time.perf_counter() - t, 2), model_uri=uri,
                   version=str(mv.version))
    out["self_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("CHILD " + json.dumps(out), flush=True)


def measure(mode: str, folder: Path, env: dict, extra: list[str] = ()) -> dict:
    """Start a child, poll the RSS of its process tree until it exits; its report + the peak.

    Linux carries the parent's peak RSS into a child's ru_maxrss across fork and exec, so this
    parent stays small (no torch, no mlflow) and the model is built in a child of its own.
    """
    import psutil

    proc = subprocess.Popen([sys.executable, str(HERE), "--child", mode, "--folder", str(folder),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            for c in ps.children(recursive=True):
                try:
                    rss += c.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{err[-3000:]}")
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("CHILD "))
    report = json.loads(line[len("CHILD "):])
    report["polled_peak_bytes"] = peak
    report["peak_rss_bytes"] = max(peak, report["self_maxrss_bytes"],
                                   report["children_maxrss_bytes"])
    return report


def build(folder: Path, args) -> int:
    import torch
    from transformers import GenerationConfig, GPTJConfig, GPTJForCausalLM

    from common import config
    from dolly.tokenizer import build_tokenizer
    from dolly.prompts import special_ids

    tok = build_tokenizer(config({"tokenizer": "gpt-j"}))
    config = GPTJConfig(vocab_size=args.vocab, n_positions=2048, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, rotary_dim=args.rotary_dim,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = GPTJForCausalLM(config).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=special_ids(tok)[1],
                                               pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return n


def main() -> None:
    p = parser(__doc__)
    add_limit(p)  # unused: the model is synthetic; accepted like every benchmark's options
    p.add_argument("--n-layer", type=int, default=20)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--rotary-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50400)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--min-params", type=int, default=300_000_000,
                   help="Refuse smaller models (0 for smoke tests).")
    p.add_argument("--no-baseline", action="store_true",
                   help="Skip the imports-only child (baseline_rss_bytes is then absent).")
    p.add_argument("--child", choices=("build", "log", "baseline"), help=argparse_hidden())
    p.add_argument("--folder", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args.child, args.folder, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "final"
        progress(f"building a GPT-J-shaped model: {args.n_layer} layers, {args.n_embd} wide, "
                 f"vocabulary {args.vocab}, {args.dtype}")
        env = dict(os.environ)
        env.pop("MLFLOW_RUN_ID", None)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        env["MLFLOW_EXPERIMENT_NAME"] = "bench-register-memory"
        shape = ["--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head",
                 str(args.n_head), "--rotary-dim", str(args.rotary_dim), "--vocab",
                 str(args.vocab), "--dtype", args.dtype]
        built = measure("build", folder, env, shape)
        n = built["params"]
        if n < args.min_params:
            raise SystemExit(f"{n:,} parameters < --min-params {args.min_params:,}")
        model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        progress(f"{n:,} parameters, {model_bytes / 2**20:.0f} MiB of safetensors "
                 f"(built in {built['seconds']:.0f}s)")
        base = None
        if not args.no_baseline:
            progress("child: imports only (baseline)")
            base = measure("baseline", folder, env)
            progress(f"baseline peak RSS {base['peak_rss_bytes'] / 2**20:.0f} MiB")
        import resource

        # the floor every child's ru_maxrss starts from (see measure())
        parent_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        progress("child: registry.log_model + register_model")
        t = time.perf_counter()
        rep = measure("log", folder, env)
        wall = time.perf_counter() - t
        logged = sum(f.stat().st_size for f in (tmp / "artifacts").rglob("*.safetensors"))
        progress(f"peak RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB in {wall:.0f}s")
    peak = rep["peak_rss_bytes"]
    extra = {} if base is None else {
        "baseline_rss_bytes": base["peak_rss_bytes"],
        "peak_rss_above_baseline_over_model_bytes": round(
            (peak - base["peak_rss_bytes"]) / model_bytes, 3)}
    finish({"bench": "register_memory", "params": n, "dtype": args.dtype,
            "model_shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                            "vocab": args.vocab},
            "model_bytes": model_bytes, "peak_rss_bytes": peak,
            "peak_rss_over_model_bytes": round(peak / model_bytes, 3),
            "polled_peak_bytes": rep["polled_peak_bytes"],
            "self_maxrss_bytes": rep["self_maxrss_bytes"], "parent_maxrss_bytes": parent_maxrss,
            "logged_weight_bytes": logged, "child_seconds": round(wall, 1),
            "log_seconds": rep["log_seconds"], "register_seconds": rep["register_seconds"],
            "import_seconds": rep["import_seconds"], **extra})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
