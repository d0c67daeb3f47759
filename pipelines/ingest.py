"""Ingest: image sources to a prepared Petastorm dataset, a quarantine and a manifest.

In: a source (a folder tree with one sub-folder per class, MNIST IDX files or CIFAR-10
python batches) and :class:`~pipelines.config.IngestConfig`.
Out, under the output directory (replaced atomically):

- ``split=train/``, ``split=val/``, ``split=test/``: one Petastorm dataset per split
  (``make_reader`` shards by row-group index over a whole dataset, so splits must not share
  one); ``spark.read.parquet(output)`` sees all three with ``split`` as a column;
- ``_quarantine/``: Parquet table of rejected files (``path``, ``reason``);
- ``_manifest.json``: counts, classes, label order, image shape, source, timestamps;

and a small :class:`IngestResult`. Decoding runs on the executors through the same pure
functions (:mod:`pipelines.images`) that serving uses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from pipelines import schema
from pipelines.config import IngestConfig
from pipelines.errors import UserError
from pipelines.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    is_image_path,
    prepare_array,
)
from pipelines.sources import SourceError, detect_format, read_cifar10, read_mnist_idx

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipelines.sources import ArrayPart

log = logging.getLogger(__name__)

#: Columns every source frame provides before splitting and labelling.
_DECODED = "rel string, label_name string, image binary, reason string"

#: A parallel writer per split only pays off when each writes many row groups.
_ROW_GROUPS_PER_WRITER = 8


class IngestError(UserError):
    """The source cannot be ingested (nothing decodable, output inside the source, ...)."""


@dataclass(frozen=True)
class IngestResult:
    """What an ingest produced; mirrors ``_manifest.json``."""

    output: str
    source: str
    format: str
    files_seen: int
    ingested: int
    quarantined: int
    skipped: int
    splits: dict[str, int]
    classes: dict[str, int]
    label_names: list[str]
    image_shape: list[int]
    started_at: str
    finished_at: str

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def ingest(
    spark: SparkSession, config: IngestConfig, source: str | Path, output: str | Path
) -> IngestResult:
    """Decode, split and write a source as a prepared dataset.

    Args:
        spark: The session whose executors decode the images.
        config: Target shape, split fractions, row-group sizing, format.
        source: Local (or FUSE-mounted, e.g. ``/dbfs/...``) path of the source.
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
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", config.max_records_per_batch)
    partitions = config.partitions or 2 * spark.sparkContext.defaultParallelism
    log.info("ingest: %s source %s -> %s", fmt, src, dst)

    if fmt == "folder":
        decoded, skipped, label_names = _folder_frame(spark, src, config, partitions)
    else:
        decoded, label_names = _array_frame(spark, src, fmt, config, partitions)
        skipped = 0

    from pyspark import StorageLevel

    labelled = _split_and_label(decoded, config, label_names).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = _count(labelled)
        ingested = sum(counts["splits"].values())
        if ingested == 0:
            raise IngestError(
                f"no decodable image in {src}: {counts['quarantined']} quarantined, "
                f"{skipped} skipped as not images (check the source and --format)"
            )
        shape = [config.image_size, config.image_size, config.channels]
        result = IngestResult(
            output=str(dst),
            source=str(src),
            format=fmt,
            files_seen=ingested + counts["quarantined"] + skipped,
            ingested=ingested,
            quarantined=counts["quarantined"],
            skipped=skipped,
            splits=counts["splits"],
            classes={name: counts["classes"].get(name, 0) for name in label_names},
            label_names=label_names,
            image_shape=shape,
            started_at=_iso(started),
            finished_at="",
        )
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_splits(labelled, tmp, config, counts["splits"], shape)
            _write_quarantine(labelled, tmp)
            result = _finish(result, tmp)
            _swap_into_place(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        labelled.unpersist()
    log.info(
        "ingest: %d ingested %s, %d quarantined, %d skipped in %.1fs",
        result.ingested,
        result.splits,
        result.quarantined,
        result.skipped,
        time.time() - started,
    )
    return result


def _folder_frame(
    spark: SparkSession, src: Path, config: IngestConfig, partitions: int
) -> tuple[DataFrame, int, list[str]]:
    """Decode a class-per-folder tree with ``binaryFile`` and a pandas UDF.

    The driver lists the tree first: Spark's file scan silently drops zero-length files
    and hidden (``.``/``_``) names, and those must be counted, not lost.

    Returns:
        The decoded frame, the number of files skipped, the sorted class names.
    """
    listing = _list_tree(src)
    label_names = sorted({rel.split("/")[0] for rel in listing.images if "/" in rel})
    log.info(
        "ingest: %d image files in %d classes, %d empty, %d other files skipped",
        len(listing.images),
        len(label_names),
        len(listing.empty),
        listing.skipped,
    )
    root, size, channels = str(src), config.image_size, config.channels

    def decode(batches):
        import pandas as pd

        for batch in batches:
            pairs = zip(batch.path, batch.content, strict=True)
            rows = [_decode_file(p, c, root, size, channels) for p, c in pairs]
            yield pd.DataFrame(rows, columns=["path", "rel", "label_name", "image", "reason"])

    spark.conf.set("spark.sql.files.minPartitionNum", partitions)
    decoded = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _image_glob())
        .load(_uri(src))
        .select("path", "content")
        .mapInPandas(decode, f"path string, {_DECODED}")
    )
    if listing.empty:
        empty = [
            (str(src / rel), rel, rel.split("/")[0] if "/" in rel else None, None, "empty file")
            for rel in listing.empty
        ]
        decoded = decoded.unionByName(spark.createDataFrame(empty, f"path string, {_DECODED}"))
    return decoded, listing.skipped, label_names


