"""Batch-normalised models on two real Horovod ranks end with identical weights."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

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


def test_resnet_small_on_two_ranks_ends_with_identical_weights(
    spark, digits, tmp_path, small_config
):
    config = small_config("train.model=resnet_small", "train.epochs=1", "train.layer_stats=false")
    ranks = HorovodSparkLauncher(spark, 2).run(
        train_worker, [_spec(config, digits, tmp_path / "out")]
    )
    assert sorted(r.rank for r in ranks) == [0, 1]
    # Every layer, batch-norm statistics included, agrees across the ranks.
    assert ranks[0].layer_digests == ranks[1].layer_digests
    assert ranks[0].weights_sha256 == ranks[1].weights_sha256
    # ... and the statistics did train (they start at variance 1 everywhere).
    variances = _moving_variances(RunDir(str(tmp_path / "out")).final_model)
    assert variances
    assert not all(np.allclose(v, 1.0) for v in variances)
