"""Shared fixtures (one real local SparkSession per test process) and the tests' tiers.

A test's tier comes from its folder (:data:`FOLDER_MARKERS`), and ``spark`` from using the
``spark`` fixture, so no test file marks itself: ``make test-fast`` deselects ``slow``,
``pytest -m cluster`` runs the standalone-cluster tests, ``-m spark`` those with a session.
A test that is slow in a fast folder says so itself (``@pytest.mark.slow``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

#: The markers of every test in a folder: unit, models and spark are the fast tiers.
FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "integration": ("slow",),
    "cluster": ("cluster", "slow"),
    "gpu": ("gpu", "slow"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier, and ``spark`` where it uses the session."""
    for item in items:
        folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        for marker in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(marker)
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker("spark")


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