@dataclass(frozen=True)
class _Listing:
    images: list[str]  # relative paths of non-empty files with an image extension
    empty: list[str]  # relative paths of zero-length files with an image extension
    skipped: int  # other files, and hidden ones Spark never reads


def _list_tree(src: Path) -> _Listing:
    """Walk the source on the driver, classifying every file by name and size."""
    images, empty, skipped = [], [], 0
    for directory, dirs, files in os.walk(src, followlinks=True):
        hidden_dirs = [d for d in dirs if d.startswith((".", "_"))]
        for hidden in hidden_dirs:
            dirs.remove(hidden)
            skipped += sum(len(f) for _, _, f in os.walk(Path(directory, hidden)))
        for name in files:
            path = Path(directory, name)
            rel = path.relative_to(src).as_posix()
            if name.startswith((".", "_")) or not is_image_path(name):
                skipped += 1
            elif path.stat().st_size == 0:
                empty.append(rel)
            else:
                images.append(rel)
    if not images and not empty and not skipped:
        raise SourceError(f"source is empty: {src}")
    return _Listing(images, empty, skipped)


def _array_frame(
    spark: SparkSession, src: Path, fmt: str, config: IngestConfig, partitions: int
) -> tuple[DataFrame, list[str]]:
    """Read MNIST IDX or CIFAR-10 arrays on the driver; convert and resize on executors.

    Each record counts as one file seen; its path is ``<file>#<index>``.
    """
    import pandas as pd

    parts: list[ArrayPart] = read_mnist_idx(src) if fmt == "mnist-idx" else read_cifar10(src)
    label_names = parts[0].label_names
    for part in parts[1:]:
        if part.label_names != label_names:
            raise SourceError(f"{src}: parts {parts[0].name} and {part.name} disagree on labels")
    shapes = {part.name: part.images.shape[1:] for part in parts}
    frame = pd.concat(
        pd.DataFrame(
            {
                "path": [f"{src / part.name}#{i}" for i in range(len(part.labels))],
                "rel": [f"{part.name}/{i:06d}" for i in range(len(part.labels))],
                "label_name": [label_names[int(k)] for k in part.labels],
                "raw": [img.tobytes() for img in part.images],
            }
        )
        for part in parts
    )
    log.info("ingest: %d records in %d parts, %d classes", len(frame), len(parts), len(label_names))
    size, channels = config.image_size, config.channels

    def prepare(batches):
        for batch in batches:
            images, reasons = [], []
            for rel, raw in zip(batch.rel, batch.raw, strict=True):
                image, reason = _prepare_record(raw, shapes[rel.split("/")[0]], size, channels)
                images.append(image)
                reasons.append(reason)
            yield batch.drop(columns=["raw"]).assign(image=images, reason=reasons)

    records = spark.createDataFrame(frame).repartition(partitions)
    return records.mapInPandas(prepare, f"path string, {_DECODED}"), label_names


def _split_and_label(decoded: DataFrame, config: IngestConfig, label_names: list[str]) -> DataFrame:
    """Add ``split`` (by a stable hash of the relative path) and the ``label`` index."""
    from pyspark.sql import functions as F

    fractions = config.splits
    # xxhash64 is stable across runs and Spark versions: a file keeps its split forever,
    # and adding files never moves existing ones.
    bucket = F.pmod(F.xxhash64("rel"), F.lit(1_000_000)) / F.lit(1_000_000.0)
    split = (
        F.when(bucket < fractions.train, "train")
        .when(bucket < fractions.train + fractions.val, "val")
        .otherwise("test")
    )
    pairs = [x for i, name in enumerate(label_names) for x in (F.lit(name), F.lit(i))]
    label = F.create_map(*pairs)[F.col("label_name")] if pairs else F.lit(None)
    return decoded.withColumn(schema.SPLIT, split).withColumn(schema.LABEL, label.cast("int"))


