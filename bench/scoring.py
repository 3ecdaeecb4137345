"""Scoring: pyfunc batch predict of the registered model vs Dolly v1's `generate_response`.

One tiny GPT-J (freshly initialised, GPT-J's tokenizer with Dolly's tokens, generation stopping at
`### End`) is saved as the train step saves it, logged with dolly.registry.log_model into a
sqlite tracking store and registered. Then the same `--rows` instructions (the first records of
--data; instruction text only, as both sides use Dolly's no-input prompt) are answered:

- ours: `mlflow.pyfunc.load_model(models:/<name>/1).predict(instructions, params=...)`, one call;
- Dolly v1: `generate_response(instruction, model=..., tokenizer=...)` (training/generate.py)
  for one instruction at a time, on the same weights loaded with transformers.

Both greedy, the same max_new_tokens; model loading is timed apart (load_seconds). `agreement`
is the share of rows whose two answers are the same text (a check that both did the same work).
The pyfunc batches as the logged model_config's `batch_size` says (log_model sets it to
cfg.eval_batch_size; the JSON's `logged_batch_size`). `--batch-size N` also measures the same
weights logged by the same log_model call with batch_size N instead
(`rows_per_second_model_config_batch_size`); MLflow ignores a batch_size given only at load time.
"""
from __future__ import annotations

import tempfile
import os
import time
from contextlib import contextmanager
from pathlib import Path

from common import (add_model_args, add_limit, apply_threads, finish, generate_response, load_records,
                    log_and_register, parser, progress, same_text, tiny_registered_model)


@contextmanager
def batch_size_in_model_config(batch_size: int):
    """dolly.registry.log_model exactly, except for the batch_size in its model_config."""
    import mlflow.transformers

    original = mlflow.transformers.log_model

    def log_model(*a, **kw):
        kw["model_config"] = {**(kw.get("model_config") or {}), "batch_size": batch_size}
        return original(*a, **kw)

    mlflow.transformers.log_model = log_model
    try:
        yield
    finally:
        mlflow.transformers.log_model = original


def main() -> None:
    p = parser(__doc__)
    add_limit(p, default=1000)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_model_args(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=0,
                   help="Also measure the model logged with this model_config batch_size.")
    args = p.parse_args()
    apply_threads(args)
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    instructions = [r["instruction"] for r in load_records(args.data)][:args.rows]
    params = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, tok, folder, registered = tiny_registered_model(args, tmp, "bench-scoring", dtype)

        t = time.perf_counter()
        # MLflow's transformers flavor puts the pipeline on GPU 0 when there is one; -1 = CPU.
        os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = "0" if args.device == "cuda" else "-1"
        pyfunc = mlflow.pyfunc.load_model(registered)
        load_s = time.perf_counter() - t
        logged_batch_size = pyfunc.model_config.get("batch_size")
        pyfunc.predict(instructions[:1], params=params)  # warm-up, untimed (both sides)
        progress(f"ours: pyfunc predict of {len(instructions)} rows in one call")
        t = time.perf_counter()
        ours = list(pyfunc.predict(instructions, params=params))
        ours_s = time.perf_counter() - t
        progress(f"ours: {len(instructions) / ours_s:.2f} rows/s ({ours_s:.1f}s)")
        del pyfunc

        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        dtok = AutoTokenizer.from_pretrained(folder, padding_side="left")
        base_load_s = time.perf_counter() - t
        with torch.inference_mode():
            generate_response(instructions[0], model=model, tokenizer=dtok, do_sample=False,
                              max_new_tokens=args.max_new_tokens)
            progress(f"Dolly v1: generate_response for {len(instructions)} rows, one at a time")
            t = time.perf_counter()
            dolly = []
            for k, ins in enumerate(instructions, 1):
                dolly.append(generate_response(ins, model=model, tokenizer=dtok, do_sample=False,
                                               max_new_tokens=args.max_new_tokens))
                if k % 64 == 0:
                    progress(f"Dolly v1: {k} rows")
            base_s = time.perf_counter() - t
        progress(f"Dolly v1: {len(instructions) / base_s:.2f} rows/s ({base_s:.1f}s)")
        del model

        extra = {}
        if args.batch_size:
            # The same log_model call, with another batch_size in model_config.
            with batch_size_in_model_config(args.batch_size):
                _, fixed = log_and_register(folder, cfg, "bench-scoring-batched")
            pyfunc = mlflow.pyfunc.load_model(fixed)
            pyfunc.predict(instructions[:1], params=params)
            t = time.perf_counter()
            batched = list(pyfunc.predict(instructions, params=params))
            b_s = time.perf_counter() - t
            progress(f"pyfunc logged with model_config batch_size={args.batch_size}: "
                     f"{len(instructions) / b_s:.2f} rows/s ({b_s:.1f}s)")
            extra = {"rows_per_second_model_config_batch_size": round(len(instructions) / b_s, 3),
                     "speedup_model_config_batch_size": round(base_s / b_s, 3),
                     "model_config_batch_size": args.batch_size,
                     "agreement_model_config_batch_size": round(
                         sum(same_text(a, b) for a, b in zip(batched, dolly)) / len(dolly), 4)}
    rows = len(instructions)
    finish({"bench": "scoring", "rows": rows, "max_new_tokens": args.max_new_tokens,
            "tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype,
            "logged_batch_size": logged_batch_size,
            "model_shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": len(tok)},
            "rows_per_second": round(rows / ours_s, 3),
            "baseline_rows_per_second": round(rows / base_s, 3),
            "speedup": round(base_s / ours_s, 3), "seconds": round(ours_s, 2),
            "baseline_seconds": round(base_s, 2), "load_seconds": round(load_s, 2),
            "baseline_load_seconds": round(base_load_s, 2),
            "agreement": round(sum(same_text(a, b) for a, b in zip(ours, dolly)) / rows, 4),
            **extra})


if __name__ == "__main__":
    main()
