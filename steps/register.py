"""register entry point: the train run's logged model -> a new version of cfg.model_name, gated.

Inputs: -P model_uri=<the model the train run logged: models:/m-... or
        runs:/<train run>/dolly-<base model>, e.g. dolly-tiny-gptj>
        -P eval_run=<the evaluate run id that evaluated that same model_uri>
The model is registered where it was logged (no second copy). The version gets the evaluation
metrics, data hash and runs as tags, a model card as description; the registered model a licence
tag. The alias cfg.champion_alias moves only when the tuned model beats its base on
cfg.primary_metric and is not worse than the current champion (see dolly/registry/gate.py).
This run gets the tags registered_model, registered_version, promoted, gate_reason.
"""
from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from dolly import cli, pipeline, registry, tracking
from dolly import eval as evaluation
from dolly.digests import EVAL_SET_TAG
from dolly.errors import DollyError


def main(argv: list[str]) -> None:
    cfg, inp = cli.parse(argv, {"model_uri": None, "eval_run": None})
    client = mlflow.MlflowClient()
    try:
        ev = client.get_run(inp["eval_run"])
    except MlflowException as e:
        raise DollyError(f"evaluate run '{inp['eval_run']}' not found: {str(e).splitlines()[0]}") from None
    if ev.info.status != "FINISHED":
        raise DollyError(f"evaluate run '{inp['eval_run']}' is {ev.info.status}, not FINISHED")
    evaluated = ev.data.tags.get("model_uri", "")
    if evaluated != inp["model_uri"]:
        raise DollyError(f"evaluate run '{inp['eval_run']}' evaluated '{evaluated or '?'}', "
                         f"not '{inp['model_uri']}'")
    train_run = ev.data.tags.get("train_run_id") or None
    train_params, _ = evaluation.train_run_params(train_run)
    dataset = train_params.get("dataset", cfg.dataset)
    base_model = ev.data.tags.get("base_model") or train_params.get("base_model", cfg.base_model)

    with pipeline.step_run(cfg, "register"):
        tracking.log_config(cfg, "register")
        result = registry.register(
            inp["model_uri"], cfg, eval_metrics=dict(ev.data.metrics), eval_run=inp["eval_run"],
            data_hash=ev.data.tags.get("data_hash", ""), train_run=train_run,
            base_model=base_model, dataset=dataset,
            eval_set=ev.data.tags.get(EVAL_SET_TAG, ""),
            score_champion=evaluation.rescore_champion(ev, cfg))
        mlflow.set_tags({"registered_model": result.name,
                         "registered_version": result.version,
                         "promoted": str(result.promoted).lower(),
                         "gate_reason": result.reason[:5000],
                         "champion_version": result.champion_version or "",
                         "model_uri": inp["model_uri"], "eval_run": inp["eval_run"]})
        mlflow.log_metrics({"registered_version": float(result.version),
                            "promoted": float(result.promoted),
                            "duplicate_weights": float(result.duplicate)})
        verdict = (f"promoted to @{cfg.champion_alias}" if result.promoted
                   else f"not promoted (@{cfg.champion_alias} stays "
                        f"{'v' + result.champion_version if result.champion_version else 'unset'})")
        if result.duplicate:
            print(f"register: {result.name} v{result.version} already holds these weights: "
                  f"{result.reason}", flush=True)
        else:
            print(f"register: {result.name} v{result.version} {verdict}: {result.reason}",
                  flush=True)


if __name__ == "__main__":
    cli.run(main)
