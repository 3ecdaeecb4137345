"""evaluate entry point: base model vs tuned model on the held-out test split.

Inputs: -P model_uri=<the train run's logged model (models:/m-..., runs:/<run>/dolly-<base model>,
a registered model URI, or a saved folder)> -P prepared=<data_prep's prepared/ (runs:/<run>/prepared
or a path)>.
Logs base/<metric> and tuned/<metric> (see dolly/eval/evaluate.py; each once: the tuned/ ones also
on the model's MLflow 3 LoggedModel page), per task family base/exact_match/<family>,
tuned/exact_match/<family> (and rouge_l), for the built-in families the unseen-word probe
(dolly/eval/probe.py) as base/exact_match_unseen, tuned/exact_match_unseen and per family
<who>/exact_match_unseen/<family> with its table probe_examples.json, a per-example table
(eval_examples.json), the tags
data_hash, model_uri, train_run_id, and as the run's description (and comparison.md) base and tuned
answers side by side by family (dolly/eval/report.py). Each record's base and tuned answer with its
scores: two nested evaluation runs '<this run> base' and '<this run> tuned', one trace per record
(dolly/eval/genai.py; the MLflow UI's Evaluation runs page compares them).
"""
from __future__ import annotations

import mlflow

from dolly import cli, data, models, pipeline, tracking
from dolly import eval as evaluation


def main(argv: list[str]) -> None:
    cfg, inp = cli.parse(argv, {"model_uri": None, "prepared": None})
    with pipeline.step_run(cfg, "evaluate"):
        tracking.log_config(cfg, "evaluate")
        inputs = evaluation.resolve_inputs(cfg, inp["model_uri"], inp["prepared"])
        test_ds = data.log_split(cfg, inputs.test, "test", inputs.data_hash, context="evaluation")
        mlflow.set_tags(inputs.tags())

        result = evaluation.base_vs_tuned(cfg, inputs)

        if result.base_folder is not None:  # the pretrained base it was compared with
            models.log_base(result.base_folder)
        mlflow.log_metrics(result.other_metrics, dataset=test_ds)
        # tuned/<metric> once: on this run and, for an MLflow 3 LoggedModel, the same records on
        # the model's page and in the Models tables
        model_id = tracking.logged_model_id(inp["model_uri"])
        mlflow.log_metrics(result.tuned_metrics, model_id=model_id, dataset=test_ds)
        mlflow.log_table(data=result.comparison, artifact_file="base_vs_tuned.json")
        mlflow.log_table(data=result.examples, artifact_file="eval_examples.json")
        if result.probe_examples is not None:
            mlflow.log_table(data=result.probe_examples, artifact_file="probe_examples.json")
        # The run page shows its description at once (rendered Markdown), comparison.md in the
        # Artifacts tab.
        mlflow.set_tag("mlflow.note.content", result.note)
        mlflow.log_text(result.note, "comparison.md")
        for line in result.lines:
            print(line, flush=True)
        evaluation.log_evaluations(result.examples, model_id=model_id)  # each record's answers


if __name__ == "__main__":
    cli.run(main)
