"""Batch scoring on Spark with the registered model (mlflow.pyfunc.spark_udf).

Scales with Spark itself: `spark_master` local[*] on one machine, or any cluster URL / the
standard spark-submit configuration. Every input row comes out, in input order, with two more
columns: the response and an error. Rows whose instruction is null, empty or whitespace are not
sent to the model and keep a null response, so "no instruction" stays distinguishable from an
empty answer; rows whose instruction is not a string get a null response and the reason in the
error column. The output goes only into a new or empty folder, or replaces what an earlier run of
the step wrote there (check_output): nothing the step did not write is deleted.

A `messages` column (any case, as Spark finds it) holds conversations: an array of
{role, content} structs, as Spark reads a JSON list of {"role": ..., "content": ...} objects. A row
whose messages is non-null and non-empty is answered in its conversation; otherwise its
instruction is used, and then the instruction column itself is optional. Conversations the model
would refuse (an unknown role, a turn without content, a last turn not the user's, more than one
turn for a model trained in Dolly's one-instruction format) are decided in Spark before the
model: those rows are errors with the reason, never a failed partition.

Column names are compared as the Spark session compares them (dolly.scoring.columns: in any case
unless spark.sql.caseSensitive=true): `-P column=Instruction` finds `instruction`, `Context` is
the input, and input columns that Spark would take for one another, or for a column the step
adds, stop the step before any work instead of being merged or replaced.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dolly.data import readers
from dolly.errors import DataError, DollyError
from dolly.scoring import columns
from dolly.scoring.output import MARKER, OutputFolder, publish
from dolly.tracking import without_log_lines

SUFFIXES = readers.SUFFIXES
_ROW = "__dolly_row"
# dolly.serve.contract.MESSAGES, ROLES and METADATA_KEY; not imported: scoring and serve are
# independent layers (as ALIASES below)
MESSAGES = "messages"
ROLES = ("system", "user", "assistant")
SERVING_KEY = "dolly_serving"


@dataclass
class ResolvedModel:
    """The model a job scores with, pinned: an alias is resolved once, before scoring starts."""

    requested: str
    uri: str  # what the UDF loads: models:/<name>/<version> for registered models
    name: str = ""
    version: str = ""


_URI_KINDS = ("models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<path> or a "
              "folder holding an MLmodel file")


def _model_exists(model_uri: str) -> dict:
    """The MLmodel metadata of `model_uri` ({} when it has none); raises DollyError (one line,
    naming the URI and what is wrong) unless `model_uri` holds an MLflow model (its MLmodel file
    is read: no weights are downloaded)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    scheme = model_uri.split(":", 1)[0] if "://" in model_uri or ":/" in model_uri else ""
    if not scheme or scheme == "file":
        folder = Path(model_uri[len("file://"):] if scheme else model_uri)
        if not folder.exists():
            raise DollyError(f"model_uri '{model_uri}': no such folder; use {_URI_KINDS}")
        if not (folder / "MLmodel").is_file():
            raise DollyError(f"model_uri '{model_uri}': not an MLflow model (the folder has no "
                             f"MLmodel file); use {_URI_KINDS}")
        try:
            return dict(Model.load(str(folder / "MLmodel")).metadata or {})
        except (MlflowException, OSError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DollyError(f"model_uri '{model_uri}': cannot load its MLmodel "
                             f"({reason[:200]})") from None
    try:
        return dict(mlflow.models.get_model_info(model_uri).metadata or {})
    except (MlflowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "RESOURCE_DOES_NOT_EXIST" in reason or "not found" in reason.lower():
            reason = "no such run, model or artifact"
        raise DollyError(f"model_uri '{model_uri}': cannot load its MLmodel ({reason[:200]})"
                         ) from None


def logged_prompt_format(model_uri: str) -> str | None:
    """The prompt format a Dolly model at `model_uri` was trained in, from its MLmodel metadata
    (`dolly_serving.prompt_format`; a Dolly model logged before prompt formats: "dolly"), or
    None for a model that is not Dolly's pyfunc (it has rules of its own). Reads the MLmodel
    file only; raises DollyError (one line) when it cannot be read."""
    serving = _model_exists(model_uri).get(SERVING_KEY)
    if not isinstance(serving, dict):
        return None
    return str(serving.get("prompt_format") or "dolly")


def resolve_model(model_uri: str) -> ResolvedModel:
    """Pin `models:/name@alias` (or /latest) to `models:/name/<version>` so a moving alias can not
    change the model halfway through a job; other URIs are used as they are. Either way the
    model is checked to exist (its MLmodel read) before any Spark work: raises DollyError, one
    line naming the URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        _model_exists(model_uri)
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
            _model_exists(model_uri)  # models:/m-<id>: a logged model
            return ResolvedModel(model_uri, model_uri)
    except MlflowException as e:
        raise DollyError(f"cannot resolve model '{model_uri}': {str(e).splitlines()[0]}") from None
    return ResolvedModel(model_uri, f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version))


def input_files(path: str | Path) -> list[Path]:
    """The data files of `path` (a file, or a folder's files): `dolly.data.readers.list_files`, the
    listing data_prep uses. Raises DataError when there is none."""
    return readers.list_files(path)


def _text_frame(spark, f: Path, keep_types: tuple[str, ...] = (), cs: bool = False):
    # Decoded by data_prep's reader (BOM, UTF-16/32, content over extension, NaN as null, no
    # silent U+FFFD); Spark then infers the columns from those records as JSON lines. A line or
    # item that is not a readable object stays as a row of nulls (skipped, not dropped). The
    # keep_types columns (in any case unless `cs`) are read as VARIANT: each value keeps its
    # JSON type. Keys that differ only in case are refused unless `cs`: Spark's JSON reader
    # would make them one column and keep only one key's values.
    read = readers.read_file(f)
    order: dict[str, None] = {}
    lines = []
    for r in read.records:
        ok = r.error is None and isinstance(r.value, dict)
        if ok:
            order.update(dict.fromkeys(r.value))
        lines.append(json.dumps(r.value if ok else {}))
    columns.refuse_clash(order, cs, str(f))
    rdd = spark.sparkContext.parallelize(lines)
    df = spark.read.json(rdd)
    keep = {columns.key(n, cs) for n in keep_types}
    if any(columns.key(n, cs) in keep for n in df.columns):
        from pyspark.sql import types as T

        df = spark.read.schema(T.StructType([
            T.StructField(x.name, T.VariantType() if columns.key(x.name, cs) in keep
                          else x.dataType, True)
            for x in df.schema.fields])).json(rdd)
    cols = [c for c in order if c in df.columns]
    return df.select(*[f"`{c.replace('`', '``')}`" for c in cols]) if cols else df


def read_input(spark, path: str | Path, keep_types: tuple[str, ...] = ()):
    """One DataFrame from a file or a folder of jsonl/json/csv/parquet files (columns unioned by
    name; a column missing from one file is null there; rows keep the files' order). The
    `keep_types` columns of JSON files are read as VARIANT, so that a number or a list stays one
    (Spark would turn it into text) and score_to_parquet can refuse it.

    Names are compared as the session compares them (dolly.scoring.columns): unless it is
    case-sensitive, `keep_types` match in any case, columns of different files that differ only
    in case are one column (named as in the first file, as Spark's unionByName does), and a file
    with two columns that differ only in case is refused (DataError, one line, naming both)."""
    cs = columns.case_sensitive(spark)
    frames = []
    for f in input_files(path):
        if f.suffix.lower() == ".parquet":
            if not cs:  # Spark would refuse it with a traceback naming one of them, lower-cased
                import pyarrow.parquet as pq

                try:
                    names = pq.read_schema(f).names
                except (OSError, ValueError):  # not readable as Parquet: Spark says why, as before
                    names = []
                columns.refuse_clash(names, cs, str(f))
            frames.append(spark.read.parquet(str(f)))
        else:
            frames.append(_text_frame(spark, f, keep_types, cs))
    return _union(frames, cs)


def _union(frames, cs: bool = False):
    """Union by name; a column that is VARIANT in one frame is made VARIANT in all."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    variant = {columns.key(f.name, cs) for df in frames for f in df.schema.fields
               if isinstance(f.dataType, T.VariantType)}
    out = None
    for df in frames:
        for f in df.schema.fields:
            if columns.key(f.name, cs) in variant and isinstance(f.dataType, T.StringType):
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


# dolly.serve.contract.INPUT_ALIASES; not imported: scoring and serve are independent layers
ALIASES = ("input", "context")


def input_column(df, column: str | None = None) -> str | None:
    """The column holding each record's input: `input`, or dolly-15k's `context`, as the session
    finds them (`Context` or `INPUT` too, unless it is case-sensitive); None when there is none
    or `column` (the instruction column) is one of them."""
    cs = columns.case_sensitive(df.sparkSession)
    if column is not None and columns.key(column, cs) in {columns.key(c, cs) for c in ALIASES}:
        return None
    return next((c for c in (columns.find(df.columns, a, cs) for a in ALIASES) if c), None)


def messages_column(df) -> tuple[str, str, str] | None:
    """(the conversations column, its turns' role field, their content field), each named as in
    `df`, found as the session finds names (`Messages`, `Role` too unless it is case-sensitive),
    or None when `df` has no `messages` column. Raises DataError (one line, naming the column
    and its Spark type) when that column is not an array of structs with string fields `role`
    and `content` (what Spark's JSON reader infers from [{"role": ..., "content": ...}], and
    Parquet holds for a list of such objects); other fields of the turns are ignored."""
    from pyspark.sql import types as T

    cs = columns.case_sensitive(df.sparkSession)
    name = columns.find(df.columns, MESSAGES, cs)
    if name is None:
        return None
    dtype = df.schema[name].dataType
    turn = dtype.elementType if isinstance(dtype, T.ArrayType) else None
    if isinstance(turn, T.StructType):
        fields = turn.fieldNames()
        if not cs and (pair := columns.clash(fields)):
            raise DataError(f"input column '{name}': its turns have fields '{pair[0]}' and "
                            f"'{pair[1]}', which differ only in case: Spark ({columns.CONF}=false) "
                            "takes them for one field; rename one of them")
        role, content = (columns.find(fields, f, cs) for f in ("role", "content"))
        if role and content and all(isinstance(turn[f].dataType, T.StringType)
                                    for f in (role, content)):
            return name, role, content
    raise DataError(f"input column '{name}' is {dtype.simpleString()}: expected conversations, "
                    "an array of {role, content} turns (array<struct<role:string,content:string>>"
                    ", as Spark reads [{\"role\": \"user\", \"content\": \"...\"}] from JSON)")


def check_columns(df, column: str, output_column: str = "response",
                  error_column: str = "error") -> tuple[str | None, str | None]:
    """(the instruction column, the input column or None) of `df` as Spark resolves them, or
    DataError (one line) before any work: two columns Spark takes for one, no `column` (unless
    the input has a `messages` column: then the instruction column is optional, and None), a
    `messages` column that does not hold conversations (`messages_column`) or that `column`
    names, a column the step would add (`output_column`, `error_column`) that the input already
    has in any case (Spark would replace it), or the two added columns being one to Spark."""
    cs = columns.case_sensitive(df.sparkSession)
    columns.refuse_clash(df.columns, cs, "input")
    found = columns.find(df.columns, column, cs)
    if found is not None and found == columns.find(df.columns, MESSAGES, cs):
        raise DataError(f"-P column={column} names the column '{found}', which holds "
                        "conversations, not instructions: pass the instructions' column, or "
                        "-P column=instruction when the input has none")
    conversations = messages_column(df)
    if found is None and conversations is None:
        other = columns.find(df.columns, column)  # there in another case: a case-sensitive session
        hint = (f"; column names are case-sensitive in this session ({columns.CONF}=true): "
                f"pass -P column={other}" if other else "; pass -P column=<name>")
        raise DataError(f"input has no column '{column}' (columns: {', '.join(df.columns)}){hint}")
    if columns.key(output_column, cs) == columns.key(error_column, cs):
        both = (f"are both '{error_column}'" if output_column == error_column else
                f"'{output_column}' and '{error_column}' are one column to Spark "
                f"({columns.CONF}=false)")
        raise DataError(f"output_column and error_column {both}: answers and error reasons "
                        "need columns of their own")
    for name, flag in ((output_column, "output_column"), (error_column, "error_column")):
        if (have := columns.find(df.columns, name, cs)) is not None:
            same = "" if have == name else (f", the same column as '{name}' to Spark "
                                            f"({columns.CONF}=false)")
            raise DataError(f"input already has a column '{have}'{same}; pass -P {flag}=<another "
                            "name> to keep it")
    return found, input_column(df, found)


def _conversation(fields: tuple[str, str, str], fmt: str | None):
    """(has, turns, kind) columns for a conversations column (`messages_column`): whether the
    row has a conversation (non-null, non-empty), its turns as {role, content} structs named as
    the model reads them (null when none), and null for one the model answers, else the reason
    it is refused (as dolly.serve.contract and, for a model trained in Dolly's format (`fmt`
    "dolly"), its one-instruction prompt refuse it), decided here so that no row fails the
    model's partition."""
    from pyspark.sql import functions as F

    name, role, content = fields
    m = F.col(name)
    has = F.coalesce(F.size(m) > 0, F.lit(False))
    roles = ", ".join(ROLES[:-1]) + " or " + ROLES[-1]
    last = F.try_element_at(m, F.lit(-1))
    faults = [
        (F.exists(m, lambda t: t.isNull()), f"{name} has a turn that is null, expected "
                                            "{role, content}"),
        (F.exists(m, lambda t: ~F.coalesce(t.getField(role).isin(*ROLES), F.lit(False))),
         f"{name} has a turn whose role is not {roles}"),
        (F.exists(m, lambda t: t.getField(content).isNull()), f"{name} has a turn without content"),
        (F.coalesce(last.getField(role) != "user", F.lit(True)),
         f"the last message of {name} must be the user's"),
    ]
    if fmt == "dolly":  # prompts.DollyFormat holds exactly one user turn
        faults.append((F.size(m) > 1, f"{name} holds more than one turn: this model was trained "
                                      "in Dolly's format (one instruction, no system turn, no "
                                      "history); use a model trained with "
                                      "prompt_format=chat_template"))
    kind = F.when(faults[0][0], F.lit(faults[0][1]))
    for test, reason in faults[1:]:
        kind = kind.when(test, F.lit(reason))
    turns = F.transform(m, lambda t: F.struct(t.getField(role).alias("role"),
                                              t.getField(content).alias("content")))
    return has, F.when(has, turns), F.when(has, kind)


def score_to_parquet(spark, df, model_uri: str, column: str, folder: OutputFolder,
                     output_column: str = "response", params: dict | None = None,
                     error_column: str = "error") -> dict[str, int]:
    """Write every row of `df`, in input order, plus `output_column` (the answer) and
    `error_column` (why a row was not scored) as Parquet into `folder`; returns the counts
    rows_read = rows_scored + rows_empty + rows_errored, and rows_written.

    A row whose `column` is null or blank is *empty* (null answer, null error); one whose
    `column` (or input: `input_column(df)`) is present but not a string (a number, a boolean, a
    list, an object: JSON types survive read_input) is *errored* (null answer, the reason in
    `error_column`). With a `messages` column (`messages_column`), a row whose conversation is
    non-null and non-empty is answered in it instead (its instruction and input unused) or, if
    the model would refuse it (`_conversation`; the model's logged prompt format is read from
    its MLmodel), errored; `column` may then be missing (every row without a conversation is
    empty). Only the other rows reach the model, so one bad row never fails the job.
    Columns are found and checked by `check_columns` first, as Spark compares names: every input
    column is written unchanged, or nothing is done.
    """
    import mlflow
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    column, inp = check_columns(df, column, output_column, error_column)
    conversations = messages_column(df)
    fmt = logged_prompt_format(model_uri) if conversations else None
    # The step's helper columns, dropped at the end by name: none may be one of the user's
    # (or the two the step adds), in any case.
    taken = [*df.columns, output_column, error_column]
    row, text_col, inp_col, msg_col = (
        columns.fresh(n, taken)
        for n in (_ROW, "__dolly_text", "__dolly_input", "__dolly_messages"))
    # env_manager="local" on purpose: the step already runs in the model's environment
    with without_log_lines("mlflow.pyfunc", 'Calling `spark_udf()` with `env_manager="local"`'):
        predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type="string",
                                          env_manager="local", params=params or None)
    if column:
        text, kind = _classify(df, column, required=True)
    else:  # conversations only: a row without one has nothing to answer
        text, kind = F.lit(None).cast("string"), F.lit("empty")
    if inp and column:
        inp_text, inp_kind = _classify(df, inp, required=False)
        kind = F.coalesce(kind, inp_kind)
    else:
        inp_text = F.lit(None).cast("string")
    if conversations:
        has, turns, turns_kind = _conversation(conversations, fmt)
        text, inp_text = F.when(~has, text), F.when(~has, inp_text)
        kind = F.when(has, turns_kind).otherwise(kind)
    df = (df.withColumn(row, F.monotonically_increasing_id())
          .withColumn(text_col, text).withColumn(inp_col, inp_text)
          .withColumn(error_column, kind))
    if conversations:
        df = df.withColumn(msg_col, turns)
    for name in (column, inp):
        if name:
            df = _as_text(df, name)
    ok = F.col(error_column).isNull()
    fields = [F.col(text_col).alias("instruction"),
              F.coalesce(F.col(inp_col), F.lit("")).alias("input")]
    if conversations:  # the model answers a row in its conversation where it has one
        fields.append(F.col(msg_col).alias(MESSAGES))
    record = F.struct(*fields)
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
        (scored.unionByName(rest).orderBy(row).drop(row, text_col, inp_col, msg_col)
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
