"""Ingest on a real local SparkSession, read back with Petastorm's own readers."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import IngestConfig, SplitConfig
from pipelines.ingest import IngestError, ingest
from pipelines.schema import SPLITS
from pipelines.sources import SourceError, write_cifar10_batch, write_cifar10_meta, write_idx
from pipelines.store import DatasetDir

# Raw cells: these tests read them with plain Petastorm's make_reader (NdarrayCodec).
CONFIG = IngestConfig(image_size=16, channels=1, rows_per_row_group=8, storage="raw")


def _image_bytes(value: int, fmt: str, mode: str = "L") -> bytes:
    array = np.full((20, 24), value, np.uint8)
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_tree(root: Path, per_class: int = 12) -> dict[str, int]:
    """Two classes of real images plus every kind of bad file; returns expected counts."""
    formats = [
        ("png", "PNG", "L"),
        ("JPG", "JPEG", "RGB"),
        ("bmp", "BMP", "RGB"),
        ("gif", "GIF", "P"),
        ("tiff", "TIFF", "RGBA"),
        ("webp", "WEBP", "RGB"),
    ]
    for label, value in (("cat", 40), ("dog", 200)):
        for i in range(per_class):
            ext, fmt, mode = formats[i % len(formats)]
            folder = root / label / ("nested/deeper" if i % 4 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{label} {i:02d}.{ext}").write_bytes(_image_bytes(value + i, fmt, mode))
    good = _image_bytes(90, "PNG")
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "dog" / "truncated.jpg").write_bytes(_image_bytes(7, "JPEG", "RGB")[:200])
    (root / "dog" / "zero.jpeg").write_bytes(b"")
    (root / "loose.png").write_bytes(good)  # not inside a class folder
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "labels.csv").write_text("a,b\n")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0")
    return {"ingested": 2 * per_class, "quarantined": 4, "skipped": 3}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("images")
    return root, make_tree(root)


@pytest.fixture(scope="module")
def prepared(spark, tree, tmp_path_factory):
    source, expected = tree
    output = tmp_path_factory.mktemp("out") / "prepared"
    return ingest(spark, CONFIG, source, output), output, expected


def test_counts_add_up_and_nothing_is_lost(prepared):
    result, output, expected = prepared
    assert result.ingested == expected["ingested"]
    assert result.quarantined == expected["quarantined"]
    assert result.skipped == expected["skipped"]
    assert result.files_seen == result.ingested + result.quarantined + result.skipped
    assert sum(result.splits.values()) == result.ingested
    assert result.classes == {"cat": 12, "dog": 12}
    assert result.label_names == ["cat", "dog"]


def test_quarantine_table_has_every_rejected_file_with_a_reason(prepared):
    _, output, _ = prepared
    table = pq.read_table(output / DatasetDir.QUARANTINE_DIR).to_pandas()
    reasons = dict(zip((Path(p).name for p in table.path), table.reason, strict=True))
    assert set(reasons) == {"corrupt.png", "truncated.jpg", "zero.jpeg", "loose.png"}
    assert reasons["zero.jpeg"] == "empty file"
    assert "class folder" in reasons["loose.png"]
    assert all(reasons.values())


def test_manifest_records_counts_shape_and_label_order(prepared):
    result, output, _ = prepared
    manifest = json.loads((output / DatasetDir.MANIFEST_FILE).read_text())
    for key in ("files_seen", "ingested", "quarantined", "skipped", "splits", "classes"):
        assert manifest[key] == getattr(result, key)
    assert manifest["image_shape"] == [16, 16, 1]
    assert manifest["label_names"] == ["cat", "dog"]
    assert manifest["format"] == "folder"
    assert manifest["started_at"] <= manifest["finished_at"]


def test_manifest_counts_each_class_in_each_split_as_written(spark, prepared):
    result, output, _ = prepared
    written = spark.read.parquet(str(output)).groupBy("split", "label_name").count().collect()
    counted = {split: {"cat": 0, "dog": 0} for split in ("train", "val", "test")}
    for row in written:
        counted[row["split"]][row["label_name"]] = row["count"]
    assert result.split_classes == counted
    manifest = json.loads((output / DatasetDir.MANIFEST_FILE).read_text())
    assert manifest["split_classes"] == counted
    assert {k: sum(v.values()) for k, v in counted.items()} == result.splits


def test_petastorm_make_reader_reads_every_split(prepared):
    from petastorm import make_reader

    result, output, _ = prepared
    seen = {}
    for split in SPLITS:
        if result.splits[split] == 0:
            continue
        url = "file://" + DatasetDir(str(output)).split(split)
        with make_reader(url, num_epochs=1, reader_pool_type="dummy") as reader:
            rows = list(reader)
        assert len(rows) == result.splits[split]
        for row in rows:
            assert row.image.shape == (16, 16, 1) and row.image.dtype == np.uint8
            assert row.split == split
            assert ["cat", "dog"][row.label] == row.label_name
            seen[Path(row.path).name] = row
    # Pixel values survive: cat images are dark (40+i), dog images bright (200+i).
    assert seen["cat 01.JPG"].image.mean() < 80 < seen["dog 01.JPG"].image.mean()


def test_row_groups_are_small_enough_to_shard(spark, prepared):
    result, output, _ = prepared
    train = Path(DatasetDir(str(output)).split("train"))
    files = [pq.ParquetFile(f).metadata for f in sorted(train.glob("*.parquet"))]
    sizes = [meta.num_rows for meta in files]
    assert sum(sizes) == result.splits["train"]
    assert max(sizes) <= CONFIG.rows_per_row_group
    assert len(sizes) >= 2  # two Horovod ranks each get a row group
    assert all(meta.num_row_groups == 1 for meta in files)
    # Similar sizes: each decoding task leaves at most one short row group per split.
    short = [n for n in sizes if n < CONFIG.rows_per_row_group]
    assert len(short) <= spark.sparkContext.defaultParallelism


def test_row_groups_mix_the_classes(spark, tmp_path):
    """Petastorm reads a row group as a unit: one class per row group spoils SGD batches."""
    source = tmp_path / "classes"
    for label in range(4):
        (source / f"class{label}").mkdir(parents=True)
        for i in range(30):
            path = source / f"class{label}" / f"{i:03d}.png"
            path.write_bytes(_image_bytes(label * 60 + i, "PNG"))
    output = tmp_path / "out"
    ingest(spark, replace(CONFIG, rows_per_row_group=16), source, output)
    train = Path(DatasetDir(str(output)).split("train"))
    groups = [
        pq.read_table(f, columns=["label"]).column("label").to_pylist()
        for f in sorted(train.glob("*.parquet"))
    ]
    full = [labels for labels in groups if len(labels) == 16]
    assert full and all(len(set(labels)) >= 3 for labels in full)


def test_each_split_is_a_complete_petastorm_dataset_and_nothing_else_is_left(prepared):
    from petastorm.etl.dataset_metadata import get_schema_from_dataset_url

    result, output, _ = prepared
    datasets = {f"split={s}" for s, n in result.splits.items() if n}
    assert {p.name for p in output.iterdir()} == {
        *datasets,
        DatasetDir.QUARANTINE_DIR,
        DatasetDir.MANIFEST_FILE,
    }
    for name in datasets:
        assert (output / name / "_common_metadata").is_file()
        stored = get_schema_from_dataset_url(f"file://{output / name}")
        assert list(stored.fields) == ["image", "label", "label_name", "path", "split"]


def test_row_groups_stay_under_the_size_bound_and_petastorm_reads_them_all(spark, tree, tmp_path):
    from petastorm import make_reader

    source, expected = tree
    # 600x600 RGB is about 1 MB a row: with a 1 MB bound every row is a row group of its own.
    config = replace(CONFIG, image_size=600, channels=3, rows_per_row_group=4, row_group_size_mb=1)
    result = ingest(spark, config, source, tmp_path / "out")
    train = DatasetDir(str(tmp_path / "out")).split("train")
    files = [pq.ParquetFile(f).metadata for f in Path(train).glob("*.parquet")]
    assert all(meta.num_row_groups == meta.num_rows for meta in files)
    assert max(meta.num_rows for meta in files) <= config.rows_per_row_group
    with make_reader("file://" + train, num_epochs=1, reader_pool_type="dummy") as reader:
        assert sum(1 for _ in reader) == result.splits["train"]


def test_only_files_reported_by_successful_tasks_are_committed(tmp_path):
    from pipelines.ingest import _commit_splits, _WrittenFile
    from pipelines.schema import prepared_schema

    staging = tmp_path / "_staging"
    for attempt in ("7", "8"):  # 7 failed halfway, its retry 8 succeeded
        (staging / attempt).mkdir(parents=True)
        table = pa.table({"image": [b"x"], "label": [0], "path": ["a"], "split": ["train"]})
        pq.write_table(table, staging / attempt / "train-part-00000-00000.parquet")
    staged = str(staging / "8" / "train-part-00000-00000.parquet")
    written = [_WrittenFile("train", "part-00000-00000.parquet", staged, 1, 1)]
    counts = _commit_splits(written, DatasetDir(str(tmp_path)), prepared_schema(16, 16, 1))
    assert counts == {"train": 1, "val": 0, "test": 0}
    assert [p.name for p in (tmp_path / "split=train").glob("*.parquet")] == [
        "part-00000-00000.parquet"
    ]
    assert not staging.exists()


def test_ingest_decodes_in_one_spark_job(spark, tree, tmp_path):
    source, _ = tree
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup())
    ingest(spark, CONFIG, source, tmp_path / "out")
    # One pass: no count, no per-split writes, no per-file metadata job (materialize_dataset).
    assert len(set(tracker.getJobIdsForGroup()) - before) == 1


def test_batch_reader_and_spark_see_the_same_rows(spark, prepared):
    from petastorm import make_batch_reader

    result, output, _ = prepared
    url = "file://" + DatasetDir(str(output)).split("train")
    with make_batch_reader(url, num_epochs=1, reader_pool_type="dummy") as reader:
        batch_rows = sum(len(batch.path) for batch in reader)
    assert batch_rows == result.splits["train"]
    counts = {
        r["split"]: r["count"]
        for r in spark.read.parquet(str(output)).groupBy("split").count().collect()
    }
    assert counts == {s: n for s, n in result.splits.items() if n}


def test_spark_converter_reads_the_dataset(spark, prepared, tmp_path):
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    result, output, _ = prepared
    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, f"file://{tmp_path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converter = make_spark_converter(spark.read.parquet(DatasetDir(str(output)).split("train")))
    assert len(converter) == result.splits["train"]
    converter.delete()


def test_rerun_gives_the_same_dataset_and_an_added_file_moves_nothing(spark, tmp_path):
    source = tmp_path / "src"
    make_tree(source, per_class=10)
    output = tmp_path / "out"
    first = ingest(spark, CONFIG, source, output)
    before = _rows_by_path(spark, output)
    again = ingest(spark, CONFIG, source, output)
    assert (again.splits, again.classes) == (first.splits, first.classes)
    assert _rows_by_path(spark, output) == before

    (source / "dog" / "new one.png").write_bytes(_image_bytes(123, "PNG"))
    ingest(spark, CONFIG, source, output)
    after = _rows_by_path(spark, output)
    assert len(after) == len(before) + 1
    assert {p: after[p] for p in before} == before


def test_splits_are_those_spark_xxhash64_gave_so_earlier_datasets_keep_theirs(spark):
    """The split hash moved from a Spark column to the tasks' Python: it must not move files."""
    from pyspark.sql import functions as F

    from pipelines.ingest import _splits_of

    rng = np.random.default_rng(7)
    alphabet = list("abcXYZ019_-. /") + ["é", "ü", "日本", "\\x9f", "\N{GRINNING FACE}"]
    rels = ["", "a", "cat/x.png"] + [
        "".join(rng.choice(alphabet, size=int(rng.integers(0, 90)))) for _ in range(3000)
    ]
    fractions = SplitConfig(0.7, 0.2, 0.1)
    bucket = F.pmod(F.xxhash64("rel"), F.lit(1_000_000)) / F.lit(1_000_000.0)
    by_spark = (
        F.when(bucket < fractions.train, "train")
        .when(bucket < fractions.train + fractions.val, "val")
        .otherwise("test")
    )
    frame = spark.createDataFrame([(rel,) for rel in rels], "rel string")
    rows = frame.select("rel", by_spark.alias("split")).collect()
    expected = {row.rel: row.split for row in rows}
    assert dict(zip(rels, _splits_of(rels, fractions), strict=True)) == expected
    assert set(expected.values()) == set(SPLITS)


