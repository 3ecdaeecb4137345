"""What tests share besides fixtures (those are in conftest.py): paths, subprocess environments,
tracking stores, the tiny model's settings, data-file and serving helpers, a hand-driven clock.

Tests import these with `from helpers import ...` (pytest.ini puts tests/ on sys.path); no test
imports conftest.py, which holds fixtures only.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent

# Pieces of Dolly's prompt template: none may appear in an answer the served model returns.
TEMPLATE_BITS = ("Below is an instruction", "### Instruction", "### Response", "### End")


def free_port() -> int:
    """A TCP port free on loopback now (for a rendezvous or a server: 29500 or 5000 may be held
    by another test session on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def mlflow_run_cmd(entry_point: str, params: dict, project: Path = ROOT) -> list[str]:
    """The command line `mlflow run <project> -e <entry_point> --env-manager local -P k=v ...`."""
    cmd = [str(BIN / "mlflow"), "run", str(project), "-e", entry_point, "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return cmd


def mlflow_run(entry_point: str, params: dict, tracking_uri: str, timeout: int = 600,
               project: Path = ROOT, **env_extra: str) -> subprocess.CompletedProcess:
    """`mlflow run <project> -e <entry_point> --env-manager local -P k=v ...`, run from the
    project folder (the repository root unless `project` names a copy)."""
    return subprocess.run(mlflow_run_cmd(entry_point, params, project), cwd=project,
                          env=project_env(tracking_uri, **env_extra), capture_output=True,
                          text=True, timeout=timeout)


def project_copy(dest: Path) -> Path:
    """The working tree as it is now (tracked and untracked files git does not ignore) copied to
    `dest` and committed there as a repository of its own: a project whose code version
    (dolly.pipeline.code_version: the git commit + uncommitted changes) cannot change while a test runs, even
    when someone edits this working tree meanwhile."""
    dest.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=dolly-tests", "-c", "user.email=tests@localhost",
           "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot for a test"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def fresh_store(folder: Path) -> str:
    """A new sqlite tracking store and registry in `folder`, its artifacts there too: created
    here, as otherwise the Default experiment would keep its artifacts in ./mlruns of the repo."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{folder}/mlflow.db"
    SqlAlchemyStore(uri, str(folder / "artifacts")).engine.dispose()
    return uri


# A 1-layer, 32-wide GPT-J over GPT-J's own tokenizer (offline), 64-token context: for unit tests
# that need a real model, not a trained one.
SMALLEST = {"tiny_n_layer": 1, "tiny_n_embd": 32, "tiny_n_head": 2, "tiny_rotary_dim": 8,
            "tiny_n_positions": 64, "max_length": 64, "tokenizer": "gpt-j"}


def corpus_tokenizer(records: int, seed: int, vocab_size: int):
    """A BPE of `vocab_size` tokens learned from `records` built-in records (generated with
    `seed`) in Dolly's format, with Dolly's markers added as special tokens."""
    from dolly import prompts
    from dolly.data import builtin_tasks
    from dolly.tokenizer import add_dolly_tokens, corpus_bpe

    texts = [prompts.format_record(r["instruction"], r["input"], r["output"])
             for r in builtin_tasks.generate(records, seed=seed)]
    return add_dolly_tokens(corpus_bpe(texts, vocab_size))


def prepared_run(root: Path, overrides: dict, experiment: str) -> tuple[str, str, Path]:
    """prepared/ for `overrides` (dolly.data.prepare, as the data_prep step runs it) logged as a
    data_prep-like run's artifact in a fresh sqlite store under `root`, in a new experiment.
    Returns (tracking URI, `runs:/<id>/prepared`, the local prepared/ folder)."""
    import mlflow

    from dolly import data
    from dolly.config import load_config

    uri = fresh_store(root)
    local = root / "prepared"
    data.prepare(load_config(None, overrides), local, progress=False)
    with tracking_to(uri):
        exp = mlflow.create_experiment(experiment, artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=exp, run_name="data_prep (fixture)") as run:
            mlflow.log_artifacts(str(local), "prepared")
    return uri, f"runs:/{run.info.run_id}/prepared", local


# A pretrained tiny base in a few token batches, not the default's minutes: end-to-end tests
# exercise pretraining and its cache, and pay for it once per configuration per session.
TINY_PRETRAIN = {"pretrain_steps": 4, "pretrain_batch_size": 4, "pretrain_seq_len": 32}


# --- evaluate / register / serving / Spark e2e: one tiny logged model per session -------------

# A tiny GPT-J (2 layers, 64 wide) on 200 built-in records: fast to build, log, load and serve.
TINY_OVERRIDES = {"builtin_records": 200, "test_size": 0.1, "tiny_n_layer": 2, "tiny_n_embd": 64,
                  "tiny_n_head": 4, "tiny_rotary_dim": 16, "tiny_n_positions": 256,
                  "max_length": 128, **TINY_PRETRAIN}
E2E_EXPERIMENT = "dolly-e2e"


def runs_in(tracking_uri: str, entry_point: str | None = None) -> list:
    """Every run of the store (all experiments), newest first; with `entry_point`, only the
    runs of that `mlflow run -e` entry point."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    where = f"tags.`mlflow.project.entryPoint` = '{entry_point}'" if entry_point else ""
    return client.search_runs([e.experiment_id for e in client.search_experiments()], where,
                              order_by=["attributes.start_time DESC"])


def runs_left(tracking_uri: str, wait_s: float = 60.0) -> list:
    """The store's active (not deleted) runs, in every experiment, once none is left or after
    `wait_s`: a run an entry point discards is deleted by a process of its own after
    `mlflow run` has ended it (dolly.cli.discard_launch_run)."""
    import time

    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient(tracking_uri)
    deadline = time.monotonic() + wait_s
    while True:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        runs = client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY)
        if not runs or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


@contextmanager
def tracking_to(uri: str):
    """In-process MLflow calls go to `uri` inside the block; the previous setting comes back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global, old_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


@dataclass
class TinyModel:
    """A logged (untrained) tiny model in its own sqlite store, as the train step would leave it."""

    root: Path
    tracking_uri: str
    experiment: str
    prepared: Path
    model_uri: str
    train_run: str
    data_hash: str

    def env(self, **extra: str) -> dict[str, str]:
        return project_env(self.tracking_uri, MLFLOW_EXPERIMENT_NAME=self.experiment, **extra)

    def mlflow_run(self, entry_point: str, params: dict, timeout: int = 600):
        return mlflow_run(entry_point, params, self.tracking_uri, timeout,
                          MLFLOW_EXPERIMENT_NAME=self.experiment)

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def fake_eval_run(self, tuned: float, base: float, metric: str = "exact_match",
                      model_uri: str | None = None, eval_set: str = "fixture-set",
                      eval_limit: int = 0) -> str:
        """A FINISHED evaluate-like run with the given primary metric (to drive the gate), as if
        it evaluated `model_uri` on evaluation set `eval_set` (the first `eval_limit` records of
        the fixture's prepared test split)."""
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment).experiment_id
        run = client.create_run(exp, tags={
            "mlflow.project.entryPoint": "evaluate", "model_uri": model_uri or self.model_uri,
            "train_run_id": self.train_run, "data_hash": self.data_hash,
            "base_model": "tiny-gptj", "prepared": str(self.prepared), "eval_set": eval_set})
        rid = run.info.run_id
        client.log_param(rid, "eval_limit", str(eval_limit))
        for k, v in {f"tuned/{metric}": tuned, f"base/{metric}": base, "eval_records": 20}.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid, "FINISHED")
        return rid


