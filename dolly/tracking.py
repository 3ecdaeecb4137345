"""How steps talk to MLflow: the config as params, step inputs (run and model URIs) as local
folders, logged-model URIs. Datasets as run inputs are dolly.data.lineage."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from dolly.config import Config
from dolly.errors import DollyError

# MLflow param values are capped in length; a long dataset path should not fail a run.
_MAX_PARAM = 500


def log_config(cfg: Config, step: str | None = None) -> None:
    """The resolved config on the active run: as params the fields entry point `step` reads
    (dolly.config.read_by; every field for None, as `main` hands all to its steps), and the
    whole config as config.yaml."""
    import mlflow

    from dolly.config import read_by

    keep = set(read_by(step)) if step else None
    params = {k: v[:_MAX_PARAM] for k, v in cfg.to_strings().items()
              if keep is None or k in keep}
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


def logged_model_id(model_uri: str) -> str | None:
    """'m-<id>' of a `models:/m-<id>` URI (an MLflow 3 LoggedModel), else None."""
    rest = model_uri.removeprefix("models:/")
    return rest if model_uri.startswith("models:/m-") and "/" not in rest else None


class _DropPrefixed(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextmanager
def without_log_lines(logger: str, *prefixes: str):
    """Inside the block, records of the logging logger `logger` (an MLflow module's) whose
    message starts with one of `prefixes` are dropped: warnings about a choice this project
    made knowingly, which buried the steps' own output."""
    target, drop = logging.getLogger(logger), _DropPrefixed(prefixes)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


@contextmanager
def without_schema_hint():
    """Inside the block, MLflow's "Hint: Inferred schema contains integer column(s)" warning is
    not shown. It is advice for model signatures (an integer column cannot hold a missing value)
    and came at every dataset the steps log, whose integer columns (a split's token `length`)
    are never missing. Threads started inside (MLflow's evaluation workers) see the filter too."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer",
                                category=UserWarning)
        yield
