"""The photo point of ``dlpipe bench scale``, for real at a tiny size (no timing asserted)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from pipelines.bench.scale import PHOTO_SIDE, format_scale_table, photo_points
from pipelines.config import Config

PHOTOS = 40


@pytest.fixture(scope="module")
def measured(spark, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, list]:
    config = Config(work_dir=str(tmp_path_factory.mktemp("bench-photos")))
    return config, photo_points(config, PHOTOS, repeats=1)


def test_photo_point_reports_ingest_bytes_a_two_rank_feed_and_training(measured) -> None:
    config, results = measured
    ingest, stored, feed, train = results
    assert ingest.unit == "images/s" and ingest.value > 0 and ingest.baseline_value > 0
    assert ingest.details["ingested"] == PHOTOS
    assert ingest.details["image_shape"] == [PHOTO_SIDE, PHOTO_SIDE, 3]
    assert (ingest.details["resize"], ingest.details["storage"]) == ("crop", "jpeg")
    # Mixed-size sources, 224x224 JPEG cells: far under the raw pixels' 150,528 bytes.
    assert stored.unit == "bytes/image" and 0 < stored.value < 150_528 / 2
    assert stored.baseline_value > 0
    assert feed.unit == "s/epoch" and feed.target == "<= 1.1"
    assert len(feed.details["processes"]) >= 1
    assert feed.value > 0 and feed.baseline_value > 0
    # MobileNetV2 on the stored photos: two Horovod ranks (equal weights) against one process.
    assert train.unit == "images/s" and "mobilenet_v2" in train.measured
    assert train.value > 0 and train.baseline_value > 0
    assert train.details["image_shape"] == [PHOTO_SIDE, PHOTO_SIDE, 3]
    assert "photo ingest" in format_scale_table({"results": [asdict(r) for r in results]})


def test_generated_photos_have_mixed_sizes_and_orientations(measured) -> None:
    from PIL import Image

    config, _ = measured
    sizes = {Image.open(p).size for p in Path(config.work_dir).rglob("photo_*.jpg")}
    assert len(sizes) > 10
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
