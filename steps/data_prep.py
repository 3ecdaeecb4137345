"""data_prep entry point: dataset -> prepared/ (train/test parquet, tokenizer, rejections, summary).

A run that stops after reading records still logs records_read, the rejection counts and
prepared/rejected.jsonl + summary.json before the one-line error."""
from __future__ import annotations

import tempfile

import mlflow

from dolly import cli, data, pipeline, tracking


def main(argv: list[str]) -> None:
    cfg, _ = cli.parse(argv, {})
    with (pipeline.step_run(cfg, "data_prep") as run,
          tempfile.TemporaryDirectory() as tmp):
        tracking.log_config(cfg, "data_prep")
        try:
            result = data.prepare(cfg, f"{tmp}/prepared")
        except data.PrepareFailed as e:  # the failed run still says what was read and rejected
            mlflow.log_metrics({k: float(v) for k, v in e.counts.items()})
            mlflow.log_artifacts(str(e.out_dir), "prepared")
            raise
        mlflow.log_metrics({k: float(v) for k, v in result.counts.items()})
        for k, v in result.summary["token_lengths"].items():
            mlflow.log_metric(f"tokens_{k}", float(v))
        mlflow.set_tag("data_hash", result.data_hash)
        mlflow.log_artifacts(str(result.out_dir), "prepared")
        for split, df in (("train", result.train), ("test", result.test)):
            data.log_split(cfg, df, split, result.data_hash)
        c = result.counts
        why = ", ".join(f"{k[len('rejected_'):]} {v}" for k, v in c.items()
                        if k.startswith("rejected_") and v)
        print(f"data_prep: read {c['records_read']}, kept {c['records_kept']} "
              f"(train {c['records_train']}, test {c['records_test']}), rejected "
              f"{c['records_rejected']}{f' ({why})' if why else ''}; "
              f"prepared = runs:/{run.info.run_id}/prepared", flush=True)


if __name__ == "__main__":
    cli.run(main)
