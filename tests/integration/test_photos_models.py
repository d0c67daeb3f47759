"""A pretrained-backbone classifier end to end: two Horovod ranks, both fine-tuning phases,
the run report on a nested backbone, the pyfunc on PNG bytes, and a warm start from it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.images import encode_png
from pipelines.pipeline import log_run_report
from pipelines.store import DatasetDir, Store
from pipelines.train.driver import train
from pipelines.train.feed import read_split
from pipelines.train.horovod_launcher import HorovodSparkLauncher
from pipelines.train.launchers import LocalLauncher

#: MobileNetV2 at its narrowest, frozen for one epoch, then its top 20 layers fine-tuned.
BACKBONE = (
    "train.model=mobilenet_v2",
    "train.backbone_alpha=0.35",
    "train.fine_tune.frozen_epochs=1",
    "train.fine_tune.unfreeze_top=20",
    "train.learning_rate=0.005",
    "train.epochs=2",
)


@pytest.fixture(scope="module")
def rgb_digits(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits as 32x32 RGB, the smallest input the backbones take."""
    from pipelines.config import IngestConfig
    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("rgb")
    source = write_demo_digits(root / "png").path
    output = root / "prepared"
    ingest(spark, IngestConfig(image_size=32, channels=3, rows_per_row_group=64), source, output)
    return output


def test_a_fine_tuned_backbone_trains_on_two_ranks_and_serves_bytes(
    spark, rgb_digits, small_config
):
    config = small_config(*BACKBONE, "train.num_proc=2")
    result = train(config, HorovodSparkLauncher(spark, 2), rgb_digits, report=log_run_report)
    assert result.world_size == 2 and result.epochs == 2
    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # Both ranks ended with the same weights, batch-norm statistics included.
    assert len(set(json.loads(run.data.tags["rank_weights_sha256"]).values())) == 1

    # The report's sections ran on the nested backbone (Grad-CAM on its feature maps).
    client = mlflow.MlflowClient()
    logged = {f.path for f in client.list_artifacts(result.run_id, "report")}
    assert {"report/attribution.png", "report/summary.json"} <= logged
    attribution = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.run_id}/report/attribution.json")
    )
    assert attribution["grad_cam_layer"] == "backbone"

    test = read_split(DatasetDir(str(rgb_digits)).split("test"), (32, 32, 3))
    model = mlflow.pyfunc.load_model(f"models:/{config.mlflow.model_name}@champion")
    frame = pd.DataFrame({"image": [encode_png(img) for img in test.images[:16]]})
    predicted = model.predict(frame)
    assert predicted["error"].isna().all()
    assert np.allclose([sum(p) for p in predicted["probabilities"]], 1.0, atol=1e-4)

    # A warm start from the version just registered: pinned and tagged on the new run.
    again = small_config(
        *BACKBONE,
        "train.launcher=local",
        "train.epochs=1",
        f"train.init_from=models:/{config.mlflow.model_name}@champion",
    )
    warm = train(again, LocalLauncher(), rgb_digits)
    tags = mlflow.get_run(warm.run_id).data.tags
    assert tags["init_from"] == f"models:/{config.mlflow.model_name}/1"


def test_a_resume_at_the_phase_boundary_unfreezes_and_one_after_it_goes_on(
    rgb_digits, small_config
):
    from pipelines.train.checkpoint import load_final_model

    def backbone_after(epochs: int, resume: bool) -> list[np.ndarray]:
        config = small_config(*BACKBONE, "train.launcher=local", f"train.epochs={epochs}")
        train(config, LocalLauncher(), rgb_digits, resume=resume)
        run_dir = Store.of(config).last_run_dir(config.mlflow.model_name)
        return load_final_model(run_dir).get_layer("backbone").get_weights()

    frozen = backbone_after(1, resume=False)  # the first phase alone: its checkpoint
    tuned = backbone_after(2, resume=True)  # resumed at the boundary: unfrozen, fine-tuned
    moved = [not np.array_equal(a, b) for a, b in zip(frozen, tuned, strict=True)]
    assert 0 < sum(moved) < len(moved)  # the top 20 layers only
    again = backbone_after(3, resume=True)  # resumed in the second phase: still fine-tuning
    moved_again = [not np.array_equal(a, b) for a, b in zip(tuned, again, strict=True)]
    assert any(moved_again)
    assert not any(m and not before for m, before in zip(moved_again, moved, strict=True))