def _rows_by_path(spark, output: Path) -> dict[str, tuple]:
    rows = spark.read.parquet(str(output)).select("path", "split", "label", "image").collect()
    return {r.path: (r.split, r.label, bytes(r.image)) for r in rows}


def test_failed_run_leaves_the_previous_dataset_intact(spark, tmp_path):
    source = tmp_path / "src"
    make_tree(source, per_class=6)
    output = tmp_path / "out"
    ingest(spark, CONFIG, source, output)
    manifest = (output / DatasetDir.MANIFEST_FILE).read_text()
    bad = tmp_path / "bad"
    (bad / "cat").mkdir(parents=True)
    (bad / "cat" / "x.png").write_bytes(b"not a png")
    with pytest.raises(IngestError, match=f"no decodable image in {bad}"):
        ingest(spark, CONFIG, bad, output)
    assert (output / DatasetDir.MANIFEST_FILE).read_text() == manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unreadable_files_are_quarantined_with_the_reason(spark, tmp_path):
    source = tmp_path / "src"
    make_tree(source, per_class=4)
    (source / "cat" / "broken link.png").symlink_to(tmp_path / "nowhere.png")
    result = ingest(spark, CONFIG, source, tmp_path / "out")
    assert result.ingested == 8
    assert result.files_seen == result.ingested + result.quarantined + result.skipped
    table = pq.read_table(tmp_path / "out" / DatasetDir.QUARANTINE_DIR).to_pandas()
    reasons = dict(zip((Path(p).name for p in table.path), table.reason, strict=True))
    assert reasons["broken link.png"] == "cannot read file: No such file or directory"


