"""batch_score entry point: score a table with the registered model on Spark.

Inputs: -P input=<file or folder of .jsonl/.json/.csv/.parquet> -P output=<folder for Parquet>
        [-P model_uri=models:/<model_name>@<champion_alias>] [-P column=instruction]
        [-P output_column=response] [-P error_column=error] [-P mode=error|overwrite]
        [-P max_new_tokens=<n>] [-P do_sample=true|false]
Spark runs at cfg.spark_master (local[*] by default; any Spark URL). The output holds every input
row and column plus the response (null where the instruction is null or blank, or not a string)
and the error (why a row was not scored). A `messages` column of conversations (a list of
{role, content}, the last turn the user's) is answered where a row has one, else the row's
instruction; a conversation the model would refuse is an errored row (dolly.scoring.batch).
The output folder must be new or empty; -P mode=overwrite replaces only what an earlier
batch_score run wrote there (listed in its _dolly_batch_score.json); anything else stops the
step before any work. The model version that scored is pinned before scoring (an alias is
resolved once) and recorded as this run's tags model_name /
model_version / scored_model_uri and in <output>/_scored_by.json. Column names are compared as
Spark compares them (in any case unless spark.sql.caseSensitive=true): an input column that is
one to Spark with another, or with a column the step adds, stops the step before any scoring.
Metrics: rows_read = rows_scored + rows_empty + rows_errored, rows_written.
"""
from __future__ import annotations

import time

import mlflow

from dolly import cli, pipeline, scoring, tracking
from dolly.spark_session import spark_session
from dolly.config import parse_bool
from dolly.errors import ConfigError


def _params(inp: dict[str, str]) -> dict:
    params = {}
    if inp["max_new_tokens"]:
        try:
            params["max_new_tokens"] = int(inp["max_new_tokens"])
        except ValueError:
            raise ConfigError(f"max_new_tokens: {inp['max_new_tokens']!r} is not an integer") from None
        if params["max_new_tokens"] < 1:
            raise ConfigError("max_new_tokens: must be >= 1")
    if inp["do_sample"]:
        params["do_sample"] = parse_bool(inp["do_sample"], "do_sample", "parameter")
    return params


def main(argv: list[str]) -> None:
    cfg, inp = cli.parse(argv, {"input": None, "output": None, "model_uri": "", "column": "instruction",
                                "output_column": "response", "error_column": "error",
                                "mode": "error", "max_new_tokens": "", "do_sample": ""})
    if inp["output_column"] == inp["error_column"]:
        raise ConfigError(f"output_column and error_column are both '{inp['error_column']}': "
                          "answers and error reasons need columns of their own")
    requested = inp["model_uri"] or f"models:/{cfg.model_name}@{cfg.champion_alias}"
    params = _params(inp)
    # Fail fast, before a run or Spark starts: the input exists, the output is ours to write.
    files = scoring.input_files(inp["input"])
    folder = scoring.check_output(inp["output"], inp["input"], inp["mode"])
    model = scoring.resolve_model(requested)  # the model exists: before a run or Spark starts
    with pipeline.step_run(cfg, "batch_score", f"batch_score {model.name} v{model.version}"
                           if model.version else "batch_score"):
        tracking.log_config(cfg, "batch_score")
        mlflow.set_tags({"model_uri": requested, "scored_model_uri": model.uri,
                         "model_name": model.name, "model_version": model.version,
                         "input": inp["input"], "output": inp["output"]})
        which = f"{model.name} v{model.version}" if model.version else model.uri
        print(f"batch_score: scoring {inp['input']} ({len(files)} file(s)) with {which} on Spark "
              f"{cfg.spark_master or '(default master)'}", flush=True)
        t0 = time.perf_counter()
        spark = spark_session(cfg.spark_master)
        try:
            df = scoring.read_input(spark, inp["input"],
                                    keep_types=(inp["column"], "input", "context"))
            counts = scoring.score_to_parquet(spark, df, model.uri, inp["column"], folder,
                                              inp["output_column"], params, inp["error_column"])
        finally:
            spark.stop()
        seconds = time.perf_counter() - t0
        scoring.write_sidecar(inp["output"], {
            "model_uri": requested, "scored_model_uri": model.uri, "model_name": model.name,
            "model_version": model.version, "params": params, "column": inp["column"],
            "input_files": [str(f) for f in files], **counts})
        mlflow.log_metrics({**{k: float(v) for k, v in counts.items()}, "seconds": seconds})
        print(f"batch_score: {counts['rows_read']} rows in, {counts['rows_scored']} scored, "
              f"{counts['rows_empty']} empty (null/blank {inp['column']}, null response), "
              f"{counts['rows_errored']} errored (not a string, reason in "
              f"'{inp['error_column']}') with {which} in {seconds:.1f}s -> {inp['output']}",
              flush=True)


if __name__ == "__main__":
    cli.run(main)
