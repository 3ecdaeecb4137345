"""How steps talk to MLflow: the config as params, step inputs as local folders, datasets as inputs."""
from __future__ import annotations

from pathlib import Path

from dolly.config import Config
from dolly.errors import DollyError

# MLflow param values are capped in length; a long dataset path should not fail a run.
_MAX_PARAM = 500


def log_config(cfg: Config, prefix: str = "") -> None:
    """The resolved config as params and as config.yaml on the active run."""
    import mlflow

    params = {f"{prefix}{k}": v[:_MAX_PARAM] for k, v in cfg.to_strings().items()}
    run = mlflow.active_run()
    # `mlflow run` already logged the user's -P values verbatim ("1" for test_size 1.0); MLflow
    # forbids changing a param, so those keep the user's spelling and config.yaml has all.
    already = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in already})
    mlflow.log_dict(cfg.to_dict(), "config.yaml")


def local_path(uri: str, what: str = "artifact") -> Path:
    """A local folder for `uri`: an existing path as is, else downloaded through MLflow."""
    p = Path(uri)
    if p.exists():
        return p
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as e:
        raise DollyError(f"cannot fetch {what} '{uri}': {str(e).splitlines()[0]}") from None


def dataset_source(cfg: Config):
    """The MLflow dataset source that names where `cfg.dataset` came from (decided by
    dolly.readers.resolve_source, as data_prep decides it)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    from dolly.readers import resolve_source

    src = resolve_source(cfg.dataset, cfg.dataset_split)
    if src.kind == "builtin":
        return CodeDatasetSource({"generator": "dolly.builtin_tasks", "seed": cfg.seed,
                                  "records": cfg.builtin_records})
    if src.kind in ("file", "folder") or src.files:
        return HTTPDatasetSource(Path(src.location).resolve().as_uri())  # file://: no resolver
    return HuggingFaceDatasetSource(path=src.location, split=src.split)


def log_split(cfg: Config, df, split: str, data_hash: str, context: str | None = None) -> str:
    """Log one prepared split (a DataFrame of prepared records) as a dataset input of the active
    run, named `<dataset>-<split>`; its digest is the split's own (data hash + its records), so
    the train and test splits differ. `context` defaults to the split's name. Returns the
    mlflow Dataset (to link metrics to it)."""
    import mlflow

    from dolly.compare import eval_set_digest

    digest = eval_set_digest(data_hash, df)[:8]
    cols = [c for c in ("instruction", "input", "response", "text", "length") if c in df.columns]
    ds = mlflow.data.from_pandas(df[cols], source=dataset_source(cfg),
                                 name=f"{cfg.dataset}-{split}", digest=digest)
    mlflow.log_input(ds, context=context or split)
    return ds
