"""Fixtures of the integration tests: a real MLflow sqlite store per test module."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TrackingStore:
    """A private MLflow tracking store with one experiment."""

    uri: str
    experiment_id: str
    root: Path


@pytest.fixture(scope="module")
def digits(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits at 16x16, ingested once for the module (training tests)."""
    from pipelines.config import IngestConfig
    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("digits")
    source = write_demo_digits(root / "png").path
    output = root / "prepared"
    ingest(spark, IngestConfig(image_size=16, channels=1, rows_per_row_group=64), source, output)
    return output


@pytest.fixture(scope="module")
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingStore]:
    """A sqlite store in a temporary directory, set as the tracking URI for the module.

    The experiment is named after the test module; artifacts go under the same directory.
    """
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        experiment_id = MlflowClient().create_experiment(
            request.module.__name__.rsplit(".", 1)[-1],
            artifact_location=(root / "artifacts").as_uri(),
        )
        yield TrackingStore(uri=uri, experiment_id=experiment_id, root=root)
        mlflow.set_tracking_uri(None)
