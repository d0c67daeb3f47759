"""Batch-normalised models on two real Horovod ranks end with identical weights."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipelines.store import DatasetDir, RunDir
from pipelines.train.horovod_launcher import HorovodSparkLauncher
from pipelines.train.worker import WorkerSpec, train_worker


def _spec(config, dataset: Path, out: Path) -> WorkerSpec:
    manifest = DatasetDir(str(dataset)).read_manifest()
    return WorkerSpec(
        train=config.train,
        launcher="horovod",
        dataset=DatasetDir(str(dataset)),
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows=manifest.splits,
        run_dir=RunDir(str(out)),
    )


def _moving_variances(path: Path) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(
            lambda name, item: (
                found.append(np.asarray(item)) if name.endswith("moving_variance:0") else None
            )
        )
    return found


@pytest.fixture(scope="module")
def rgb_digits_32(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits as 32x32 RGB, the smallest input the backbones take."""
    from pipelines.config import IngestConfig
    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("rgb32")
    source = write_demo_digits(root / "png").path
    output = root / "prepared"
    ingest(spark, IngestConfig(image_size=32, channels=3, rows_per_row_group=64), source, output)
    return output


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("resnet_small", "digits"),
        # Trained from scratch: its batch norm in training mode, its statistics moving.
        ("mobilenet_v2", "rgb_digits_32"),
    ],
)
def test_a_batch_normalised_model_on_two_ranks_ends_with_identical_weights(
    spark, model, data, request, tmp_path, small_config
):
    dataset = request.getfixturevalue(data)
    config = small_config(
        f"train.model={model}",
        "train.backbone_alpha=0.35",
        "train.epochs=1",
        "train.layer_stats=false",
    )
    ranks = HorovodSparkLauncher(spark, 2).run(
        train_worker, [_spec(config, dataset, tmp_path / "out")]
    )
    assert sorted(r.rank for r in ranks) == [0, 1]
    # Every layer, batch-norm statistics included, agrees across the ranks.
    assert ranks[0].layer_digests == ranks[1].layer_digests
    assert ranks[0].weights_sha256 == ranks[1].weights_sha256
    # ... and the statistics did train (they start at variance 1 everywhere).
    variances = _moving_variances(RunDir(str(tmp_path / "out")).final_model)
    assert variances
    assert not all(np.allclose(v, 1.0) for v in variances)
