"""evaluate entry point: base model vs tuned model on the held-out test split.

Inputs: -P model_uri=<the train run's logged model (models:/m-..., runs:/<run>/model, a registered
model URI, or a saved folder)> -P prepared=<data_prep's prepared/ (runs:/<run>/prepared or a path)>.
Logs base/<metric> and tuned/<metric> (see dolly/evaluation.py), per task family
base/exact_match/<family>, tuned/exact_match/<family> (and rouge_l), a per-example table
(eval_examples.json), the tags data_hash, model_uri, train_run_id, and as the run's description
(and comparison.md) base and tuned answers side by side by family (dolly/report.py).
"""
from __future__ import annotations

import gc
import time

import mlflow
import pandas as pd

from dolly import cli, compare, data, evaluation, modeling, pretraining, report, tracking
from dolly.errors import DollyError
from dolly.tokenizer import load_tokenizer


def _train_params(run_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    if not run_id:
        return {}, {}
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # the run may live in another tracking store or be deleted
        return {}, {}
    return dict(run.data.params), dict(run.data.tags)


def _free(model) -> None:
    del model
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def comparison(metrics: dict[str, float]) -> pd.DataFrame:
    """One row per metric with the base and tuned values side by side (the MLflow UI shows a
    logged table as a table; base/ and tuned/ metrics land in separate chart sections)."""
    names = [k[len("tuned/"):] for k in metrics if k.startswith("tuned/")]
    rows = [{"metric": n, "base": metrics.get(f"base/{n}"), "tuned": metrics[f"tuned/{n}"]}
            for n in names]
    return pd.DataFrame(rows, columns=["metric", "base", "tuned"])


def main(argv: list[str]) -> None:
    cfg, inp = cli.parse(argv, {"model_uri": None, "prepared": None})

    with mlflow.start_run():
        tracking.log_config(cfg)
        prepared = tracking.local_path(inp["prepared"], "prepared data")
        _, test, summary = data.load_prepared(prepared)
        test = evaluation.select(test, cfg.eval_limit)
        if len(test) == 0:
            raise DollyError(f"{inp['prepared']}: the test split is empty")
        model_local = tracking.local_path(inp["model_uri"], "model")
        evaluation.model_folder(model_local)  # not a transformers model: fail before the base
        train_run = evaluation.logged_run_id(model_local)
        train_params, train_tags = _train_params(train_run)
        base_cfg, changed = evaluation.base_config(cfg, train_params)
        if changed:
            print(f"evaluate: base model settings from train run {train_run}: {changed}", flush=True)
        data_hash = summary.get("data_hash", "")
        eval_set = compare.eval_set_digest(data_hash, test)
        test_ds = tracking.log_split(cfg, test, "test", data_hash, context="evaluation")
        mlflow.set_tags({"data_hash": data_hash, "model_uri": inp["model_uri"],
                         compare.EVAL_SET_TAG: eval_set,
                         "prepared": inp["prepared"], "train_run_id": train_run or "",
                         "base_model": base_cfg.base_model, "eval_records": str(len(test))})
        if train_tags.get("data_hash") and train_tags["data_hash"] != data_hash:
            print(f"evaluate: warning: the model was trained on data {train_tags['data_hash'][:12]}, "
                  f"evaluating on {data_hash[:12]}", flush=True)

        dev = evaluation.device()
        dtype = evaluation.dtype_for(dev)
        kw = {"max_new_tokens": cfg.eval_max_new_tokens, "batch_size": cfg.eval_batch_size}
        results = {}

        t0 = time.perf_counter()
        base_tok = load_tokenizer(str(prepared / "tokenizer"))
        base = modeling.load_base_model(base_cfg, base_tok, dtype=dtype).to(dev)
        if pretraining.is_pretrained_tiny(base_cfg):  # the same pretrained base train used
            key = pretraining.base_key(base_cfg, base_tok)
            if train_tags.get("base_key") and train_tags["base_key"] != key:
                print(f"evaluate: warning: the model was trained from base {train_tags['base_key']}, "
                      f"evaluating base {key}", flush=True)
            pretraining.log_base(pretraining.cache_root() / key)
        results["base"] = evaluation.evaluate_model(base, base_tok, test, **kw)
        _free(base)
        print(f"evaluate: base done in {time.perf_counter() - t0:.1f}s", flush=True)

        t0 = time.perf_counter()
        tuned, tuned_tok, _ = compare.load_saved_model(inp["model_uri"], cfg, dev, dtype,
                                                         model_local)
        if tuned_tok.get_vocab() != base_tok.get_vocab():
            raise DollyError(f"the model's tokenizer differs from {inp['prepared']}/tokenizer: "
                             "evaluate a model on the prepared data it was trained on")
        results["tuned"] = evaluation.evaluate_model(tuned, tuned_tok, test, **kw)
        tuned_cats = evaluation.category_metrics(test, results["tuned"].examples)
        base_cats = evaluation.category_metrics(test, results["base"].examples)
        _free(tuned)
        print(f"evaluate: tuned done in {time.perf_counter() - t0:.1f}s", flush=True)

        metrics = {}
        for who, res in results.items():
            metrics.update({f"{who}/{k}": float(v) for k, v in res.metrics.items()})
        metrics.update({f"tuned/{k}": v for k, v in tuned_cats.items()})
        metrics.update({f"base/{k}": v for k, v in base_cats.items()})
        metrics["eval_records"] = float(len(test))
        mlflow.log_metrics(metrics)
        model_id = compare.logged_model_id(inp["model_uri"])
        if model_id:  # MLflow 3 shows a logged model's metrics on its page and in Models tables
            mlflow.log_metrics({k: float(v) for k, v in results["tuned"].metrics.items()},
                               model_id=model_id, dataset=test_ds)
        mlflow.log_table(data=comparison(metrics), artifact_file="base_vs_tuned.json")

        b, t = results["base"].examples, results["tuned"].examples
        table = pd.DataFrame({
            "instruction": test["instruction"], "input": test["input"],
            "reference": test["response"],
            "category": test["category"] if "category" in test.columns else "",
            "base_response": b["response"], "tuned_response": t["response"],
            "base_exact_match": b["exact_match"], "tuned_exact_match": t["exact_match"],
            "base_rouge_l": b["rouge_l"], "tuned_rouge_l": t["rouge_l"],
            "base_stopped": b["stopped"], "tuned_stopped": t["stopped"],
        })
        mlflow.log_table(data=table, artifact_file="eval_examples.json")
        # The run page shows its description at once (rendered Markdown): the comparison goes
        # there, and in comparison.md for the Artifacts tab.
        note = report.run_description(table, base_cfg.base_model)
        mlflow.set_tag("mlflow.note.content", note)
        mlflow.log_text(note, "comparison.md")
        line = ", ".join(f"{m} {metrics[f'base/{m}']:.4g} -> {metrics[f'tuned/{m}']:.4g}"
                         for m in ("exact_match", "rouge_l", "perplexity", "stop_rate"))
        print(f"evaluate: {len(test)} records, base -> tuned: {line}", flush=True)
        for who in ("tuned", "base"):
            by_family = report.family_line(metrics, who)
            if by_family:
                print(f"evaluate: {by_family}", flush=True)


if __name__ == "__main__":
    cli.run(main)