# --- instruction data files (tests/data: readers, validation, prepared) -----------------------

GOOD = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"},
    {"instruction": "Add the numbers.", "input": None, "output": "4"},
    {"instruction": "Say hi.", "output": "hi"},
]

# Files of instruction data as people really have it (issue 13).
CASES = FIXTURES / "data_cases"
NO_INPUT_RED = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\nName a primary color.\n\n"
                "### Response:\nRed.\n\n### End")


def write_jsonl(path, lines):
    """`lines` (records, or strings written as they are) as a JSON-lines file at `path`."""
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def prepare(tmp_path, dataset, **over):
    """dolly.data.prepare of `dataset` (GPT-J's tokenizer, one test record unless `over` says
    otherwise) into `tmp_path`/prepared."""
    from dolly import data
    from dolly.config import load_config

    cfg = load_config(None, {"dataset": str(dataset), "tokenizer": "gpt-j", "test_size": 1, **over})
    return data.prepare(cfg, tmp_path / "prepared", progress=False)


def rejected(tmp_path):
    """The records of `tmp_path`/prepared/rejected.jsonl."""
    return [json.loads(l) for l in (tmp_path / "prepared/rejected.jsonl").read_text().splitlines()]


def counts_of(result):
    """(records read, records kept, {reason: count} of the reasons that occurred)."""
    c = result.counts
    return (c["records_read"], c["records_kept"],
            {k[len("rejected_"):]: v for k, v in c.items() if k.startswith("rejected_") and v})


def text_of(result, instruction):
    """The training text of the kept record with `instruction`."""
    import pandas as pd

    kept = pd.concat([result.train, result.test]).set_index("instruction")
    return kept.loc[instruction, "text"]


# --- the served model's pyfunc (tests/serve) ----------------------------------------------------

def same_model(wrapped, wait_ms, batch_size=8):
    """Another DollyPyfunc over `wrapped`'s pipeline: batching across calls waiting `wait_ms`
    (0 = off), batches of `batch_size` rows."""
    from mlflow.transformers import _TransformersWrapper

    from dolly import prompts
    from dolly.serve.pyfunc import DollyPyfunc

    inner = _TransformersWrapper(wrapped.pipeline, {}, {"return_full_text": False,
                                                        "batch_size": batch_size},
                                 prompts.PROMPT_TEMPLATE)
    return DollyPyfunc(inner, {"serve_batch_wait_ms": wait_ms})


