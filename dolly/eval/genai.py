"""The evaluate step's per-example answers as MLflow 3 GenAI evaluations: each held-out record a
trace with its scores, the base and the tuned model side by side in the MLflow UI.

Layout. `log_evaluations` runs inside the evaluate run and adds one nested child run per model,
named after it: '<evaluate run name> base' and '<evaluate run name> tuned' ('evaluate tiny-gptj
base'). Each is an evaluation run made by `mlflow.genai.evaluate` (tag `mlflow.runType` =
`genai_evaluate`) and holds, per evaluated record, one trace:

- inputs: {'instruction': ..., 'context': ...}, 'context' being the record's `input` (the
  Alpaca field; Dolly-15k's `context`), only when it has one. Not named 'input': the MLflow UI
  shows a request's 'input' field alone, which would hide the instruction;
- outputs: the answer evaluate already generated with greedy decoding (nothing is generated
  again; no predict_fn);
- the expectation `expected_response`: the record's reference response;
- the assessments of SCORERS: `exact_match` (1.0/0.0), `rouge_l` (ROUGE-L F1, 0..1) and `stop`
  (True when the answer ended with `### End` before the token limit), the same functions
  (dolly.eval.metrics) and values as the evaluate run's metrics and eval_examples.json;
- the root span's attributes `dolly.model` ('base'/'tuned') and `dolly.stopped`, and the trace
  tag `category` (the record's task family, when it has one); on the tuned traces the tuned
  LoggedModel's id (`mlflow.modelId`).

The child run's metrics are MLflow's means of the assessments (`exact_match/mean`,
`rouge_l/mean`, `stop/mean`); they equal the evaluate run's `base/exact_match`,
`base/rouge_l`, `base/stop_rate` (and tuned's), which stay the names to chart and gate on.

Why two child runs: the experiment's Evaluation runs page shows one evaluation run's traces with
their scores and compares two selected runs ('Compare': "Comparing <run> to <run>"), pairing the
rows by the trace's request (seen in the MLflow 3.17.2 UI): base and tuned get identical inputs,
so each record's two answers line up with their scores. Nested under the evaluate run, their
`<scorer>/mean` metrics stay off the evaluate run, which keeps one name per measure. Not
`model_id=` for mlflow.genai.evaluate: it would also put `exact_match/mean`... on the tuned
LoggedModel, beside its `tuned/exact_match`.

Offline and quiet on purpose, set here for the call only (a value the user exported wins):
the scorers are plain Python (no LLM judge, no network; `timeout=0`: no watchdog thread per
call) and _SETTINGS turns off what suits remote LLM judges, not local code on sqlite:
`MLFLOW_GENAI_EVAL_PREDICT_RATE_LIMIT` and `..._SCORER_RATE_LIMIT` = 0 (the default 'auto'
throttles to 10 records per second, most of the time on a 2-core machine);
`MLFLOW_GENAI_EVAL_MAX_WORKERS` and `..._MAX_SCORER_WORKERS` = 1 (MLflow's 10 threads writing to a
sqlite store exhausted SQLAlchemy's connection pool: 'QueuePool limit of size 5 overflow 10
reached', 30 s waits); `MLFLOW_ENABLE_ASYNC_TRACE_LOGGING` = false (traces are written before
they are scored). MLflow's progress bar and its 'Evaluation completed' banner are captured
(shown only if the evaluation fails). Cost, measured on 2 cores with sqlite: about 40 ms per
evaluated record for both runs (a trace write, 4 assessment writes and a run link per trace and
model: MLflow's store, not the scorers).

No local path in a trace: MLflow stamps each trace with the process's source (sys.argv[0], an
absolute path under `python -m steps.evaluate`) and the git remote (a local folder for a clone
of a local repository); both are replaced by `source_metadata`. What remains is the store's own
`mlflow.artifactLocation` tag (where a local store keeps the trace's files, as every run's
artifact_uri).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from mlflow.genai.scorers import scorer

from dolly.eval import metrics
from dolly.tracking import without_schema_hint

MODELS = ("base", "tuned")
EXPECTATION = "expected_response"
STOPPED_ATTR = "dolly.stopped"
MODEL_ATTR = "dolly.model"

# Set for the call only, unless the user exported them (see the module docstring).
_SETTINGS = {"MLFLOW_GENAI_EVAL_PREDICT_RATE_LIMIT": "0",
             "MLFLOW_GENAI_EVAL_SCORER_RATE_LIMIT": "0",
             "MLFLOW_GENAI_EVAL_MAX_WORKERS": "1", "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS": "1",
             "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}


def _answer(outputs: Any) -> str:
    return "" if outputs is None else str(outputs)


def _reference(expectations: dict | None) -> str | None:
    if not expectations or expectations.get(EXPECTATION) is None:
        return None
    return str(expectations[EXPECTATION])


@scorer(name="exact_match", timeout=0)
def exact_match_scorer(outputs, expectations) -> float | None:
    """1.0 when the answer equals the expected response after dolly.eval.metrics.normalise
    (case, spacing, trailing punctuation), else 0.0; None (no assessment) without one."""
    ref = _reference(expectations)
    return None if ref is None else metrics.exact_match(_answer(outputs), ref)


@scorer(name="rouge_l", timeout=0)
def rouge_l_scorer(outputs, expectations) -> float | None:
    """ROUGE-L F1 (0..1) of the answer against the expected response (dolly.eval.metrics)."""
    ref = _reference(expectations)
    return None if ref is None else metrics.rouge_l(_answer(outputs), ref)


@scorer(name="stop", timeout=0)
def stop_scorer(trace) -> bool | None:
    """Whether the answer ended with `### End` before the token limit: the root span's
    `dolly.stopped` attribute (set by `log_evaluations`); None for a trace without it."""
    spans = getattr(getattr(trace, "data", None), "spans", None) or []
    root = next((s for s in spans if s.parent_id is None), None)
    value = None if root is None else (root.attributes or {}).get(STOPPED_ATTR)
    return None if value is None else bool(value)


SCORERS = [exact_match_scorer, rouge_l_scorer, stop_scorer]


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def answer_rows(table: pd.DataFrame, who: str) -> list[dict[str, Any]]:
    """One row per record of evaluate's per-example table (columns instruction, input,
    reference, category, <who>_response, <who>_stopped): {'inputs', 'outputs', 'expectations',
    'stopped', 'category'}, in table order. `inputs` is the same for base and tuned."""
    rows = []
    for r in table.to_dict("records"):
        inputs = {"instruction": _text(r.get("instruction"))}
        if _text(r.get("input")).strip():
            inputs["context"] = _text(r.get("input"))
        rows.append({"inputs": inputs, "outputs": _text(r.get(f"{who}_response")),
                     "expectations": {EXPECTATION: _text(r.get("reference"))},
                     "stopped": _text(r.get(f"{who}_stopped")) == "True",  # NaN: not stopped
                     "category": _text(r.get("category"))})
    return rows


def _local_path(value: str) -> bool:
    return value.startswith("file:") or os.path.isabs(value)


def source_metadata(parent_tags: dict[str, str]) -> dict[str, str]:
    """Trace metadata that replaces what MLflow resolves from the process: `mlflow.source.name`
    as a path relative to the working directory (the project root under `mlflow run`:
    'steps/evaluate.py'; the file name when the script lies elsewhere) and
    `mlflow.source.git.repoURL` from the evaluate run's tag, '' when it is a local folder."""
    main = sys.argv[0] if sys.argv and sys.argv[0] else "<console>"
    if os.path.isabs(main):
        path, cwd = Path(main).resolve(), Path.cwd().resolve()
        main = str(path.relative_to(cwd)) if path.is_relative_to(cwd) else path.name
    repo = parent_tags.get("mlflow.source.git.repoURL", "")
    return {"mlflow.source.name": main,
            "mlflow.source.git.repoURL": "" if _local_path(repo) else repo}


