"""Ingest: image sources to a prepared Petastorm dataset, a quarantine and a manifest.

In: a source (a folder tree with one sub-folder per class, MNIST IDX files or CIFAR-10
python batches) and :class:`~pipelines.config.IngestConfig`.
Out, under the output directory (replaced atomically):

- ``split=train/``, ``split=val/``, ``split=test/``: one Petastorm dataset per split
  (``make_reader`` shards by row-group index over a whole dataset, so splits must not share
  one); ``spark.read.parquet(output)`` sees all three with ``split`` as a column;
- ``_quarantine/``: Parquet table of rejected files (``path``, ``reason``);
- ``_manifest.json``: counts, classes, label order, image shape, source, timestamps;

and a small :class:`IngestResult`.

A run stages its output in a folder beside it owned by its process and commits it whole
(:class:`~pipelines.store.Staging`); a later run removes such folders whose process is gone,
never a live run's.

How it runs, in one Spark job: the driver lists the source (or reads the arrays) and rejects
what it can judge without decoding (zero-length files, files outside a class folder); each
task reads its listed files by path, decodes them with the same pure functions
(:mod:`pipelines.images`) that serving uses, assigns each its split, writes the good ones
as Parquet files of ``rows_per_row_group`` rows into a staging folder of its own, and
reports back the files it wrote and the records it rejected. The driver then moves the
reported files into one folder per split, adds Petastorm's metadata, and writes the
quarantine and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import schema
from pipelines.config import IngestConfig, SplitConfig
from pipelines.errors import UserError
from pipelines.images import ImageDecodeError, decode_image, prepare_array
from pipelines.listing import display_path, list_tree, read_file
from pipelines.sources import SourceError, detect_format, read_cifar10, read_mnist_idx
from pipelines.store import DatasetDir, Staging, move_into, remove, to_url

if TYPE_CHECKING:
    import pandas as pd
    from petastorm.unischema import Unischema
    from pyspark.sql import SparkSession

    from pipelines.sources import ArrayPart

log = logging.getLogger(__name__)

#: Seed of Spark's ``xxhash64``, which assigned splits before :func:`_splits_of` did.
_SPLIT_HASH_SEED = 42

#: Buckets of the split hash: a split's share is resolved to one in a million.
_SPLIT_BUCKETS = 1_000_000

#: Automatic task count: a task should write at least this many full row groups per split
#: before the work is spread over more tasks than task slots (each task leaves one short
#: row group per split).
_ROW_GROUPS_PER_WRITER = 8


#: Decodes one pandas batch of records: an ``(encoded image, reason)`` pair per row.
_BatchDecoder = Callable[["pd.DataFrame"], list[tuple[bytes | None, str | None]]]


class IngestError(UserError):
    """The source cannot be ingested (nothing decodable, output inside the source, ...)."""


@dataclass(frozen=True)
class IngestResult(schema.Manifest):
    """What an ingest produced: the dataset's :class:`~pipelines.schema.Manifest` and where."""

    output: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (``output`` first, then the manifest)."""
        return {"output": self.output, **asdict(self.manifest())}

    def manifest(self) -> schema.Manifest:
        """The manifest alone, as written into the dataset."""
        return schema.Manifest(**self.manifest_dict())


@dataclass(frozen=True)
class _Plan:
    """Everything the driver knows before decoding.

    Attributes:
        records: One row per record to decode, sorted by ``rel``: ``path``, ``rel``,
            ``label`` (int32), ``label_name``, and ``file`` (the raw bytes of the path to
            open) for folders or ``raw`` (the pixels) for arrays. ``path``, ``rel`` and
            ``label_name`` are display forms (:func:`~pipelines.listing.display_path`),
            valid UTF-8 whatever the name.
        decode: Decodes a batch of ``records`` on an executor.
        rejected: Records rejected on the driver, path to reason.
        skipped: Files skipped as not images (other extensions, hidden names).
        label_names: Class names; a label is an index into this list.
    """

    records: pd.DataFrame
    decode: _BatchDecoder
    rejected: dict[str, str]
    skipped: int
    label_names: list[str]


def ingest(
    spark: SparkSession, config: IngestConfig, source: str | Path, output: str | Path
) -> IngestResult:
    """Decode, split and write a source as a prepared dataset.

    Args:
        spark: The session whose executors decode the images.
        config: Target shape, split fractions, row-group sizing, format.
        source: Local (or FUSE-mounted, e.g. ``/dbfs/...``) path of the source; executors
            read the files by the same path.
        output: Directory of the prepared dataset; replaced only when the run succeeds.

    Returns:
        Counts, classes and shape, as also written to ``_manifest.json``.

    Raises:
        SourceError: The source is missing, empty or malformed.
        IngestError: No image could be decoded, or the output lies inside the source.
    """
    started = time.time()
    src = Path(source).expanduser().resolve()
    dst = Path(output).expanduser().resolve()
    if not src.exists():
        raise SourceError(f"source not found: {src}")
    fmt = detect_format(src) if config.format == "auto" else config.format
    if dst == src or src in dst.parents:
        raise IngestError(f"output {dst} lies inside the source {src}; choose another --output")
    log.info("ingest: %s source %s -> %s", fmt, src, dst)
    plan = _folder_plan(src, config) if fmt == "folder" else _array_plan(src, fmt, config)
    shape = [config.image_size, config.image_size, config.channels]

    staging = Staging(str(dst))
    staging.remove_stale()
    with staging.folder() as tmp:
        written, rejected = _decode_and_write(spark, plan, config, tmp)
        rejected = {**plan.rejected, **rejected}
        staged = DatasetDir(str(tmp))
        # The Keras stack has no Petastorm: its splits record only the row-group counts.
        unischema = None if _keras_stack() else schema.prepared_schema(*shape)
        splits = _commit_splits(written, staged, unischema)
        ingested = sum(splits.values())
        _check_counts(plan, rejected, ingested, src)
        _write_quarantine(rejected, staged)
        result = IngestResult(
            output=str(dst),
            source=display_path(str(src)),
            format=fmt,
            files_seen=ingested + len(rejected) + plan.skipped,
            ingested=ingested,
            quarantined=len(rejected),
            skipped=plan.skipped,
            splits=splits,
            classes=_class_counts(plan, rejected),
            split_classes=_split_class_counts(plan, rejected, config.splits),
            label_names=plan.label_names,
            image_shape=shape,
            started_at=_iso(started),
            finished_at="",
        )
        result = replace(result, finished_at=_iso(time.time()))
        staged.write_manifest(result.manifest())
        staging.commit(tmp)
    log.info(
        "ingest: %d ingested %s, %d quarantined, %d skipped in %.1fs",
        result.ingested,
        result.splits,
        result.quarantined,
        result.skipped,
        time.time() - started,
    )
    return result


# --- planning, on the driver ---------------------------------------------------------------


def _folder_plan(src: Path, config: IngestConfig) -> _Plan:
    """Plan a class-per-folder tree from the driver's listing.

    Executors read the listed files by path rather than through Spark's ``binaryFile``
    source: the listing is needed anyway (Spark's scan silently drops zero-length,
    unreadable and hidden files, which must be counted), reading by path spares shipping
    every file's bytes from the JVM to Python, and a file that cannot be read (gone since
    the listing, say) is quarantined with the reason instead of failing the job.
    """
    import pandas as pd

    # Empty and unreadable files are quarantined by the executors that read them.
    listing = list_tree(src, sizes=False)
    # Names are display forms from here on (valid UTF-8 ones unchanged); only ``file``
    # keeps the raw bytes, to open the file by.
    label_names = sorted({display_path(rel.split("/")[0]) for rel in listing.images if "/" in rel})
    log.info(
        "ingest: %d image files in %d classes, %d other files skipped",
        len(listing.images),
        len(label_names),
        listing.skipped,
    )
    root = str(src).rstrip("/")  # strings, not Path objects: faster on a large tree
    shown = display_path(root)
    outside = "not inside a class folder (expected <source>/<class>/...)"
    rejected = {f"{shown}/{display_path(rel)}": outside for rel in listing.images if "/" not in rel}
    rels = [rel for rel in listing.images if "/" in rel]
    shown_rels = [display_path(rel) for rel in rels]
    names = [rel.split("/")[0] for rel in shown_rels]
    index = {name: i for i, name in enumerate(label_names)}
    records = pd.DataFrame(
        {
            "path": [f"{shown}/{rel}" for rel in shown_rels],
            "rel": shown_rels,
            "label": pd.array([index[name] for name in names], dtype="int32"),
            "label_name": names,
            "file": [os.fsencode(f"{root}/{rel}") for rel in rels],
        }
    )
    size, channels = config.image_size, config.channels

    def decode(batch: pd.DataFrame) -> list[tuple[bytes | None, str | None]]:
        return [_decode_file(file, size, channels) for file in batch.file]

    return _Plan(records, decode, rejected, listing.skipped, label_names)


def _array_plan(src: Path, fmt: str, config: IngestConfig) -> _Plan:
    """Plan an MNIST IDX or CIFAR-10 source, read on the driver.

    Each record counts as one file seen; its path is ``<file>#<index>``.
    """
    import pandas as pd

    parts: list[ArrayPart] = read_mnist_idx(src) if fmt == "mnist-idx" else read_cifar10(src)
    label_names = parts[0].label_names
    for part in parts[1:]:
        if part.label_names != label_names:
            raise SourceError(f"{src}: parts {parts[0].name} and {part.name} disagree on labels")
    shapes = {part.name: part.images.shape[1:] for part in parts}
    shown = display_path(str(src))
    records = pd.concat(
        pd.DataFrame(
            {
                "path": [f"{shown}/{part.name}#{i}" for i in range(len(part.labels))],
                "rel": [f"{part.name}/{i:06d}" for i in range(len(part.labels))],
                "label": part.labels.astype("int32"),
                "label_name": [label_names[int(k)] for k in part.labels],
                "raw": [img.tobytes() for img in part.images],
            }
        )
        for part in parts
    )
    records = records.sort_values("rel", ignore_index=True)
    log.info(
        "ingest: %d records in %d parts, %d classes", len(records), len(parts), len(label_names)
    )
    size, channels = config.image_size, config.channels

    def decode(batch: pd.DataFrame) -> list[tuple[bytes | None, str | None]]:
        pairs = zip(batch.rel, batch.raw, strict=True)
        return [
            _prepare_record(raw, shapes[rel.split("/")[0]], size, channels) for rel, raw in pairs
        ]

    return _Plan(records, decode, {}, 0, label_names)


def _task_count(spark: SparkSession, config: IngestConfig, records: int) -> int:
    """Spark tasks for decoding and writing ``records`` records.

    An explicit ``config.partitions`` is used as given. Otherwise one task per slot, and
    two per slot (for balance) only once each task still writes at least
    :data:`_ROW_GROUPS_PER_WRITER` full row groups: every task leaves one short row group
    per split, and Petastorm shards by row group, so more tasks mean more uneven shards.
    Never a count in between: 3 equal tasks on 2 slots run in two waves, the second with
    one slot idle (measured: 0.87x one process at 3,000 images, 1.2-1.35x with 2 tasks).
    """
    if config.partitions:
        return config.partitions
    slots = spark.sparkContext.defaultParallelism
    # How many tasks could each write that many; two per slot only if that many could.
    enough = records // (config.rows_per_row_group * _ROW_GROUPS_PER_WRITER)
    return max(1, min(records, 2 * slots if enough >= 2 * slots else slots))


def _splits_of(rels: Iterable[str], fractions: SplitConfig) -> list[str]:
    r"""The split of each record, by a stable hash of its relative path (``rel``).

    ``rel`` is the display form: for a valid UTF-8 name, its bytes; for another, the name
    with each undecodable byte as ``\xNN``. Either way the same file always hashes alike.
    The hash is XXH64 with Spark's seed, bucketed as Spark's
    ``pmod(xxhash64(rel), 10**6) / 10**6`` did when Spark computed it: datasets ingested
    before keep their splits (a test checks this against Spark's own function).
    """
    import xxhash

    # XXH64 is fixed by its specification: a file keeps its split forever, and adding
    # files never moves existing ones.
    train, train_val = fractions.train, fractions.train + fractions.val
    splits = []
    for rel in rels:
        digest = xxhash.xxh64_intdigest(rel.encode(), _SPLIT_HASH_SEED)
        signed = digest - (1 << 64) if digest >= 1 << 63 else digest  # Spark's long
        bucket = (signed % _SPLIT_BUCKETS) / float(_SPLIT_BUCKETS)
        splits.append("train" if bucket < train else "val" if bucket < train_val else "test")
    return splits


# --- the Spark job -------------------------------------------------------------------------


@dataclass(frozen=True)
class _TaskReport:
    """What a decoding task sends back to the driver, its job's whole (small) result.

    Attributes:
        written: The Parquet files it wrote.
        rejected: ``(path, reason)`` of every record it could not use.
    """

    written: list[_WrittenFile]
    rejected: list[tuple[str, str]]


@dataclass(frozen=True)
class _WrittenFile:
    """A Parquet file written by a task, as reported back to the driver.

    Attributes:
        split: The split whose dataset it belongs to.
        name: Its name inside the split's dataset (deterministic across runs).
        staged: Where the task attempt wrote it.
        rows: Rows in the file.
        row_groups: Row groups in the file (Petastorm's ``row groups per file`` metadata).
    """

    split: str
    name: str
    staged: str
    rows: int
    row_groups: int


def _decode_and_write(
    spark: SparkSession, plan: _Plan, config: IngestConfig, tmp: Path
) -> tuple[list[_WrittenFile], dict[str, str]]:
    """Decode every record and write every split, in one Spark job.

    Each task decodes its records and writes the good ones with pyarrow, in files of
    ``rows_per_row_group`` rows, under a staging folder of its own (``tmp/_staging``); it
    reports the files it wrote and the records it rejected as the job's (small) result.
    Writing in the Python worker spares moving every image back to the JVM, sorting it
    by split and re-encoding it there, which cost more than decoding. Only what successful
    tasks report is used: files of failed or duplicate attempts stay in staging.

    The records go to the tasks as an RDD of pandas tables, one per task, so nothing is
    shuffled. Not a DataFrame: Spark SQL planned the job, converted the Arrow batches to
    rows and back to Arrow for the Python worker, ~0.12 s of a 0.8 s ingest of 3,000
    images here (``dlpipe bench ingest``), and every task is Python anyway.

    Returns:
        The files written, and the records rejected on the executors (path to reason).
    """
    if plan.records.empty:
        return [], {}
    staging = tmp / Staging.ATTEMPTS_DIR
    staging.mkdir()
    tasks = _task_count(spark, config, len(plan.records))
    slices = _task_slices(_in_mixed_order(plan.records), tasks)
    log.info("ingest: decoding %d records in %d tasks", len(plan.records), len(slices))
    task = _decode_task(
        plan.decode,
        config.splits,
        str(staging),
        config.max_records_per_batch,
        config.rows_per_row_group,
        config.row_group_size_mb << 20,
    )
    reports = spark.sparkContext.parallelize(slices, len(slices)).mapPartitions(task).collect()
    written = [file for report in reports for file in report.written]
    rejected = {path: reason for report in reports for path, reason in report.rejected}
    return written, rejected


def _task_slices(records: pd.DataFrame, tasks: int) -> list[pd.DataFrame]:
    """``records`` cut into contiguous slices of ``ceil(len / tasks)`` rows, the last shorter.

    At most ``tasks`` slices, none empty; the same cut as the Arrow batches of one per task
    that Spark got before, so a source ingested again gives the same files.
    """
    size = max(1, -(-len(records) // tasks))
    return [records.iloc[start : start + size] for start in range(0, len(records), size)]


def _in_mixed_order(records: pd.DataFrame) -> pd.DataFrame:
    """The records in a fixed pseudo-random order (by a hash of the relative path).

    Rows are written in this order and Petastorm reads a row group as a unit: in listing
    order every row group held one or two classes, batches were nearly single-class and
    the digits' test accuracy fell from 99.5% to 95.7%. A hash keeps re-runs identical.
    """
    import numpy as np

    keys = np.fromiter(
        (zlib.crc32(rel.encode()) for rel in records["rel"]), dtype=np.uint32, count=len(records)
    )
    return records.iloc[np.argsort(keys, kind="stable")].reset_index(drop=True)


def _decode_task(
    decode: _BatchDecoder,
    fractions: SplitConfig,
    staging: str,
    batch_rows: int,
    rows_per_file: int,
    row_group_bytes: int,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[_TaskReport]]:
    """The function of each task: decode, split, write, and yield the task's report.

    A task's records arrive as one table; they are decoded ``batch_rows`` at a time, so
    that a task holds only one batch of decoded images besides what its writer buffers.
    """

    def decode_and_write(slices: Iterator[pd.DataFrame]) -> Iterator[_TaskReport]:
        from pipelines.host import settle_python_worker

        # Python workers are reused: without this each later task pays a full collection
        # of the imported modules and re-reads the zips on the path (~45 ms a task here).
        settle_python_worker()
        writer = _TaskWriter(staging, rows_per_file, row_group_bytes)
        rejected: list[tuple[str, str]] = []
        for records in slices:
            for start in range(0, len(records), batch_rows):
                batch = records.iloc[start : start + batch_rows]
                results = decode(batch)
                rejected += [
                    (path, reason)
                    for path, (_, reason) in zip(batch.path, results, strict=True)
                    if reason is not None
                ]
                decoded = batch.assign(
                    **{
                        schema.IMAGE: [image for image, _ in results],
                        schema.SPLIT: _splits_of(batch.rel, fractions),
                    }
                )
                good = decoded[schema.IMAGE].notna()
                writer.add(decoded.loc[good, list(schema.PREPARED_COLUMNS)])
        yield _TaskReport(writer.close(), rejected)

    return decode_and_write


# --- finishing, on the driver --------------------------------------------------------------


def _keras_stack() -> bool:
    from pipelines.stack import KERAS, current

    return current() == KERAS


def _commit_splits(
    written: list[_WrittenFile], staged: DatasetDir, unischema: Unischema | None
) -> dict[str, int]:
    """Move the reported files into the staged dataset's splits; make each a Petastorm dataset.

    Returns:
        Rows per split (``0`` for a split that received none and is not written).
    """
    counts = {}
    for split in schema.SPLITS:
        files = [file for file in written if file.split == split]
        counts[split] = sum(file.rows for file in files)
        if not files:
            log.warning("ingest: split %s is empty; not written", split)
            continue
        dataset = Path(staged.split(split))
        dataset.mkdir()
        for file in files:
            move_into(file.staged, dataset / file.name)
        _write_petastorm_metadata(dataset, unischema, {f.name: f.row_groups for f in files})
        log.info("ingest: wrote %s: %d rows in %d files", split, counts[split], len(files))
    # Whatever is left was written by failed or duplicate task attempts.
    remove(Path(staged.root) / Staging.ATTEMPTS_DIR)
    return counts


def _write_petastorm_metadata(
    dataset: Path, unischema: Unischema | None, row_groups: dict[str, int]
) -> None:
    """Write Petastorm's ``_common_metadata`` (Unischema, row groups per file) for one split.

    What ``materialize_dataset`` does after a Spark write, with the row-group counts the
    tasks reported instead of a Spark job that opens every file again. Without a Unischema
    (the Keras stack, no Petastorm) only the Arrow schema and Petastorm's row-group key are
    written: both stacks' readers read that (Petastorm's ``make_batch_reader`` infers the
    Unischema from the Arrow schema).
    """
    import pyarrow.parquet as pq

    if unischema is None:
        from pipelines.train.arrow_reader import ROW_GROUPS_PER_FILE_KEY

        counts = {ROW_GROUPS_PER_FILE_KEY: json.dumps(row_groups).encode()}
        arrow = pq.read_schema(dataset / sorted(row_groups)[0]).with_metadata(counts)
        pq.write_metadata(arrow, dataset / DatasetDir.PETASTORM_METADATA)
        return
    from petastorm.etl.dataset_metadata import (
        ROW_GROUPS_PER_FILE_KEY,
        _generate_unischema_metadata,
    )
    from petastorm.fs_utils import FilesystemResolver
    from petastorm.utils import add_to_dataset_metadata

    with warnings.catch_warnings():
        # Petastorm's local file system and legacy dataset are deprecated in pyarrow 14.
        warnings.simplefilter("ignore", FutureWarning)
        resolver = FilesystemResolver(to_url(dataset))
        parquet = pq.ParquetDataset(
            resolver.get_dataset_path(), filesystem=resolver.filesystem(), validate_schema=False
        )
        _generate_unischema_metadata(parquet, unischema)
        add_to_dataset_metadata(parquet, ROW_GROUPS_PER_FILE_KEY, json.dumps(row_groups))


def _check_counts(plan: _Plan, rejected: dict[str, str], ingested: int, src: Path) -> None:
    """Fail unless something was ingested and every planned record is accounted for."""
    if ingested == 0:
        raise IngestError(
            f"no decodable image in {src}: {len(rejected)} quarantined, "
            f"{plan.skipped} skipped as not images (check the source and --format)"
        )
    planned = len(plan.records) + len(plan.rejected)
    if ingested + len(rejected) != planned:
        # Not a user error: rows were lost or duplicated between the listing and the write.
        raise RuntimeError(
            f"ingest: {planned} records planned but {ingested} written + "
            f"{len(rejected)} quarantined"
        )


def _class_counts(plan: _Plan, rejected: dict[str, str]) -> dict[str, int]:
    """Ingested records per class, every class listed (``0`` when all its files failed)."""
    counts = Counter(
        name
        for path, name in zip(plan.records.path, plan.records.label_name, strict=True)
        if path not in rejected
    )
    return {name: counts.get(name, 0) for name in plan.label_names}


def _split_class_counts(
    plan: _Plan, rejected: dict[str, str], fractions: SplitConfig
) -> dict[str, dict[str, int]]:
    """Ingested records per class in each split (the split is a function of the path alone)."""
    records = plan.records
    splits = _splits_of(records.rel, fractions)
    counts: dict[str, Counter] = {split: Counter() for split in schema.SPLITS}
    for path, name, split in zip(records.path, records.label_name, splits, strict=True):
        if path not in rejected:
            counts[split][name] += 1
    return {
        split: {name: counts[split].get(name, 0) for name in plan.label_names}
        for split in schema.SPLITS
    }


def _write_quarantine(rejected: dict[str, str], staged: DatasetDir) -> None:
    """Write every rejected record with its reason (an empty table when none was rejected)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(rejected)
    table = pa.table(
        {"path": pa.array(paths, pa.string()), "reason": [rejected[p] for p in paths]},
        schema=pa.schema([("path", pa.string()), ("reason", pa.string())]),
    )
    folder = Path(staged.quarantine)
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-00000.parquet")


# --- per-record work, run on the executors -------------------------------------------------


class _TaskWriter:
    """Writes one task's decoded rows, split by split, as Parquet files of a fixed row count.

    Files go to a staging folder of this task attempt, named after the task's partition
    so that a re-run gives the same names; the driver moves them into place.
    """

    def __init__(self, staging: str, rows_per_file: int, row_group_bytes: int) -> None:
        from pyspark import TaskContext

        context = TaskContext.get()
        self._partition = context.partitionId()
        self._folder = f"{staging}/{context.taskAttemptId()}"
        # mkdir, not makedirs: an attempt still running after the driver removed the
        # staging folder fails here instead of writing into the finished dataset.
        os.mkdir(self._folder)
        self._rows_per_file = rows_per_file
        self._row_group_bytes = row_group_bytes
        self._pending: dict[str, list[pd.DataFrame]] = {}
        self._files = Counter[str]()  # files written per split, for their names
        self._written: list[_WrittenFile] = []

    def add(self, rows: pd.DataFrame) -> None:
        """Buffer rows; write a file whenever a split has ``rows_per_file`` of them."""
        import pandas as pd

        for split, part in rows.groupby(schema.SPLIT, sort=False):
            pending = self._pending.setdefault(split, [])
            pending.append(part)
            if sum(len(frame) for frame in pending) < self._rows_per_file:
                continue
            rows_of_split = pd.concat(pending, ignore_index=True)
            full = len(rows_of_split) - len(rows_of_split) % self._rows_per_file
            for start in range(0, full, self._rows_per_file):
                self._write(split, rows_of_split.iloc[start : start + self._rows_per_file])
            self._pending[split] = [rows_of_split.iloc[full:]]

    def close(self) -> list[_WrittenFile]:
        """Write the remaining (short) file of each split; return every file written."""
        import pandas as pd

        for split, pending in self._pending.items():
            rest = pd.concat(pending, ignore_index=True)
            if len(rest):
                self._write(split, rest)
        return self._written

    def _write(self, split: str, rows: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(
            rows, schema=schema.prepared_arrow_schema(), preserve_index=False
        )
        table = table.replace_schema_metadata()  # pandas' own metadata has no use here
        # One row group per file, unless that would exceed row_group_size_mb.
        rows_per_group = max(1, min(len(rows), self._row_group_bytes * len(rows) // table.nbytes))
        name = f"part-{self._partition:05d}-{self._files[split]:05d}.parquet"
        self._files[split] += 1
        staged = f"{self._folder}/{split}-{name}"
        footers: list[pq.FileMetaData] = []
        pq.write_table(table, staged, row_group_size=rows_per_group, metadata_collector=footers)
        self._written.append(
            _WrittenFile(split, name, staged, footers[0].num_rows, footers[0].num_row_groups)
        )


def _decode_file(path: bytes, size: int, channels: int) -> tuple[bytes | None, str | None]:
    """Read and decode one image file: ``(encoded image, None)`` or ``(None, reason)``.

    Args:
        path: The raw bytes of the file's path (any name opens, UTF-8 or not).
        size: Side of the square output.
        channels: 1 or 3.
    """
    content, unreadable = read_file(path)
    if content is None:
        return None, unreadable  # quarantined with the reason, not a failed job
    try:
        return schema.encode_cell(decode_image(content, size, channels)), None
    except ImageDecodeError as exc:
        return None, str(exc)


def _prepare_record(
    raw: bytes, shape: tuple[int, ...], size: int, channels: int
) -> tuple[bytes | None, str | None]:
    """Convert one array record to the target shape: ``(encoded image, reason)``."""
    import numpy as np

    try:
        array = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        return schema.encode_cell(prepare_array(array, size, channels)), None
    except (ValueError, ImageDecodeError) as exc:
        return None, f"cannot convert record: {exc}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
