"""Batch scoring on Spark with the registered model (mlflow.pyfunc.spark_udf).

Scales with Spark itself: `spark_master` local[*] on one machine, or any cluster URL / the
standard spark-submit configuration. Every input row comes out, in input order, with two more
columns: the response and an error. Rows whose instruction is null, empty or whitespace are not
sent to the model and keep a null response, so "no instruction" stays distinguishable from an
empty answer; rows whose instruction is not a string get a null response and the reason in the
error column. The output goes only into a new or empty folder, or replaces what an earlier run of
the step wrote there (check_output): nothing the step did not write is deleted.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dolly.data import readers
from dolly.errors import DataError, DollyError
from dolly.scoring.output import MARKER, OutputFolder, publish

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


def input_files(path: str | Path) -> list[Path]:
    """The data files of `path` (a file, or a folder's files): `dolly.data.readers.list_files`, the
    listing data_prep uses. Raises DataError when there is none."""
    return readers.list_files(path)


def _text_frame(spark, f: Path, keep_types: tuple[str, ...] = ()):
    # Decoded by data_prep's reader (BOM, UTF-16/32, content over extension, NaN as null, no
    # silent U+FFFD); Spark then infers the columns from those records as JSON lines. A line or
    # item that is not a readable object stays as a row of nulls (skipped, not dropped). The
    # keep_types columns are read as VARIANT: each value keeps its JSON type.
    read = readers.read_file(f)
    order: dict[str, None] = {}
    lines = []
    for r in read.records:
        ok = r.error is None and isinstance(r.value, dict)
        if ok:
            order.update(dict.fromkeys(r.value))
        lines.append(json.dumps(r.value if ok else {}))
    rdd = spark.sparkContext.parallelize(lines)
    df = spark.read.json(rdd)
    if any(n in df.columns for n in keep_types):
        from pyspark.sql import types as T

        df = spark.read.schema(T.StructType([
            T.StructField(x.name, T.VariantType() if x.name in keep_types else x.dataType, True)
            for x in df.schema.fields])).json(rdd)
    cols = [c for c in order if c in df.columns]
    return df.select(*[f"`{c.replace('`', '``')}`" for c in cols]) if cols else df


def read_input(spark, path: str | Path, keep_types: tuple[str, ...] = ()):
    """One DataFrame from a file or a folder of jsonl/json/csv/parquet files (columns unioned by
    name; a column missing from one file is null there; rows keep the files' order). The
    `keep_types` columns of JSON files are read as VARIANT, so that a number or a list stays one
    (Spark would turn it into text) and score_to_parquet can refuse it."""
    frames = []
    for f in input_files(path):
        if f.suffix.lower() == ".parquet":
            frames.append(spark.read.parquet(str(f)))
        else:
            frames.append(_text_frame(spark, f, keep_types))
    return _union(frames)


def _union(frames):
    """Union by name; a column that is VARIANT in one frame is made VARIANT in all."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    variant = {f.name for df in frames for f in df.schema.fields
               if isinstance(f.dataType, T.VariantType)}
    out = None
    for df in frames:
        for f in df.schema.fields:
            if f.name in variant and isinstance(f.dataType, T.StringType):
                df = df.withColumn(f.name, F.col(f.name).cast("variant"))
        out = df if out is None else out.unionByName(df, allowMissingColumns=True)
    return out


# --- scoring ------------------------------------------------------------------------------------

def _classify(df, name: str, required: bool):
    """(text, kind) columns for the `name` column: text is the string to send (null when none),
    kind is null for a usable string, "empty" for a null or blank one, else the reason the row
    is an error ("instruction is a number, expected a string")."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    col = F.col(name)
    dtype = df.schema[name].dataType
    if isinstance(dtype, T.VariantType):
        t = F.expr(f"schema_of_variant(`{name}`)")
        kind_of = (F.when(t.startswith("ARRAY"), "a list").when(t.startswith("OBJECT"), "an object")
                   .when(t == "BOOLEAN", "a boolean").otherwise("a number"))
        text = F.when(t == "STRING", F.expr(f"variant_get(`{name}`, '$', 'string')"))
        missing = col.isNull() | (t == "VOID")
        bad = ~missing & (t != "STRING")
    elif isinstance(dtype, T.StringType):
        text, missing, bad, kind_of = col, col.isNull(), F.lit(False), F.lit("")
    else:
        text, missing, bad = F.lit(None).cast("string"), col.isNull(), col.isNotNull()
        kind_of = F.lit(f"a {dtype.simpleString()}")
    blank = F.coalesce(text.rlike(r"(?U)^\s*$"), F.lit(True))
    kind = (F.when(bad, F.concat(F.lit(f"{name} is "), kind_of, F.lit(", expected a string")))
            .when(missing | blank, F.lit("empty" if required else None)))
    return F.when(~bad & ~blank, text), kind


def _as_text(df, name: str):
    """A VARIANT column as text (a string as itself, anything else as its JSON), for Parquet."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if not isinstance(df.schema[name].dataType, T.VariantType):
        return df
    t = F.expr(f"schema_of_variant(`{name}`)")
    as_string = F.expr(f"variant_get(`{name}`, '$', 'string')")
    return df.withColumn(name, F.when(t == "STRING", as_string)
                         .when(t != "VOID", F.to_json(F.col(name))))


def input_column(df) -> str | None:
    """The column holding each record's input: `input`, or dolly-15k's `context`."""
    return next((c for c in ("input", "context") if c in df.columns), None)


def score_to_parquet(spark, df, model_uri: str, column: str, folder: OutputFolder,
                     output_column: str = "response", params: dict | None = None,
                     error_column: str = "error") -> dict[str, int]:
    """Write every row of `df`, in input order, plus `output_column` (the answer) and
    `error_column` (why a row was not scored) as Parquet into `folder`; returns the counts
    rows_read = rows_scored + rows_empty + rows_errored, and rows_written.

    A row whose `column` is null or blank is *empty* (null answer, null error); one whose
    `column` (or input: `input_column(df)`) is present but not a string (a number, a boolean, a
    list, an object: JSON types survive read_input) is *errored* (null answer, the reason in
    `error_column`). Only the other rows reach the model, so one bad row never fails the job.
    """
    import mlflow
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if column not in df.columns:
        raise DataError(f"input has no column '{column}' (columns: {', '.join(df.columns)}); "
                        "pass -P column=<name>")
    for name, flag in ((output_column, "output_column"), (error_column, "error_column")):
        if name in df.columns:
            raise DataError(f"input already has a column '{name}'; pass -P {flag}=<another name>")
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string",
                                      env_manager="local", params=params or None)
    text, kind = _classify(df, column, required=True)
    inp = input_column(df) if column not in ("input", "context") else None
    if inp:
        inp_text, inp_kind = _classify(df, inp, required=False)
        kind = F.coalesce(kind, inp_kind)
    else:
        inp_text = F.lit(None).cast("string")
    df = (df.withColumn(_ROW, F.monotonically_increasing_id())
          .withColumn("__dolly_text", text).withColumn("__dolly_input", inp_text)
          .withColumn(error_column, kind))
    for name in (column, inp):
        if name:
            df = _as_text(df, name)
    ok = F.col(error_column).isNull()
    record = F.struct(F.col("__dolly_text").alias("instruction"),
                      F.coalesce(F.col("__dolly_input"), F.lit("")).alias("input"))
    # Persisted: the model runs once per row, although counting and the ordered write both read it
    # (a global sort samples its input first).
    scored = (df.filter(ok).withColumn(output_column, predict(record))
              .persist(StorageLevel.MEMORY_AND_DISK))
    staging = folder.path.parent / f".{folder.path.name}.dolly-staging-{uuid.uuid4().hex[:8]}"
    try:
        n_scored = scored.count()
        rest = (df.filter(~ok).withColumn(output_column, F.lit(None).cast("string"))
                .withColumn(error_column, F.when(F.col(error_column) != "empty",
                                                 F.col(error_column))))
        n_empty = rest.filter(F.col(error_column).isNull()).count()
        n_errored = rest.filter(F.col(error_column).isNotNull()).count()
        (scored.unionByName(rest).orderBy(_ROW).drop(_ROW, "__dolly_text", "__dolly_input")
         .write.mode("errorifexists").parquet(str(staging)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own staging folder, nothing else
        raise
    finally:
        scored.unpersist()
    files = publish(staging, folder)
    (folder.path / MARKER).write_text(json.dumps({"files": files + ["_scored_by.json"]}, indent=1))
    written = spark.read.parquet(str(folder.path))
    return {"rows_read": n_scored + n_empty + n_errored, "rows_scored": n_scored,
            "rows_empty": n_empty, "rows_errored": n_errored, "rows_written": written.count()}
