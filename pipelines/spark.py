"""The only SparkSession builder.

In: :class:`~pipelines.config.SparkConfig`. Out: a SparkSession. With ``master: null`` the
session attaches to whatever the environment provides (``spark-submit --master``, a
Databricks cluster); otherwise the configured master (``local[2]`` by default) is used.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pipelines.config import SparkConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Quiet, laptop-friendly defaults; anything in spark.conf overrides them.
_LOCAL_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    # Many small image files: pack them into fewer, larger tasks (default packing makes
    # one tiny partition per few files, and task overhead dominates).
    "spark.sql.files.openCostInBytes": str(64 * 1024),
}


def get_spark(config: SparkConfig) -> SparkSession:
    """Return the active SparkSession, or build one from ``config``.

    Args:
        config: Master, application name and extra properties.

    Returns:
        A SparkSession whose executors run this interpreter's Python when local.
    """
    from pyspark.sql import SparkSession

    # Executors of a local master must run the same interpreter (and so the same venv).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(config.app_name)
    if config.master:
        builder = builder.master(config.master)
    for key, value in {**_LOCAL_DEFAULTS, **config.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