@contextlib.contextmanager
def _offline_quiet():
    """_SETTINGS in the environment (the user's own values kept), stdout and stderr captured;
    on an error the captured text is written to stderr before the error propagates."""
    added = {k: v for k, v in _SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    captured = io.StringIO()
    try:
        # the schema hint comes from MLflow's scoring threads (not captured here) when it logs
        # the evaluation data as a dataset
        with (contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured),
              without_schema_hint()):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        for k in added:
            os.environ.pop(k, None)


def _log_traces(rows: list[dict], who: str, experiment_id: str, run_id: str,
                metadata: dict[str, str], model_id: str | None) -> list:
    """One trace per row in the active run's experiment (root span 'answer', type LLM), read
    back as Trace objects in row order."""
    import mlflow

    ids = []
    for row in rows:
        with mlflow.start_span(name="answer", span_type="LLM", attributes={
                MODEL_ATTR: who, STOPPED_ATTR: row["stopped"]}) as span:
            span.set_inputs(row["inputs"])
            span.set_outputs(row["outputs"])
            mlflow.update_current_trace(
                metadata=metadata, tags={"category": row["category"]} if row["category"] else {},
                model_id=model_id)
        ids.append(span.trace_id)
    mlflow.flush_trace_async_logging()  # no-op when written synchronously (_SETTINGS)
    found = {t.info.trace_id: t for t in mlflow.search_traces(
        locations=[experiment_id], run_id=run_id, return_type="list", max_results=len(ids) + 10)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(ids)} traces were not stored")
    return [found[i] for i in ids]


