"""Batch scoring on Spark with the registered model (mlflow.pyfunc.spark_udf).

Scales with Spark itself: `spark_master` local[*] on one machine, or any cluster URL / the
standard spark-submit configuration. Every input row comes out, in input order, with one more
column: the response. Rows whose instruction is null, empty or whitespace are not sent to the model
and keep a null response, so "no instruction" stays distinguishable from an empty answer.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dolly import readers
from dolly.errors import DataError, DollyError

SUFFIXES = readers.SUFFIXES
_ROW = "__dolly_row"


@dataclass
class ResolvedModel:
    """The model a job scores with, pinned: an alias is resolved once, before scoring starts."""

    requested: str
    uri: str  # what the UDF loads: models:/<name>/<version> for registered models
    name: str = ""
    version: str = ""


def resolve_model(model_uri: str) -> ResolvedModel:
    """Pin `models:/name@alias` (or /latest) to `models:/name/<version>` so a moving alias can not
    change the model halfway through a job; other URIs are used as they are."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        return ResolvedModel(model_uri, model_uri)
    rest = model_uri[len("models:/"):].strip("/")
    client = mlflow.MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            if version == "latest":
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise DollyError(f"registered model '{name}' has no versions")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
        else:
            return ResolvedModel(model_uri, model_uri)  # models:/m-<id>: a logged model
    except MlflowException as e:
        raise DollyError(f"cannot resolve model '{model_uri}': {str(e).splitlines()[0]}") from None
    return ResolvedModel(model_uri, f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version))


def spark_session(master: str, app: str = "dolly-batch-score"):
    """A Spark session whose Python workers use this interpreter (the one with the model deps)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
    return (builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.enabled", "false")
            .getOrCreate())


def input_files(path: str | Path) -> list[Path]:
    """The data files of `path` (a file, or a folder's files): `dolly.readers.list_files`, the
    listing data_prep uses. Raises DataError when there is none."""
    return readers.list_files(path)


def _text_frame(spark, f: Path):
    # Decoded by data_prep's reader (BOM, UTF-16/32, content over extension, NaN as null, no
    # silent U+FFFD); Spark then infers the columns from those records as JSON lines. A line or
    # item that is not a readable object stays as a row of nulls (skipped, not dropped).
    read = readers.read_file(f)
    order: dict[str, None] = {}
    lines = []
    for r in read.records:
        ok = r.error is None and isinstance(r.value, dict)
        if ok:
            order.update(dict.fromkeys(r.value))
        lines.append(json.dumps(r.value if ok else {}))
    df = spark.read.json(spark.sparkContext.parallelize(lines))
    cols = [c for c in order if c in df.columns]
    return df.select(*[f"`{c.replace('`', '``')}`" for c in cols]) if cols else df


def read_input(spark, path: str | Path):
    """One DataFrame from a file or a folder of jsonl/json/csv/parquet files (columns unioned by
    name; a column missing from one file is null there). Rows keep the files' order."""
    frames = []
    for f in input_files(path):
        if f.suffix.lower() == ".parquet":
            frames.append(spark.read.parquet(str(f)))
        else:
            frames.append(_text_frame(spark, f))
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df, allowMissingColumns=True)
    return out


def score_to_parquet(spark, df, model_uri: str, column: str, output: str,
                     output_column: str = "response", params: dict | None = None) -> dict[str, int]:
    """Write `df` plus `output_column` (the answer for each non-blank `column` value) as Parquet
    in input order; returns rows_read, rows_scored, rows_skipped, rows_written."""
    import mlflow
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if column not in df.columns:
        raise DataError(f"input has no column '{column}' (columns: {', '.join(df.columns)}); "
                        "pass -P column=<name>")
    if output_column in df.columns:
        raise DataError(f"input already has a column '{output_column}'; "
                        "pass -P output_column=<another name>")
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string",
                                      env_manager="local", params=params or None)
    df = df.withColumn(_ROW, F.monotonically_increasing_id())
    text = F.col(column).cast("string")
    ok = F.coalesce(text.isNotNull() & (F.length(F.trim(text)) > 0), F.lit(False))
    # Persisted: the model runs once per row, although counting and the ordered write both read it
    # (a global sort samples its input first).
    scored = (df.filter(ok).withColumn(output_column, predict(text))
              .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        n_scored = scored.count()
        skipped = df.filter(~ok).withColumn(output_column, F.lit(None).cast("string"))
        n_skipped = skipped.count()
        (scored.unionByName(skipped).orderBy(_ROW).drop(_ROW)
         .write.mode("overwrite").parquet(str(output)))
    finally:
        scored.unpersist()
    written = spark.read.parquet(str(output))
    row = written.select(F.count(F.lit(1)).alias("n"),
                         F.count(F.col(output_column)).alias("answered")).first()
    return {"rows_read": n_scored + n_skipped, "rows_scored": n_scored, "rows_skipped": n_skipped,
            "rows_written": int(row["n"]), "rows_answered": int(row["answered"])}


def write_sidecar(output: str | Path, info: dict) -> None:
    """`_scored_by.json` next to the Parquet parts (Spark and pandas skip `_` files)."""
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "_scored_by.json").write_text(json.dumps(info, indent=2))
