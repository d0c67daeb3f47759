"""The Keras stack reads the pinned stack's datasets (pyarrow >= 15, numpy 2, no Petastorm).

``fixtures/prepared`` was written by the pinned stack's own ``dlpipe ingest`` (see
``fixtures/make_prepared.py``); the other datasets are written here with the schema's codec.
"""

from __future__ import annotations

import functools
import gc
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.store import DatasetDir
from pipelines.store import filesystem as store_filesystem
from pipelines.train import arrow_reader, numpy_feed
from pipelines.train.arrow_reader import ROW_GROUPS_PER_FILE_KEY, SplitReader
from pipelines.train.feed import ImageShapeError, SplitNotFoundError

FIXTURE = Path(__file__).parent / "fixtures" / "prepared"
SHAPE = (5, 4, 1)


def test_the_stack_is_the_keras_stack():
    import keras
    import pyspark

    assert int(np.__version__.split(".")[0]) >= 2
    assert int(pa.__version__.split(".")[0]) >= 15
    assert keras.__version__.startswith("3.") and keras.backend.backend() == "jax"
    assert pyspark.__version__.startswith("4.")
    with pytest.raises(ImportError):
        import petastorm  # noqa: F401


# --- the pinned stack's ingest output ------------------------------------------------------


def test_a_dataset_from_the_pinned_stacks_ingest_reads_whole_and_sharded():
    manifest = DatasetDir(str(FIXTURE)).read_manifest()
    shape = tuple(manifest.image_shape)
    for split, rows in manifest.splits.items():
        url = DatasetDir(str(FIXTURE)).split(split)
        whole = list(SplitReader(url, image_shape=shape, with_paths=True))
        assert sum(len(r) for r in whole) == rows
        # Its _common_metadata (written with Petastorm on pyarrow 14) gives the counts.
        filesystem, base = store_filesystem(url)
        counts, source = arrow_reader._recorded_row_groups(filesystem, base)
        assert source == "_common_metadata" and sum(counts.values()) == len(whole)
        for r in whole:
            assert r.images.dtype == np.uint8 and r.images.shape == (len(r), *shape)
            assert r.labels.dtype == np.int32
            assert set(r.labels.tolist()) <= set(range(len(manifest.label_names)))
            # Each label agrees with the class folder in the row's path.
            names = [manifest.label_names[label] for label in r.labels]
            assert all(f"/{name}/" in path for name, path in zip(names, r.paths, strict=True))
        cells = list(SplitReader(url))
        for r, raw in zip(whole, cells, strict=True):
            np.testing.assert_array_equal(r.images, schema.decode_cells(raw.cells, shape))
        paths = [p for r in whole for p in r.paths]
        if len(whole) >= 2:
            shards = [
                [p for r in SplitReader(url, cur_shard=k, shard_count=2, with_paths=True)
                 for p in r.paths]
                for k in range(2)
            ]  # fmt: skip
            assert sorted(shards[0] + shards[1]) == sorted(paths)
            assert not set(shards[0]) & set(shards[1])


def test_read_split_of_the_fixture_is_sorted_with_the_manifests_names():
    manifest = DatasetDir(str(FIXTURE)).read_manifest()
    arrays = numpy_feed.read_split(DatasetDir(str(FIXTURE)).split("train"), manifest.image_shape)
    assert len(arrays) == manifest.splits["train"]
    assert arrays.paths == sorted(arrays.paths)
    assert arrays.label_names == manifest.label_names
    assert arrays.images.shape == (len(arrays), *manifest.image_shape)


# --- a split written here, with several uneven row groups per file -------------------------