def _count(labelled: DataFrame) -> dict[str, Any]:
    """Ingested rows per split and per class, and the number quarantined, in one job."""
    from pyspark.sql import functions as F

    rows = (
        labelled.groupBy(F.col("reason").isNull().alias("ok"), schema.SPLIT, "label_name")
        .count()
        .collect()
    )
    splits = {name: 0 for name in schema.SPLITS}
    classes: dict[str, int] = {}
    quarantined = 0
    for row in rows:
        if not row["ok"]:
            quarantined += row["count"]
            continue
        splits[row[schema.SPLIT]] += row["count"]
        classes[row["label_name"]] = classes.get(row["label_name"], 0) + row["count"]
    return {"splits": splits, "classes": classes, "quarantined": quarantined}


def _write_splits(
    labelled: DataFrame, tmp: Path, config: IngestConfig, counts: dict[str, int], shape: list[int]
) -> None:
    """Write each non-empty split as its own Petastorm dataset of even-sized row groups."""
    from petastorm.etl.dataset_metadata import materialize_dataset
    from pyspark.sql import functions as F

    unischema = schema.prepared_schema(*shape)
    columns = list(unischema.fields)
    good = labelled.where(F.col("reason").isNull())
    spark = labelled.sparkSession
    for split in schema.SPLITS:
        if counts[split] == 0:
            log.warning("ingest: split %s is empty; not written", split)
            continue
        url = _uri(Path(schema.split_path(str(tmp), split)))
        row_groups = math.ceil(counts[split] / config.rows_per_row_group)
        # One writer per split gives row groups of exactly rows_per_row_group rows (but the
        # last); several writers each leave one short row group, so use them only when big.
        writers = max(
            1, min(row_groups // _ROW_GROUPS_PER_WRITER, spark.sparkContext.defaultParallelism)
        )
        part = good.where(F.col(schema.SPLIT) == split).select(*columns)
        part = part.repartition(writers, schema.PATH) if writers > 1 else part.coalesce(1)
        log.info("ingest: writing %s: %d rows, ~%d row groups", split, counts[split], row_groups)
        with materialize_dataset(spark, url, unischema, config.row_group_size_mb):
            (
                part.sortWithinPartitions(schema.PATH)
                .write.mode("overwrite")
                .option("maxRecordsPerFile", config.rows_per_row_group)
                .parquet(url)
            )


def _write_quarantine(labelled: DataFrame, tmp: Path) -> None:
    """Write every rejected file with its reason (an empty table when none was rejected)."""
    from pyspark.sql import functions as F

    bad = labelled.where(F.col("reason").isNotNull()).select("path", "reason")
    bad.coalesce(1).sortWithinPartitions("path").write.mode("overwrite").parquet(
        _uri(tmp / schema.QUARANTINE_DIR)
    )


def _finish(result: IngestResult, tmp: Path) -> IngestResult:
    """Stamp the finish time and write the manifest into the staged dataset."""
    result = IngestResult(**{**result.to_dict(), "finished_at": _iso(time.time())})
    manifest = {**result.to_dict()}
    manifest.pop("output")
    (tmp / schema.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return result


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Replace ``dst`` with the staged ``tmp``: the old dataset is kept until the new is in."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


# --- per-record work, run on the executors -------------------------------------------------


def _decode_file(
    path: str, content: bytes, root: str, size: int, channels: int
) -> tuple[str, str, str | None, bytes | None, str | None]:
    """Decode one file: ``(path, rel, label_name, encoded image, reason)``, reason on failure."""
    rel = _relative(path, root)
    parts = rel.split("/")
    local = unquote(urlparse(path).path)
    if len(parts) < 2:
        return local, rel, None, None, "not inside a class folder (expected <source>/<class>/...)"
    try:
        image = _encode(decode_image(content, size, channels))
    except ImageDecodeError as exc:
        return local, rel, parts[0], None, str(exc)
    return local, rel, parts[0], image, None


def _prepare_record(
    raw: bytes, shape: tuple[int, ...], size: int, channels: int
) -> tuple[bytes | None, str | None]:
    """Convert one array record to the target shape: ``(encoded image, reason)``."""
    import numpy as np

    try:
        array = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        return _encode(prepare_array(array, size, channels)), None
    except (ValueError, ImageDecodeError) as exc:
        return None, f"cannot convert record: {exc}"


def _encode(array) -> bytes:
    """Encode as Petastorm's ``NdarrayCodec`` does (``np.save``), readable by plain Petastorm."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _relative(path: str, root: str) -> str:
    """Path of a Spark-listed file (a URI, possibly %-encoded) relative to the source root."""
    local = unquote(urlparse(path).path)
    return local[len(root) :].lstrip("/") if local.startswith(root) else local


def _image_glob() -> str:
    """A case-insensitive Hadoop glob matching the image extensions (``*.{[pP][nN][gG],...}``)."""
    classes = [
        "".join(f"[{c.lower()}{c.upper()}]" for c in ext[1:]) for ext in sorted(IMAGE_EXTENSIONS)
    ]
    return "*.{" + ",".join(classes) + "}"


def _uri(path: Path) -> str:
    # Not Path.as_uri(): it %-encodes "=" in "split=train", which Spark then keeps literally.
    return f"file://{path.resolve()}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")
