"""The training feed over a real ingested dataset: Petastorm readers into tf.data."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.bench.feed import in_memory_dataset
from pipelines.config import IngestConfig
from pipelines.images import normalise
from pipelines.ingest import ingest
from pipelines.store import DatasetDir
from pipelines.tasks import RECONSTRUCTION
from pipelines.train.feed import (
    Augmentation,
    ImageShapeError,
    SplitNotFoundError,
    make_dataset,
    read_split,
    steps_per_epoch,
)

SHAPE = (12, 12, 1)
CONFIG = IngestConfig(image_size=12, channels=1, rows_per_row_group=4)


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    """48 constant grey images, each with its own pixel value (its identity), in 2 classes."""
    source = tmp_path_factory.mktemp("images")
    values = {}
    for i in range(48):
        label = ("even", "odd")[i % 2]
        value = 4 + 5 * i
        path = source / label / f"img{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full(SHAPE[:2], value, np.uint8)).save(path)
        values[str(path)] = value
    output = tmp_path_factory.mktemp("out") / "prepared"
    result = ingest(spark, CONFIG, source, output)
    assert result.splits["train"] >= 30  # enough row groups to shard
    return output, values, result


@pytest.fixture(scope="module")
def train(prepared):
    output, _, _ = prepared
    return DatasetDir(str(output)).split("train")


@pytest.fixture(scope="module")
def arrays(train):
    return read_split(train, SHAPE)


def _ids(images) -> list[int]:
    """The identity (constant pixel value) of each image in a float batch."""
    pixels = np.rint(np.asarray(images) * 255).astype(int).reshape(len(images), -1)
    assert (pixels == pixels[:, :1]).all(), "every image must be one constant value"
    return pixels[:, 0].tolist()


def _take(dataset, steps: int) -> tuple[np.ndarray, np.ndarray]:
    batches = list(dataset.take(steps).as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_steps_per_epoch_is_equal_for_every_rank():
    assert steps_per_epoch(1000, 1, 64) == 16
    assert steps_per_epoch(1024, 2, 64) == 8
    assert steps_per_epoch(1025, 2, 64) == 9
    assert steps_per_epoch(3, 4, 64) == 1
    assert steps_per_epoch(0, 2, 64) == 1
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0, 64)


def test_read_split_returns_every_row_sorted_with_labels(prepared, arrays):
    output, values, result = prepared
    manifest = json.loads((output / DatasetDir.MANIFEST_FILE).read_text())
    assert len(arrays) == result.splits["train"] == manifest["splits"]["train"]
    assert arrays.paths == sorted(arrays.paths)
    assert arrays.images.shape == (len(arrays), *SHAPE) and arrays.images.dtype == np.uint8
    assert arrays.labels.dtype == np.int32
    assert arrays.label_names == ["even", "odd"]
    for path, image, label in zip(arrays.paths, arrays.images, arrays.labels, strict=True):
        assert (image == values[path]).all()
        assert arrays.label_names[label] == Path(path).parent.name


def test_augmentation_shifts_training_images_and_keeps_their_labels(train, arrays):
    stored = {
        value: label
        for value, label in zip(_ids(normalise(arrays.images)), arrays.labels, strict=True)
    }
    steps = len(arrays) // 4
    augmented = make_dataset(
        train, image_shape=SHAPE, batch_size=4, shuffle=False, augment=Augmentation(shift=0.25)
    )
    images, labels = _take(augmented, steps)
    # Each constant image keeps its value inside; a shift uncovers zero pixels at the border.
    values = np.rint(images.reshape(len(images), -1).max(axis=1) * 255).astype(int)
    assert [stored[v] for v in values] == labels.tolist()
    assert (images.reshape(len(images), -1).min(axis=1) == 0).mean() > 0.5
    again, _ = _take(augmented, steps)  # a new iterator: the shifts are drawn anew
    assert not np.array_equal(images, again)
    # The autoencoder's target is the very image it gets.
    x, target = next(
        iter(
            make_dataset(
                train,
                image_shape=SHAPE,
                batch_size=4,
                task=RECONSTRUCTION,
                augment=Augmentation(shift=0.2, rotation_deg=30),
            )
        )
    )
    np.testing.assert_array_equal(x, target)
    # Nothing to change: the batches of no augmentation, bit for bit.
    plain = make_dataset(train, image_shape=SHAPE, batch_size=4, shuffle=False)
    off = make_dataset(
        train, image_shape=SHAPE, batch_size=4, shuffle=False, augment=Augmentation()
    )
    np.testing.assert_array_equal(_take(plain, 3)[0], _take(off, 3)[0])


def test_batches_have_model_shapes_dtypes_and_range(train):
    images, labels = next(iter(make_dataset(train, image_shape=SHAPE, batch_size=8, seed=3)))
    assert images.shape == (8, *SHAPE) and images.dtype.name == "float32"
    assert labels.shape == (8,) and labels.dtype.name == "int32"
    assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 1.0
    assert set(labels.numpy().tolist()) <= {0, 1}


def test_one_rank_sees_real_images_with_stored_pixels(train, arrays):
    batch = 4
    ids = _ids(normalise(arrays.images))
    stored = dict(zip(ids, zip(arrays.images, arrays.labels, strict=True), strict=True))
    dataset = make_dataset(train, image_shape=SHAPE, batch_size=batch, shuffle=False)
    images, labels = _take(dataset, len(arrays) // batch)
    ids = _ids(images)
    assert len(set(ids)) == len(ids)  # one pass: no image twice
    for value, image, label in zip(ids, images, labels, strict=True):
        np.testing.assert_array_equal(image, normalise(stored[value][0]))  # bit-exact scaling
        assert label == stored[value][1]


def test_two_shards_cover_the_split_without_overlap(train, arrays):
    every = set(_ids(normalise(arrays.images)))
    seen = []
    for shard in (0, 1):
        dataset = make_dataset(
            train, image_shape=SHAPE, batch_size=1, cur_shard=shard, shard_count=2, shuffle=False
        )
        # More steps than the shard has rows: its stream wraps, so every row is seen.
        images, _ = _take(dataset, len(arrays))
        seen.append(set(_ids(images)))
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == every


def test_more_shards_than_row_groups_falls_back_to_the_whole_split(train, arrays, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.train.feed"):
        dataset = make_dataset(
            train, image_shape=SHAPE, batch_size=1, cur_shard=63, shard_count=64, shuffle=False
        )
    assert "fewer row groups than the 64 ranks" in caplog.text
    images, _ = _take(dataset, len(arrays))
    assert set(_ids(images)) == set(_ids(normalise(arrays.images)))


def test_autoencoder_yields_images_as_targets(train, arrays):
    x, y = next(iter(make_dataset(train, image_shape=SHAPE, batch_size=4, task=RECONSTRUCTION)))
    np.testing.assert_array_equal(x.numpy(), y.numpy())
    x, y = next(iter(in_memory_dataset(arrays, batch_size=4, task=RECONSTRUCTION)))
    np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_in_memory_dataset_gives_the_same_batches(arrays):
    images, labels = _take(in_memory_dataset(arrays, batch_size=4, shuffle=False), 2)
    np.testing.assert_array_equal(images, normalise(arrays.images[:8]))
    np.testing.assert_array_equal(labels, arrays.labels[:8])
    # Shuffled, each pass is a permutation of the whole split; batches run across passes.
    shuffled, _ = _take(in_memory_dataset(arrays, batch_size=len(arrays), seed=1), 2)
    assert sorted(_ids(shuffled[: len(arrays)])) == sorted(_ids(normalise(arrays.images)))


def test_wrong_image_shape_fails_with_url_and_shape(train):
    with pytest.raises(ValueError, match=r"split=train holds uint8 images of shape \(12, 12, 1\)"):
        make_dataset(train, image_shape=(28, 28, 1), batch_size=4)
    with pytest.raises(ImageShapeError, match=r"expected uint8 images of shape \(12, 12, 3\)"):
        read_split(train, (12, 12, 3))


def test_missing_split_fails_with_the_path(tmp_path):
    missing = DatasetDir(str(tmp_path)).split("val")
    with pytest.raises(FileNotFoundError, match=f"split not found: {missing}"):
        read_split(missing, SHAPE)
    with pytest.raises(SplitNotFoundError, match="split=val"):
        make_dataset(missing, image_shape=SHAPE, batch_size=4)


def test_readers_stop_when_iterators_go_away(train):
    from petastorm.workers_pool.thread_pool import WorkerThread

    def reader_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if isinstance(t, WorkerThread) or "_ventilate" in t.name
        ]

    before = set(reader_threads())
    dataset = make_dataset(train, image_shape=SHAPE, batch_size=4)
    iterator = iter(dataset)
    next(iterator)
    assert set(reader_threads()) - before
    del iterator
    gc.collect()
    deadline = time.monotonic() + 10
    while set(reader_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(reader_threads()) - before


def test_process_exits_cleanly_with_a_live_iterator(train):
    # Without the feed's exit hook a tf.data thread inside the generator hangs or aborts
    # interpreter shutdown ("terminate called without an active exception").
    script = (
        "from pipelines.train.feed import make_dataset\n"
        f"it = iter(make_dataset({train!r}, image_shape={SHAPE!r}, batch_size=4))\n"
        "for _ in range(20): next(it)\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
    assert "terminate called" not in result.stderr