def _say(line: str) -> None:
    print(line, flush=True)


def log_evaluations(table: pd.DataFrame, model_id: str | None = None,
                    log: Callable[[str], None] = _say) -> dict[str, str]:
    """Log evaluate's per-example table (one row per evaluated record, as Evaluation.examples)
    as two MLflow evaluation runs nested in the active run, base then tuned (module docstring).
    `model_id`: the tuned model's MLflow 3 LoggedModel ('m-...'), set on the tuned traces
    (`mlflow.modelId`: the model's Traces tab lists them). Returns {'base': run id, 'tuned':
    run id}; {} for an empty table. Needs an active run."""
    import mlflow

    if len(table) == 0:
        return {}
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("log_evaluations needs an active run (the evaluate run)")
    parent_run = mlflow.get_run(parent.info.run_id)
    name, experiment_id = parent_run.info.run_name, parent_run.info.experiment_id
    metadata = source_metadata(parent_run.data.tags)
    child_tags = {k: v for k, v in parent_run.data.tags.items()
                  if k in ("mlflow.source.type", "mlflow.source.git.commit", "dolly.code_version")}
    child_tags["mlflow.source.name"] = metadata["mlflow.source.name"]
    t0 = time.perf_counter()
    run_ids = {}
    for who in MODELS:
        rows = answer_rows(table, who)
        other = "tuned" if who == "base" else "base"
        note = (f"The {who} model's answers to the {len(rows)} held-out records of the evaluate "
                f"run {parent.info.run_id}, one trace each with its exact_match, rouge_l and stop "
                f"scores. The experiment's Evaluation runs page: tick this run and "
                f"'{name} {other}', then Compare, to see both answers to each record side by "
                f"side.")
        with mlflow.start_run(run_name=f"{name} {who}", nested=True, experiment_id=experiment_id,
                              tags={**child_tags, "dolly.evaluated": who}, description=note) as run:
            with _offline_quiet():
                traces = _log_traces(rows, who, experiment_id, run.info.run_id, metadata,
                                     model_id if who == "tuned" else None)
                data = pd.DataFrame({"trace": traces,
                                     "expectations": [r["expectations"] for r in rows]})
                mlflow.genai.evaluate(data=data, scorers=SCORERS)
            run_ids[who] = run.info.run_id
    log(f"evaluate: per-record answers and scores logged as the evaluation runs '{name} base' "
        f"and '{name} tuned' ({len(table)} traces each, {time.perf_counter() - t0:.1f}s); "
        "MLflow UI: Evaluation runs, tick both, Compare")
    return run_ids