def test_missing_empty_and_nested_sources_fail_with_the_path(spark, tmp_path):
    with pytest.raises(SourceError, match=f"source not found: {tmp_path / 'nope'}"):
        ingest(spark, CONFIG, tmp_path / "nope", tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=f"source is empty: {empty}"):
        ingest(spark, CONFIG, empty, tmp_path / "o2")
    only_text = tmp_path / "text"
    (only_text / "a").mkdir(parents=True)
    (only_text / "a" / "readme.txt").write_text("x")
    with pytest.raises(IngestError, match="no decodable image"):
        ingest(spark, CONFIG, only_text, tmp_path / "o3")
    with pytest.raises(IngestError, match="inside the source"):
        ingest(spark, CONFIG, only_text, only_text / "out")


def test_mnist_idx_source(spark, tmp_path):
    from petastorm import make_reader

    rng = np.random.default_rng(0)
    source = tmp_path / "mnist"
    source.mkdir()
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    write_idx(source / "train-images-idx3-ubyte", images)
    write_idx(source / "train-labels-idx1-ubyte", labels)
    write_idx(source / "t10k-images-idx3-ubyte.gz", images[:10])
    write_idx(source / "t10k-labels-idx1-ubyte.gz", labels[:10])
    output = tmp_path / "out"
    config = replace(CONFIG, image_size=28)
    result = ingest(spark, config, source, output)
    assert result.format == "mnist-idx"
    assert result.ingested == result.files_seen == 50
    assert result.label_names == [str(d) for d in range(10)]
    with make_reader(
        "file://" + DatasetDir(str(output)).split("train"), num_epochs=1, reader_pool_type="dummy"
    ) as reader:
        row = next(iter(reader))
    part, index = Path(row.path).name.split("#")
    original = images[int(index)] if part.startswith("train") else images[:10][int(index)]
    np.testing.assert_array_equal(row.image[:, :, 0], original)  # same size: pixels unchanged
    assert row.label == labels[int(index)]


