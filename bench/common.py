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
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On a machine busy with other "
                        "jobs, 2 spinning threads on 2 cores can run several times slower than 1.")
    return p


def apply_threads(args) -> None:
    """Set torch's CPU threads (and OMP_NUM_THREADS for child processes) when --threads is given."""
    if getattr(args, "threads", 0):
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)


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


# --- shared by the padding / training / scoring / serving / memory benchmarks ----------------

def add_limit(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument("--limit", type=int, default=default,
                   help="Use only the first N records of --data (smoke tests).")


def config(overrides: dict):
    """The default profile + overrides, found from any working directory."""
    from dolly.config import DEFAULT_PROFILE, load_config

    return load_config(ROOT / DEFAULT_PROFILE, overrides)


def prepare(data_path: str, workdir: str | Path, tokenizer: str = "gpt-j", limit: int | None = None,
            max_length: int = 1024, **overrides):
    """The data as the pipeline sees it: dolly.data.prepare on the (first `limit`) records.

    Returns (cfg, prepared, tokenizer). max_length 1024 keeps every Alpaca record (longest: 727
    tokens with GPT-J's BPE); test_size 0.02 is Dolly's 1,000-of-52k holdout.
    """
    from dolly import data
    from dolly.tokenizer import load_tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = data_path
    if limit:
        src = workdir / "records.json"
        src.write_text(json.dumps(load_records(data_path, limit)))
    cfg = config({"dataset": str(src), "tokenizer": tokenizer, "max_length": max_length,
                  "test_size": 0.02, **overrides})
    prepared = data.prepare(cfg, workdir / "prepared", progress=False)
    tok = load_tokenizer(str(workdir / "prepared" / "tokenizer"))
    return cfg, prepared, tok


class DollyV1Collator:
    """Dolly v1's collator (training/trainer.py, DataCollatorForCompletionOnlyLM): transformers'
    DataCollatorForLanguageModeling(mlm=False, pad_to_multiple_of=8) pads each batch to its
    longest record (rounded up to a multiple of 8); labels up to and including the response-key
    token become -100. Features are {"input_ids": [...]} as Dolly's tokenized dataset holds them.
    """

    def __init__(self, tok, pad_to_multiple_of: int | None = 8):
        from transformers import DataCollatorForLanguageModeling

        from dolly.prompts import RESPONSE_KEY_NL

        self.inner = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False, return_tensors="pt",
                                                     pad_to_multiple_of=pad_to_multiple_of)
        self.response_id = tok.encode(RESPONSE_KEY_NL)[0]

    def __call__(self, features):
        import numpy as np

        batch = self.inner([{"input_ids": list(f["input_ids"])} for f in features])
        labels = batch["labels"].clone()
        for i in range(len(features)):
            hits = np.where(batch["labels"][i] == self.response_id)[0]
            if len(hits) == 0:
                raise RuntimeError("response key not found in a record")
            labels[i, :hits[0] + 1] = -100
        batch["labels"] = labels
        return batch


