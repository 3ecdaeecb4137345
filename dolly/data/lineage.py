"""Datasets as MLflow run inputs: where the records came from and which prepared split a run
trained or evaluated on (the run page's Datasets, `mlflow.log_input`)."""
from __future__ import annotations

from pathlib import Path

from dolly.config import Config
from dolly.data.readers import resolve_source
from dolly.digests import eval_set_digest
from dolly.tracking import without_schema_hint


def dataset_source(cfg: Config):
    """The MLflow dataset source that names where `cfg.dataset` came from (decided by
    dolly.data.readers.resolve_source, as data_prep decides it)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    src = resolve_source(cfg.dataset, cfg.dataset_split)
    if src.kind == "builtin":
        return CodeDatasetSource({"generator": "dolly.data.builtin_tasks", "seed": cfg.seed,
                                  "records": cfg.builtin_records})
    if src.kind in ("file", "folder") or src.files:
        return HTTPDatasetSource(Path(src.location).resolve().as_uri())  # file://: no resolver
    return HuggingFaceDatasetSource(path=src.location, split=src.split)


def log_split(cfg: Config, df, split: str, data_hash: str, context: str | None = None):
    """Log one prepared split (a DataFrame of prepared records) as a dataset input of the active
    run, named `<dataset>-<split>`; its digest is the split's own (data hash + its records), so
    the train and test splits differ. `context` defaults to the split's name. Returns the
    mlflow Dataset (to link metrics to it)."""
    import mlflow

    digest = eval_set_digest(data_hash, df)[:8]
    cols = [c for c in ("instruction", "input", "response", "text", "length") if c in df.columns]
    with without_schema_hint():
        ds = mlflow.data.from_pandas(df[cols], source=dataset_source(cfg),
                                     name=f"{cfg.dataset}-{split}", digest=digest)
        mlflow.log_input(ds, context=context or split)  # the schema is inferred here
    return ds