class SeenPrompts:
    """Records the prompts (left padding removed) the model is asked to continue."""

    def __init__(self, model):
        self.model, self.prompts, self._generate = model, [], model.generate

    def __enter__(self):
        def spy(input_ids=None, attention_mask=None, **kw):
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                self.prompts.append([t for t, m in zip(ids, mask) if m])
            return self._generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        self.model.generate = spy
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the instance attribute: the class's method again


# --- time ---------------------------------------------------------------------------------------

class FakeClock:
    """A clock that stands still until a test advances it: pass it where code takes a `clock`
    (a function returning seconds), so that a test asserts on durations and deadlines without
    sleeping. It starts far from any real `time.monotonic()` or `time.perf_counter()` (seconds
    since boot), so code that reads the real clock instead shows."""

    def __init__(self, start: float = 1e9):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Issue 23's data cases, each file as a user's exporter writes it; data_prep's literal results
# for each are asserted in tests/data (prepare) and tests/e2e/test_data_prep.py (mlflow run).
CR_RECORDS = [{"instruction": f"Name a {w}.", "input": "", "output": a}
              for w, a in (("planet", "Mars."), ("fruit", "Apple."), ("day", "Monday."),
                           ("pet", "Cat."))]
QUOTE_CSV = ('instruction,input,response\nSay hello.,,hello\n"Name a colour.,,red\nName a fruit.,,apple\n'
             'Name a day.,,monday\nName a pet.,,cat\n')


def write_case_files(folder):
    """The five files of issue 23's data cases in `folder` (created):
    cr.jsonl (4 records joined by a lone \\r), na.parquet (pandas `string` columns with pd.NA),
    invisible.jsonl (fields of zero-width characters only), list.parquet (a list<string> input),
    quote.csv (a stray quote at line 3 of a 6-line file)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cr.jsonl").write_bytes("\r".join(json.dumps(r) for r in CR_RECORDS).encode())
    pd.DataFrame({"instruction": ["Say one.", "Say two.", pd.NA, "Say four.", "Say five."],
                  "input": [pd.NA, "x", "y", pd.NA, "z"],
                  "output": ["one", "two", "three", "four", "five"]},
                 dtype="string").to_parquet(folder / "na.parquet")
    write_jsonl(folder / "invisible.jsonl", [
        {"instruction": "\u200b", "output": "a"},
        {"instruction": "\ufeff\u2060", "output": "b"},
        {"instruction": "Say c.", "output": "\u200b\u200b"},
        {"instruction": "Say d.", "input": "\u200b", "output": "d"}])
    pd.DataFrame({"instruction": ["Join the paragraphs.", "Say e."],
                  "input": [["para one", "para two"], None], "output": ["joined", "e"]}
                 ).to_parquet(folder / "list.parquet")
    (folder / "quote.csv").write_text(QUOTE_CSV, newline="")
    return folder


def mixed_chat_folder(folder: Path) -> Path:
    """A folder of every record layout data_prep reads, mixed: Alpaca (.json), dolly-15k and
    OpenAI/Hugging Face `messages` records with one record per conversation rejection reason
    (.jsonl, lines 4-9), ShareGPT `conversations` as a Parquet list of structs (row 2 is
    multi-turn with a system turn) and `messages` as JSON text in a CSV cell. Line 2 of the
    .jsonl is a multi-turn conversation whose last answer is in an earlier turn."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_alpaca.json").write_text(json.dumps([
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]))
    lines = [
        {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "My name is Ada."},
                      {"role": "assistant", "content": "Hello, Ada!"},
                      {"role": "user", "content": "What is my name?"},
                      {"role": "assistant", "content": "Ada"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
    ]
    (folder / "b_mixed.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    table = pa.table({"conversations": [
        [{"from": "human", "value": "Count to three."}, {"from": "gpt", "value": "1 2 3"}],
        [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi"},
         {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"},
         {"from": "gpt", "value": "Goodbye."}]]})
    pq.write_table(table, folder / "c_sharegpt.parquet")
    pd.DataFrame({"messages": [json.dumps([{"role": "user", "content": "Spell cat."},
                                           {"role": "assistant", "content": "c-a-t"}])]}).to_csv(
        folder / "d_chat.csv", index=False)
    return folder


# --- a model server ------------------------------------------------------------------------------

def start_server(model_uri: str, env: dict, log_path, timeout_s: int | None = None) -> tuple:
    """`mlflow models serve` of `model_uri` on a free loopback port: (process, base URL)."""
    import requests

    port = free_port()
    log = open(log_path, "w")
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), *(["-t", str(timeout_s)] if timeout_s else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            _fail(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            _fail("server did not answer /ping within 180 s")
        time.sleep(1)


def stop_server(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group only
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _fail(message: str):
    import pytest

    pytest.fail(message)