def random_order(n: int, seed: int):
    """Dolly v1's order: the Trainer's RandomSampler, a seeded torch permutation per epoch."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def batches(order, size: int):
    order = list(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def use_tracking_store(workdir: str | Path, experiment: str = "bench") -> str:
    """A fresh sqlite tracking store and registry under `workdir`, artifacts there too.

    Sets MLFLOW_TRACKING_URI (child processes such as `mlflow models serve` inherit it) and the
    active experiment; returns the tracking URI.
    """
    import mlflow

    workdir = Path(workdir)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().create_experiment(experiment,
                                                  artifact_location=str(workdir / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    return uri


def save_tiny_model(cfg, tok, folder: str | Path, dtype=None) -> Path:
    """A freshly initialised tiny GPT-J saved as the train step leaves it: left-padding tokenizer,
    generation stopping at `### End`."""
    from transformers import GenerationConfig

    from dolly.models.tiny import build_tiny
    from dolly.prompts import special_ids

    folder = Path(folder)
    model = build_tiny(cfg, tok)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=special_ids(tok)[1],
                                               pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"  # what save_pretrained persists
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def log_and_register(folder: str | Path, cfg, name: str) -> tuple[str, str]:
    """dolly.registry.log_model into a run, then register it: (logged URI, models:/name/version)."""
    import mlflow

    from dolly import registry

    with mlflow.start_run(run_name="bench"):
        uri = registry.log_model(folder, cfg)
    mv = mlflow.register_model(uri, name)
    return uri, f"models:/{name}/{mv.version}"


def tiny_registered_model(args, tmp: Path, name: str, dtype=None):
    """The tiny model scoring and serving measure, as the train step leaves it: built from
    `args` (add_model_args), saved under `tmp`, logged with dolly.registry.log_model into a
    fresh store there and registered as `name`. Returns (cfg, tokenizer, folder, models:/ URI)."""
    progress(f"building the tiny model ({args.tokenizer} tokenizer)")
    cfg, _, tok = prepare(args.data, tmp / "data", args.tokenizer, args.limit,
                          tiny_n_layer=args.n_layer, tiny_n_embd=args.n_embd,
                          tiny_n_head=args.n_head, tiny_rotary_dim=args.rotary_dim)
    folder = save_tiny_model(cfg, tok, tmp / "final", dtype)
    use_tracking_store(tmp)
    progress("logging with dolly.registry.log_model and registering")
    _, registered = log_and_register(folder, cfg, name)
    return cfg, tok, folder, registered


def generate_response(instruction: str, *, model, tokenizer, do_sample: bool = True,
                      max_new_tokens: int = 256, top_p: float = 0.92, top_k: int = 0,
                      **kwargs) -> str | None:
    """Dolly v1's training/generate.py `generate_response`, as published: one instruction, one
    `model.generate` call on the unpadded prompt (no attention mask), stop at `### End`, decode
    the tokens between the response key and `### End`."""
    import numpy as np

    from dolly.prompts import END_KEY, RESPONSE_KEY_NL, format_prompt

    device = next(model.parameters()).device
    input_ids = tokenizer(format_prompt(instruction), return_tensors="pt").input_ids.to(device)
    response_key_token_id = tokenizer.encode(RESPONSE_KEY_NL)[0]
    end_key_token_id = tokenizer.encode(END_KEY)[0]
    gen_args = {"top_p": top_p, "top_k": top_k} if do_sample else {}
    gen_tokens = model.generate(input_ids, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=end_key_token_id, do_sample=do_sample,
                                max_new_tokens=max_new_tokens, **gen_args, **kwargs)[0].cpu()
    response_positions = np.where(gen_tokens == response_key_token_id)[0]
    if len(response_positions) == 0:
        return None
    end_positions = np.where(gen_tokens == end_key_token_id)[0]
    end_pos = end_positions[0] if len(end_positions) > 0 else None
    return tokenizer.decode(gen_tokens[response_positions[0] + 1:end_pos]).strip()


def same_text(a: str | None, b: str | None) -> bool:
    """Equal up to whitespace and special tokens (the pipeline decodes with
    skip_special_tokens, Dolly's generate_response without)."""
    from dolly.prompts import SPECIAL_TOKENS

    def norm(s):
        s = s or ""
        for t in (*SPECIAL_TOKENS, *(t.strip() for t in SPECIAL_TOKENS), "<|endoftext|>"):
            s = s.replace(t, " ")
        return " ".join(s.split())

    return norm(a) == norm(b)


def add_model_args(p) -> None:
    """The tiny GPT-J's tokenizer and shape, the same defaults in every model benchmark."""
    p.add_argument("--tokenizer", default="gpt-j", choices=("gpt-j", "corpus-bpe"))
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--rotary-dim", type=int, default=16)
