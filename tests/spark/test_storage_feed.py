"""Compact storage end to end: ingest as PNG/JPEG on Spark, read by both stacks' readers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import IngestConfig
from pipelines.ingest import ingest
from pipelines.store import DatasetDir
from pipelines.train import numpy_feed
from pipelines.train.feed import make_dataset, read_split

SHAPE = (16, 16, 3)
CONFIG = IngestConfig(image_size=16, channels=3, rows_per_row_group=4)


@pytest.fixture(scope="module")
def datasets(spark, tmp_path_factory) -> dict[str, Path]:
    """The same 24 RGB photos of mixed sizes ingested in every storage."""
    source = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(24):
        folder = source / ("a", "b")[i % 2]
        folder.mkdir(exist_ok=True)
        height, width = 20 + i, 40 - i
        y, x = np.mgrid[0:height, 0:width]
        base = rng.uniform(40, 200, 3)
        pixels = np.stack([base[c] + 30 * np.sin(x / 5 + c) * np.cos(y / 7) for c in range(3)], -1)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"p{i:02d}.jpg")
    out = tmp_path_factory.mktemp("out")
    return {
        storage: ingest(spark, replace(CONFIG, storage=storage), source, out / storage)
        and (out / storage)
        for storage in ("raw", "png", "jpeg")
    }


def test_manifest_records_the_storage_and_cells_shrink(datasets) -> None:
    sizes = {}
    for storage, root in datasets.items():
        manifest = json.loads((root / DatasetDir.MANIFEST_FILE).read_text())
        assert manifest["storage"] == storage
        sizes[storage] = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    assert sizes["jpeg"] < sizes["raw"]


def test_every_reader_decodes_every_storage_to_the_same_pixels(datasets) -> None:
    raw = read_split(DatasetDir(str(datasets["raw"])).split("train"), SHAPE)
    for storage in ("png", "jpeg"):
        split = DatasetDir(str(datasets[storage])).split("train")
        petastorm = read_split(split, SHAPE)
        arrow = numpy_feed.read_split(split, SHAPE)
        assert petastorm.paths == arrow.paths == raw.paths
        np.testing.assert_array_equal(petastorm.images, arrow.images)
        np.testing.assert_array_equal(petastorm.labels, raw.labels)
        error = np.abs(petastorm.images.astype(int) - raw.images).mean()
        assert error == 0 if storage == "png" else 0 < error < 4


def test_the_tf_feed_decodes_jpeg_cells_in_its_batch_path(datasets) -> None:
    split = DatasetDir(str(datasets["jpeg"])).split("train")
    expected = read_split(split, SHAPE)
    data = make_dataset(split, image_shape=SHAPE, batch_size=4, shuffle=False)
    images, labels = next(iter(data.take(1).as_numpy_iterator()))
    assert images.shape == (4, *SHAPE) and images.dtype == np.float32
    first = np.rint(images * 255).astype(np.uint8)
    # Unshuffled: the stored order; each batch image is one of the split's decoded images.
    flat = expected.images.reshape(len(expected), -1)
    for image, label in zip(first, labels, strict=True):
        match = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
        assert match.size == 1 and expected.labels[match[0]] == label
