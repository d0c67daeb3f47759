"""The plain-pyarrow reader gives every rank exactly the rows Petastorm's batch reader gives it.

Runs on the pinned stack (Petastorm 0.13.1, pyarrow 14), against Petastorm itself, on splits
with uneven row groups: several per file, short last ones, and files of one row group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.store import to_url
from pipelines.train import arrow_reader
from pipelines.train.arrow_reader import SplitReader, TooFewRowGroupsError
from pipelines.train.feed import ImageShapeError, SplitNotFoundError

SHAPE = (4, 3, 2)
#: Rows and row-group size of each file: 3 + 1 + 4 + 2 = 10 row groups of 1 to 6 rows.
FILES = {"part-00000-00000": (12, 5), "part-00000-00001": (7, 7), "part-00001-00000": (10, 3),
         "part-00001-00001": (7, 6)}  # fmt: skip


def _write_split(folder: Path, metadata: bool) -> dict[str, int]:
    """Write FILES as a prepared split; with ``metadata``, Petastorm's as ingest writes it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    counts = {}
    for number, (name, (rows, group)) in enumerate(FILES.items()):
        images = rng.integers(0, 256, (rows, *SHAPE), dtype=np.uint8)
        table = pa.table(
            {
                schema.IMAGE: [schema.encode_cell(image) for image in images],
                schema.LABEL: pa.array(rng.integers(0, 5, rows), pa.int32()),
                schema.LABEL_NAME: [f"c{i}" for i in range(rows)],
                schema.PATH: [f"/src/{name}/img_{number}_{i:03d}.png" for i in range(rows)],
                schema.SPLIT: ["train"] * rows,
            },
            schema=schema.prepared_arrow_schema(),
        )
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=group)
        counts[f"{name}.parquet"] = pq.read_metadata(folder / f"{name}.parquet").num_row_groups
    # What a legacy ParquetDataset (and so Petastorm) never takes as data.
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000-00000.parquet.crc").write_bytes(b"x")
    if metadata:
        from pipelines.ingest import _write_petastorm_metadata

        _write_petastorm_metadata(folder, schema.prepared_schema(*SHAPE), counts)
    return counts


@pytest.fixture(scope="module", params=[True, False], ids=["ingest-metadata", "footers-only"])
def split(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared") / "split=train"
    counts = _write_split(folder, metadata=request.param)
    assert sorted(counts.values()) == [1, 2, 3, 4]
    return folder


def _petastorm_shard(folder: Path, rank: int, count: int, shuffle: bool = False) -> list:
    """(paths, cells, labels) per row group, as Petastorm's batch reader hands them out."""
    from petastorm import make_batch_reader

    from pipelines.train.feed import _quiet_petastorm

    _quiet_petastorm()
    shard = {"cur_shard": rank, "shard_count": count} if count > 1 else {}
    reader = make_batch_reader(
        to_url(folder),
        num_epochs=1,
        schema_fields=[schema.IMAGE, schema.LABEL, schema.PATH],
        shuffle_row_groups=shuffle,
        reader_pool_type="dummy",
        **shard,
    )
    try:
        return [(list(b.path), list(b.image), b.label.tolist()) for b in reader]
    finally:
        reader.stop()
        reader.join()


def _arrow_shard(folder: Path, rank: int, count: int, **options) -> list:
    reader = SplitReader(str(folder), cur_shard=rank, shard_count=count, with_paths=True, **options)
    return [(rows.paths, rows.cells, rows.labels.tolist()) for rows in reader]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 10])
def test_every_rank_reads_petastorms_rows_in_petastorms_order(split, count):
    everything = []
    for rank in range(count):
        ours = _arrow_shard(split, rank, count)
        theirs = _petastorm_shard(split, rank, count)
        assert len(ours) == len(theirs) > 0
        assert ours == theirs, f"rank {rank} of {count}"
        everything += [path for paths, _, _ in ours for path in paths]
    # The shards are disjoint and together hold every row once.
    assert sorted(everything) == sorted(pq.read_table(split).column(schema.PATH).to_pylist())


def test_more_shards_than_row_groups_fails_as_petastorm_does(split):
    from petastorm import NoDataAvailableError

    with pytest.raises(NoDataAvailableError):
        _petastorm_shard(split, 0, 11)
    with pytest.raises(TooFewRowGroupsError):
        SplitReader(str(split), cur_shard=0, shard_count=11)


def test_shuffled_row_groups_are_the_same_shard_in_a_seeded_order_new_each_pass(split):
    plain = _arrow_shard(split, 1, 3)
    first = _arrow_shard(split, 1, 3, shuffle_row_groups=True, seed=5, num_epochs=4)
    again = _arrow_shard(split, 1, 3, shuffle_row_groups=True, seed=5, num_epochs=4)
    assert first == again
    passes = [first[i : i + len(plain)] for i in range(0, len(first), len(plain))]
    assert len(passes) == 4
    for one in passes:
        assert sorted(map(str, one)) == sorted(map(str, plain))
    assert len({tuple(p[0][0] for p in one) for one in passes}) > 1  # the order changes
    petastorm = _petastorm_shard(split, 1, 3, shuffle=True)
    assert sorted(map(str, petastorm)) == sorted(map(str, plain))


def test_decoded_images_are_the_cells_pixels(split):
    cells = SplitReader(str(split), with_paths=True)
    decoded = SplitReader(to_url(split), image_shape=SHAPE, with_paths=True)
    for raw, rows in zip(cells, decoded, strict=True):
        assert rows.images.dtype == np.uint8 and rows.images.shape == (len(raw), *SHAPE)
        np.testing.assert_array_equal(rows.images, schema.decode_cells(raw.cells, SHAPE))
        assert rows.paths == raw.paths and rows.labels.dtype == np.int32


def test_an_infinite_read_keeps_cycling_the_shard(split):
    plain = _arrow_shard(split, 0, 2)
    reader = iter(SplitReader(str(split), cur_shard=0, shard_count=2, num_epochs=None))
    seen = [next(reader) for _ in range(3 * len(plain))]
    assert [rows.epoch for rows in seen] == [e for e in range(3) for _ in plain]
    assert [rows.labels.tolist() for rows in seen[len(plain) :]] == [p[2] for p in plain] * 2


def test_bad_cells_and_missing_splits_fail_in_one_line(tmp_path, split):
    with pytest.raises(ImageShapeError, match="expected uint8 images of shape"):
        next(iter(SplitReader(str(split), image_shape=(4, 3, 3))))
    with pytest.raises(SplitNotFoundError, match="split not found"):
        SplitReader(str(tmp_path / "split=nope"))
    (tmp_path / "split=empty").mkdir()
    with pytest.raises(arrow_reader.SplitReadError, match="no Parquet data file"):
        SplitReader(str(tmp_path / "split=empty"))
