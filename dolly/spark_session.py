"""The one way this project builds a Spark session (batch scoring, and training with
launcher=spark when no session is active)."""
from __future__ import annotations

import os
import sys


def spark_session(master: str, app: str = "dolly-batch-score"):
    """A Spark session at `master` (any Spark URL; '' = the standard Spark configuration) whose
    Python workers use this interpreter (the one with the model's dependencies), with Arrow on
    and the Spark UI off. Spark needs a Java runtime (./run_main.sh and ./run_pytest.sh set one
    up)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
    return (builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.enabled", "false")
            .getOrCreate())
