"""Fixtures of the integration tests: a real MLflow sqlite store per test module."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.config import Config, load_config

#: A small, quick training: an MLP, about a second an epoch on two shared cores, no
#: augmentation (it pays off over the default 40 epochs, not in 2 or 3).
SMALL_TRAINING = (
    "train.model=mlp",
    "train.hidden_units=64",
    "train.epochs=3",
    "train.batch_size=32",
    "train.early_stopping_patience=0",
    "train.augment_shift=0.0",
    "train.augment_rotation_deg=0.0",
)


@dataclass(frozen=True)
class SmallConfig:
    """Configurations of a small training with its work directory in the test's folder."""

    work: Path

    def sets(self, *overrides: str) -> list[str]:
        """The ``--set`` values: the work directory, the small training, then ``overrides``."""
        return [f"work_dir={self.work}", *SMALL_TRAINING, *overrides]

    def __call__(self, *overrides: str) -> Config:
        """The configuration of :meth:`sets`."""
        return load_config(overrides=self.sets(*overrides))


@pytest.fixture()
def small_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmallConfig:
    """The config factory of the training tests (no tracking URI from the environment)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return SmallConfig(tmp_path / "work")


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


@pytest.fixture()
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each one's whole process group is killed at the end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
