"""The one way this project builds a Spark session (batch scoring, and training with
launcher=spark when no session is active)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

LOG4J2 = Path(__file__).with_name("spark_log4j2.properties")


def spark_session(master: str, app: str = "dolly-batch-score"):
    """A Spark session at `master` (any Spark URL; '' = the standard Spark configuration) whose
    Python workers use this interpreter (the one with the model's dependencies), with Arrow on
    and the Spark UI off; a local driver logs errors only (LOG4J2) and the stage progress bar
    shows only in a terminal. Spark needs a Java runtime (./run_main.sh and ./run_pytest.sh set
    one up)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    if master:
        builder = builder.master(master)
    if master.startswith("local"):  # a driver we start: its log is errors only (LOG4J2)
        builder = builder.config("spark.driver.extraJavaOptions",
                                 f"-Dlog4j2.configurationFile={LOG4J2.as_uri()}")
    return (builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.enabled", "false")
            # the stage progress bar redraws in a terminal; in a log it is a line per update
            .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
            .getOrCreate())
