"""Shared fixtures: one real local SparkSession per test process, small generated images."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """A real local[2] SparkSession with the UI off and a temporary warehouse."""
    from pipelines.config import SparkConfig
    from pipelines.spark import get_spark

    warnings.filterwarnings("ignore", category=FutureWarning)
    warehouse = tmp_path_factory.mktemp("warehouse")
    session = get_spark(
        SparkConfig(
            master="local[2]",
            app_name="dlpipe-tests",
            conf={
                "spark.ui.enabled": "false",
                "spark.sql.warehouse.dir": str(warehouse),
                "spark.sql.shuffle.partitions": "4",
                "spark.driver.memory": "2g",
            },
        )
    )
    yield session
    session.stop()


@pytest.fixture()
def dlpipe_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the dlpipe CLI as a subprocess, with its work dir in tmp."""
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = sys.executable
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