def _write_split(folder: Path, files: dict[str, tuple[int, int]]) -> list[str]:
    """Write each file's rows in row groups of the given size; the paths in stored order."""
    folder.mkdir(parents=True)
    counter, paths = 0, []
    counts = {}
    for name, (rows, group) in files.items():
        images = (np.arange(counter, counter + rows)[:, None] % 256).astype(np.uint8)
        images = np.broadcast_to(images[:, None, None, :], (rows, *SHAPE))
        names = [f"/src/{name}/{i:04d}.png" for i in range(counter, counter + rows)]
        table = pa.table(
            {
                schema.IMAGE: [schema.encode_cell(np.ascontiguousarray(im)) for im in images],
                schema.LABEL: pa.array(np.arange(counter, counter + rows) % 3, pa.int32()),
                schema.LABEL_NAME: [f"c{i % 3}" for i in range(counter, counter + rows)],
                schema.PATH: names,
                schema.SPLIT: ["train"] * rows,
            },
            schema=schema.prepared_arrow_schema(),
        )
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=group)
        counts[f"{name}.parquet"] = -(-rows // group)
        counter += rows
        paths += names
    # Petastorm's row-group counts, as ingest records them (no Unischema: not needed here).
    metadata = schema.prepared_arrow_schema().with_metadata(
        {ROW_GROUPS_PER_FILE_KEY: json.dumps(counts).encode()}
    )
    pq.write_metadata(metadata, folder / "_common_metadata")
    return paths


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared") / "split=train"
    # 4 + 2 + 3 = 9 row groups of 1 to 6 rows, 37 rows.
    _write_split(folder, {"part-a": (21, 6), "part-b": (7, 5), "part-c": (9, 4)})
    return folder


def _row_group_sizes(folder: Path) -> list[int]:
    sizes = []
    for path in sorted(folder.glob("part-*.parquet")):
        meta = pq.read_metadata(path)
        sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return sizes


def test_each_rank_reads_the_row_groups_of_its_index_modulo_the_ranks(split):
    sizes = _row_group_sizes(split)
    assert sizes == [6, 6, 6, 3, 5, 2, 4, 4, 1]
    starts = np.cumsum([0, *sizes])
    for count in (1, 2, 3, 4, 9):
        for rank in range(count):
            got = [r.paths for r in SplitReader(str(split), cur_shard=rank, shard_count=count,
                                                with_paths=True)]  # fmt: skip
            want = [
                [f"/src/{_file_of(j)}/{j:04d}.png" for j in range(starts[i], starts[i + 1])]
                for i in range(rank, len(sizes), count)
            ]
            assert got == want, (rank, count)
    with pytest.raises(arrow_reader.TooFewRowGroupsError):
        SplitReader(str(split), cur_shard=0, shard_count=10)


def _file_of(row: int) -> str:
    return "part-a" if row < 21 else "part-b" if row < 28 else "part-c"


def test_wrong_shapes_and_missing_splits_fail_in_one_line(split, tmp_path):
    with pytest.raises(ImageShapeError, match=r"shape \(5, 4, 1\).*expected uint8 images"):
        next(iter(SplitReader(str(split), image_shape=(4, 5, 1))))
    with pytest.raises(SplitNotFoundError, match="split not found"):
        numpy_feed.make_feed(str(tmp_path / "split=val"), image_shape=SHAPE, batch_size=4)
    with pytest.raises(ImageShapeError):
        numpy_feed.make_feed(str(split), image_shape=(5, 4, 3), batch_size=4)


# --- the numpy feed --------------------------------------------------------------------------


def _pixels_to_rows(images: np.ndarray) -> list[int]:
    """The row number each image was written with (its pixel value, rows < 256)."""
    return np.rint(images[:, 0, 0, 0] * 255).astype(int).tolist()


def test_unshuffled_batches_are_the_stored_rows_in_order_and_run_across_passes(split):
    with numpy_feed.make_feed(str(split), image_shape=SHAPE, batch_size=5, shuffle=False) as feed:
        batches = [next(feed) for _ in range(15)]  # 75 images: two passes over 37, and more
    x, y = batches[0]
    assert x.dtype == np.float32 and x.shape == (5, *SHAPE) and y.dtype == np.int32
    assert all(0.0 <= b[0].min() and b[0].max() <= 1.0 for b in batches)
    rows = [r for b in batches for r in _pixels_to_rows(b[0])]
    assert rows == [i % 37 for i in range(75)]
    assert [lab for b in batches for lab in b[1].tolist()] == [i % 37 % 3 for i in range(75)]
    # Scaled exactly as pipelines.images.normalise does.
    from pipelines.images import normalise

    np.testing.assert_array_equal(x, normalise(np.rint(x * 255).astype(np.uint8)))


def test_shuffled_feeds_are_seeded_sharded_and_cover_the_shard(split):
    def rows(seed: int, rank: int) -> list[int]:
        with numpy_feed.make_feed(
            str(split),
            image_shape=SHAPE,
            batch_size=4,
            seed=seed,
            shuffle_buffer=8,
            cur_shard=rank,
            shard_count=2,
        ) as feed:
            return [r for _ in range(20) for r in _pixels_to_rows(next(feed)[0])]  # fmt: skip

    first, again, other = rows(3, 0), rows(3, 0), rows(4, 0)
    assert first == again and first != other
    # Rank 0 of 2 reads row groups 0, 2, 4, 6, 8: rows 0-5, 12-17, 21-25, 28-31 and 36.
    shard0 = set(np.r_[0:6, 12:18, 21:26, 28:32, 36:37].tolist())
    assert set(first) == shard0  # 80 draws from a 22-row shard reach every row
    assert first[:22] != sorted(first[:22])
    assert set(rows(3, 1)) == set(range(37)) - shard0


def test_the_autoencoder_feed_yields_images_as_targets(split):
    with numpy_feed.make_feed(str(split), image_shape=SHAPE, batch_size=3, autoencoder=True) as f:
        x, target = next(f)
    assert x is target or np.array_equal(x, target)
    assert target.dtype == np.float32 and target.shape == (3, *SHAPE)


class _CountingReader(SplitReader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = 0

    def __iter__(self):
        for rows in super().__iter__():
            self.read += 1
            yield rows


def test_the_feed_reads_a_few_row_groups_ahead_and_stops_when_closed(split):
    reader = _CountingReader(str(split), image_shape=SHAPE, num_epochs=None)
    feed = numpy_feed.BatchFeed(reader, batch_size=4, shuffle_buffer=8, prefetch_batches=2)
    next(feed)
    time.sleep(0.5)  # time to read ahead as far as it will
    # Queue of 2 batches + one being put + the buffer (8 + one row group): <= 34 images ahead.
    assert reader.read <= 8, reader.read
    feed.close()
    assert not feed.running
    with pytest.raises(StopIteration):
        next(feed)
    stopped_at = reader.read
    time.sleep(0.2)
    assert reader.read == stopped_at


def test_a_dropped_feed_stops_its_thread():
    feeds_before = _feed_threads()
    numpy_feed.make_feed(str(FIXTURE / "split=train"), image_shape=(6, 6, 3), batch_size=2)
    gc.collect()
    deadline = time.monotonic() + 10
    while _feed_threads() > feeds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _feed_threads() == feeds_before


def _feed_threads() -> int:
    return sum(t.name == "dlpipe-numpy-feed" and t.is_alive() for t in threading.enumerate())


def test_a_reader_error_reaches_the_consumer(split):
    class Broken(SplitReader):
        def __iter__(self):
            yield from list(super().__iter__())[:1]
            raise OSError("disk gone")

    reader = Broken(str(split), image_shape=SHAPE)
    feed = numpy_feed.BatchFeed(reader, batch_size=50)
    with pytest.raises(OSError, match="disk gone"):
        next(feed)
    assert not feed.running


def test_the_keras_dataset_restarts_at_batch_zero_and_trains(split):
    import keras

    make = functools.partial(
        numpy_feed.make_feed, str(split), image_shape=SHAPE, batch_size=4, shuffle=False
    )
    data = numpy_feed.keras_dataset(make)
    first = [_pixels_to_rows(data[i][0]) for i in range(3)]
    again = [_pixels_to_rows(data[i][0]) for i in range(3)]
    assert first == again == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(IndexError):
        data[7]
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = numpy_feed.keras_dataset(functools.partial(make, shuffle=True))
    steps = numpy_feed.steps_per_epoch(37, 1, 4)
    history = model.fit(train, steps_per_epoch=steps, epochs=2, verbose=0, shuffle=False,
                        validation_data=data, validation_steps=3)  # fmt: skip
    assert len(history.history["loss"]) == 2 and len(history.history["val_loss"]) == 2
    val = [model.evaluate(data, steps=3, verbose=0) for _ in range(2)]
    assert val[0] == val[1]  # each evaluation reads the same rows
    train.close()
    data.close()
