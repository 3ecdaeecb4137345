"""main entry point (the default of `mlflow run .`): data_prep -> train -> evaluate -> register.

Each step is a child run of this run, handed only run/model URIs; a step that already finished
with the same inputs, code, data and config fields is reused (dolly/pipeline.py).
`-P reuse=false` recomputes everything. The run ends with a summary (key metrics, registered
version, promoted or not) as metrics and tags, printed too. A failing step fails this run with
one line naming the step and its run.
"""
from __future__ import annotations

import mlflow

from dolly import cli, pipeline, tracking
from dolly.config import parse_bool


def main(argv: list[str]) -> None:
    args = cli.parse_args(argv, {"reuse": "true"})
    cfg = args.cfg
    reuse = parse_bool(args.inputs["reuse"], "reuse", "parameter")
    code = pipeline.code_version()
    fingerprint = pipeline.input_fingerprint(cfg)
    client = mlflow.MlflowClient()
    # in cfg.experiment_name when `mlflow run` put its run in Default (that run points here)
    with pipeline.step_run(cfg, "main", pointer_tag="dolly.pipeline_run"):
        run_pipeline(client, args, reuse, code, fingerprint)


def run_pipeline(client, args: cli.Args, reuse: bool, code: str, fingerprint: str) -> None:
    """The four steps as children of the active run, then the summary (metrics, tags, the
    run's description, printed)."""
    cfg = args.cfg
    parent = mlflow.active_run()
    tracking.log_config(cfg)
    mlflow.set_tags({pipeline.CODE_TAG: code, "dolly.input_fingerprint": fingerprint})
    if code == "unknown":
        print("main: no git checkout: steps are not reused", flush=True)
        reuse = False
    run = pipeline.Pipeline(client, client.get_run(parent.info.run_id), cfg,
                            {"config": args.profile, **args.overrides}, code, fingerprint, reuse)
    model_uri = run.run_all()
    metrics, tags, lines = pipeline.summary(cfg, run.runs, run.reused, model_uri)
    mlflow.log_metrics(metrics)
    mlflow.set_tags({**tags, "mlflow.note.content": pipeline.description(lines, run.runs,
                                                                        run.reused)})
    print("\n".join(lines), flush=True)

if __name__ == "__main__":
    cli.run(main)
