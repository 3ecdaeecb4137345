"""The only place that decides who talks to MLflow (rank 0) and how step inputs are resolved."""
from __future__ import annotations

import os
from pathlib import Path

from dolly.config import Config
from dolly.errors import DollyError

# MLflow param values are capped in length; a long dataset path should not fail a run.
_MAX_PARAM = 500


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def log_config(cfg: Config, prefix: str = "") -> None:
    """The resolved config as params and as config.yaml on the active run."""
    import mlflow

    params = {f"{prefix}{k}": str(v)[:_MAX_PARAM] for k, v in cfg.to_dict().items()}
    mlflow.log_params(params)
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