def test_cifar10_source_to_rgb(spark, tmp_path):
    rng = np.random.default_rng(1)
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    write_cifar10_meta(source / "batches.meta", names)
    write_cifar10_batch(
        source / "data_batch_1",
        rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        [i % 10 for i in range(30)],
    )
    write_cifar10_batch(
        source / "test_batch",
        rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        list(range(10)),
    )
    output = tmp_path / "out"
    result = ingest(
        spark,
        replace(CONFIG, image_size=32, channels=3, splits=SplitConfig(0.6, 0.2, 0.2)),
        source,
        output,
    )
    assert result.format == "cifar10"
    assert result.ingested == 40 and result.image_shape == [32, 32, 3]
    assert result.label_names == names
    assert result.classes["airplane"] == 4


def test_decoding_tasks_fill_whole_waves_of_the_task_slots(spark):
    # 3 equal tasks on 2 slots leave one slot idle through the second wave.
    from pipelines.ingest import _task_count

    config = IngestConfig(rows_per_row_group=128)  # 8 full row groups a task: 1,024 rows
    assert spark.sparkContext.defaultParallelism == 2
    counts = {n: _task_count(spark, config, n) for n in (1, 500, 3000, 4095, 4096, 30000, 10**6)}
    assert counts == {1: 1, 500: 2, 3000: 2, 4095: 2, 4096: 4, 30000: 4, 10**6: 4}
    assert _task_count(spark, replace(config, partitions=3), 3000) == 3  # as configured
