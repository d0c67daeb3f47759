"""Batch scoring: new images to a scoring table, with the model the registry says is current.

In: a folder of images (any nesting) or a Parquet table of image bytes with a ``path``
column; a model URI (default ``models:/<model_name>@champion``). Out: one row per input
image in the scoring table (:data:`TABLE_COLUMNS`), partitioned by ``batch_id``, and a
:class:`ScoreResult` with the counts. Undecodable images get a row with ``error`` set and no
prediction; they never vanish. Re-running a batch replaces that batch's partition only.

The driver lists a folder source; the executors read the listed files by path (see
:mod:`pipelines.listing` for why not ``binaryFile``). The model is downloaded once on the
driver, shipped to the executors with the job, and loaded once per executor Python worker;
images flow to it in batches of ``score.arrow_batch_size`` rows, so wide image rows cannot
exhaust memory. The counts are read back from the written files' ``error`` column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import schema, tracking
from pipelines.config import Config
from pipelines.host import cores_per_process, limit_tf_threads, settle_python_worker
from pipelines.listing import display_path, list_tree, read_file
from pipelines.registry import ResolvedModel, resolve_model_uri
from pipelines.sources import SourceError
from pipelines.spark import driver_table
from pipelines.store import (
    ModelDir,
    ScoringTable,
    Store,
    is_uri,
    move_into,
    remove,
    replace_dir,
    to_url,
    write_atomic,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

#: The scoring table, in column order (the contract is :data:`pipelines.schema.SCORING_TABLE`).
TABLE_SCHEMA = schema.ddl(schema.SCORING_TABLE)
TABLE_COLUMNS = tuple(schema.SCORING_TABLE)
#: Images a scoring task handles at most (beyond one task per slot): bounds retry cost.
FILES_PER_TASK = 20_000


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring run wrote."""

    table: str
    format: str
    batch_id: str
    rows: int
    scored: int
    errors: int
    skipped: int
    model_uri: str
    model_name: str | None
    model_version: str | None
    classes_file: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def default_batch_id(source: str) -> str:
    """A stable batch id for a source: its folder name, reduced to ``[A-Za-z0-9._-]``."""
    name = Path(source.rstrip("/")).name or "batch"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "batch"


def score(
    spark: SparkSession,
    config: Config,
    source: str,
    table: str | None = None,
    model: str | None = None,
    batch_id: str | None = None,
    store: Store | None = None,
) -> ScoreResult:
    """Score every image of ``source`` into the scoring table.

    Args:
        spark: The session whose executors run the model.
        config: Resolved configuration (``score``, ``mlflow`` sections).
        source: A folder of images, or a Parquet table with ``path`` and image bytes.
        table: Table location (default: ``score.table`` or ``<work_dir>/tables/scores``).
        model: Model URI (default: ``score.model`` or the champion alias).
        batch_id: Partition to (re)write (default: derived from the source folder name).
        store: The MLflow stores, the model cache and the default table (default: the
            config's).

    Returns:
        Table location and counts.

    Raises:
        ModelNotFoundError: The model, alias or version does not exist.
        SourceError: The source is missing or empty, or a table lacks the needed columns.
    """
    from pyspark.sql import functions as F

    started = time.time()
    store = store or Store.of(config)
    resolved = resolve_model_uri(
        model or config.score.model,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )
    table = store.scoring_table(table)
    batch_id = batch_id or default_batch_id(source)
    log.info("score: %s with %s into %s (batch %s)", source, resolved.uri, table.location, batch_id)

    images, skipped = _read_source(spark, config, source)
    # models:/ URIs are downloaded through the registry.
    tracking.use_stores(store.tracking_uri, store.registry_uri)
    local_model = _local_model(resolved, store.model_cache)
    label_names = ModelDir(str(local_model)).label_names()
    model_name = _ship(spark, local_model)
    threads = cores_per_process(spark.sparkContext.defaultParallelism)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", config.score.arrow_batch_size)

    use_gpu = config.score.use_gpu

    def predict(batches):
        for batch in batches:
            yield _predict_batch(model_name, threads, batch, use_gpu)

    scored_at = datetime.fromtimestamp(started, tz=UTC).replace(tzinfo=None)
    predictions = images.mapInPandas(predict, schema.ddl(schema.SCORED_ROW))
    provenance = {
        "model_name": resolved.name,
        "model_version": resolved.version,
        "model_uri": resolved.uri,
        "scored_at": scored_at,
        "batch_id": batch_id,
    }
    rows = predictions.select(
        *schema.SCORED_ROW,
        *(
            F.lit(provenance[name]).cast(kind).alias(name)
            for name, kind in schema.SCORING_PROVENANCE.items()
        ),
    )
    _write(rows, table, batch_id)
    classes_file = _write_classes(spark, table, resolved, label_names)
    counts = _count(spark, table, batch_id)
    result = ScoreResult(
        table=table.location,
        format=table.format,
        batch_id=batch_id,
        rows=counts["rows"],
        scored=counts["scored"],
        errors=counts["errors"],
        skipped=skipped,
        model_uri=resolved.uri,
        model_name=resolved.name,
        model_version=resolved.version,
        classes_file=classes_file,
        seconds=round(time.time() - started, 1),
    )
    log.info(
        "score: %d rows (%d scored, %d errors) in %s, batch %s",
        result.rows, result.scored, result.errors, table.location, batch_id,
    )  # fmt: skip
    return result


def _read_source(spark: SparkSession, config: Config, source: str) -> tuple[DataFrame, int]:
    """The images to score, and how many other files were skipped.

    A table source gives ``(path, content, read_error)`` rows, ``read_error`` set where the
    bytes are null. A folder gives ``(path, file, read_error)`` rows from the driver's
    listing, ``read_error`` null: the executors read each file by ``file``, the raw bytes
    of the path, and record why one cannot be read or decoded. ``path`` is its
    display form (:func:`~pipelines.listing.display_path`): a name that is not valid UTF-8
    cannot cross Spark as a string, and is scored all the same.

    Raises:
        SourceError: The source is missing or holds no image file, or a table lacks the
            needed columns.
    """
    from pyspark.sql import functions as F

    src = Path(source).expanduser().resolve()
    if not src.exists():
        raise SourceError(f"source not found: {src}")
    if _is_table(src, config.score.source_format, config.score.image_column):
        frame = spark.read.parquet(to_url(src))
        column = config.score.image_column
        missing = {"path", column} - set(frame.columns)
        if missing:
            raise SourceError(
                f"{src}: table lacks column(s) {', '.join(sorted(missing))} "
                f"(need path and score.image_column={column})"
            )
        return (
            frame.select(
                F.col("path").cast("string"),
                F.col(column).alias("content"),
                F.when(F.col(column).isNull(), F.lit(f"no image bytes in column {column}"))
                .cast("string")
                .alias("read_error"),
            ),
            0,
        )

    import pandas as pd

    # An empty or unreadable file gets its error from the executor that reads it.
    listing = list_tree(src, sizes=False)
    if not listing.images:
        hint = ""
        if _first_parquet_file(src) is not None:
            hint = (
                f"; its Parquet files are no table with path and {config.score.image_column} "
                "columns (--source-format table reads them as one)"
            )
        raise SourceError(f"no image files in {src} ({listing.skipped} other files skipped){hint}")
    root = str(src)
    files = [f"{root}/{rel}" for rel in listing.images]
    paths = pd.DataFrame(
        {
            "path": [display_path(file) for file in files],
            "file": [os.fsencode(file) for file in files],
        }
    )
    log.info("score: %d image files, %d other files skipped", len(paths), listing.skipped)
    tasks = _task_count(spark, len(paths))
    frame = driver_table(spark, paths, "path string, file binary", tasks)
    # Null for every listed file: the executors record why one cannot be read or decoded.
    return frame.withColumn("read_error", F.lit(None).cast("string")), listing.skipped


def _local_model(model: ResolvedModel, cache: Path) -> Path:
    """The model's files on the driver, downloaded once per model version.

    A registered version (or a run's artifact) never changes, so a copy made once serves
    every later scoring job, and its directory name identifies it to the executors.
    """
    import mlflow

    key = f"{model.name}-v{model.version}" if model.name and model.version else model.uri
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:80]
    name += "-" + hashlib.sha256(model.uri.encode()).hexdigest()[:8]
    target = cache / name
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            downloaded = mlflow.artifacts.download_artifacts(model.uri, dst_path=str(staging))
            replace_dir(downloaded, target)
        finally:
            remove(staging)
    return target


def _ship(spark: SparkSession, model_dir: Path) -> str:
    """Ship the model folder with the session's jobs, once: each executor gets a local copy.

    Spark ships a folder only on a local master (``addFile(recursive=True)`` is refused on
    a cluster), so the folder goes as a zip archive, made once per model version beside
    it, which every executor unpacks into its working folder. Each Python worker loads it
    once and keeps it for later jobs (the name is unique per model version). Spark cannot
    replace a file once added (it warns), hence the check.

    Returns:
        The archive's name, which ``SparkFiles.get`` resolves to the unpacked model folder.
    """
    archive = model_dir.with_name(f"{model_dir.name}.zip")
    if not archive.is_file():
        staging = shutil.make_archive(
            str(model_dir.with_name(f".{archive.name}.tmp")), "zip", model_dir
        )
        move_into(staging, archive)
    # Spark's list by index: ``SparkContext.listArchives`` iterates it through py4j, whose
    # end of iteration is a converted Java exception (~40 ms of a scoring job's start).
    archives = spark.sparkContext._jsc.sc().listArchives()
    shipped = {archives.apply(i).rstrip("/").rsplit("/", 1)[-1] for i in range(archives.size())}
    if archive.name not in shipped:
        spark.sparkContext.addArchive(str(archive))
    return archive.name


def _task_count(spark: SparkSession, files: int) -> int:
    """Scoring tasks for ``files`` images: one wave over the task slots, more for big batches.

    One task per slot keeps the model loads and the files written to a minimum; past
    :data:`FILES_PER_TASK` images per task, more waves bound what a failed task redoes.
    """
    slots = spark.sparkContext.defaultParallelism
    return slots * max(1, math.ceil(files / (FILES_PER_TASK * slots)))


def _is_table(src: Path, source_format: str, image_column: str) -> bool:
    """Whether to read ``src`` as a Parquet table rather than list it as a folder of images.

    ``score.source_format`` decides, unless it is ``auto``: then ``src`` is a table when it
    is one by content, not by name: its first Parquet file (by name, at the top or in the
    ``key=value`` folders of a partitioned table) has a valid footer whose schema has
    ``path`` and ``image_column``. Only that footer is read (pyarrow), no data. A folder of
    images holding a stray ``_SUCCESS``, ``.DS_Store`` or a Parquet file of something else
    is a folder of images, the stray files skipped.
    """
    if source_format != "auto":
        return source_format == "table"
    first = _first_parquet_file(src)
    if first is None:
        return False
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(first).names)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        log.info("score: %s is not a table: %s is no Parquet file (%s)", src, first, exc)
        return False
    return {"path", image_column} <= names


def _first_parquet_file(src: Path) -> Path | None:
    """The first Parquet data file of ``src`` as Spark would find it, or None.

    Spark reads ``*.parquet`` files not hidden (``.``/``_``), at the top or, for a
    partitioned table, in ``key=value`` folders; a folder of images is not walked.
    """
    if src.is_file():
        return src if src.name.endswith(".parquet") else None
    try:
        entries = sorted(os.scandir(src), key=lambda entry: entry.name)
    except OSError:
        return None
    visible = [entry for entry in entries if not entry.name.startswith((".", "_"))]
    for entry in visible:
        if entry.name.endswith(".parquet") and entry.is_file():
            return Path(entry.path)
    for entry in visible:
        if "=" in entry.name and entry.is_dir():
            found = _first_parquet_file(Path(entry.path))
            if found is not None:
                return found
    return None


# The pyfunc model per executor Python worker: loaded once, reused for every batch.
_MODELS: dict[str, Any] = {}


def _predict_batch(model_name: str, threads: int, batch: Any, use_gpu: bool | str = False) -> Any:
    """Run the pyfunc model over one batch of ``(path, [content,] read_error)`` rows.

    Without a ``content`` column (a folder source) each file is read here, by the raw
    bytes of its path (``file``; ``path`` is only its display form). The
    first batch of a Python worker also sets its device (``score.use_gpu``): the GPU Spark
    assigned to the task (``spark.task.resource.gpu.amount``), else one by partition id.
    """
    import pandas as pd

    model = _MODELS.get(model_name)
    if model is None:
        import mlflow
        from pyspark import SparkFiles, TaskContext

        from pipelines.devices import pin_device

        # Before TensorFlow's first op, as thread pools: false hides the host's GPUs.
        task = TaskContext.get()
        gpu = task.resources().get("gpu") if task else None
        if gpu and gpu.addresses and gpu.addresses[0].isdigit():
            index = int(gpu.addresses[0])
        else:
            index = task.partitionId() if task else 0
        log.info("score: model on %s", pin_device(use_gpu, index, key="score.use_gpu"))
        # Share the host's cores between the Python workers instead of oversubscribing.
        limit_tf_threads(threads, 1)
        model = _MODELS[model_name] = mlflow.pyfunc.load_model(SparkFiles.get(model_name))
        settle_python_worker()
    errors = list(batch["read_error"])
    if "content" in batch.columns:
        contents = list(batch["content"])
    else:
        contents = [None] * len(batch)
        for position, file in enumerate(batch["file"]):
            if errors[position] is None:
                contents[position], errors[position] = read_file(file)
    readable = pd.isna(pd.Series(errors, dtype=object)).to_numpy()
    # Null in the table where there is no prediction (the model's pd.NA too), and in the
    # columns of other tasks than the model's.
    outputs = [name for name in schema.SCORED_ROW if name != schema.PATH]
    columns: dict[str, list[Any]] = {name: [None] * len(batch) for name in outputs}
    columns["error"] = errors
    if readable.any():
        images = [content for content, ok in zip(contents, readable, strict=True) if ok]
        output = model.predict(pd.DataFrame({"image": images}))
        positions = readable.nonzero()[0]
        for name, values in columns.items():
            if name not in output.columns:
                continue
            for position, value in zip(positions, output[name].tolist(), strict=True):
                values[position] = None if value is pd.NA else value
    return pd.DataFrame({schema.PATH: batch["path"].to_numpy(), **columns})


def _write(rows: DataFrame, table: ScoringTable, batch_id: str) -> None:
    """Replace this batch's partition only (dynamic partition overwrite / replaceWhere)."""
    writer = rows.write.mode("overwrite").partitionBy(ScoringTable.PARTITION_COLUMN)
    if table.format == "delta":
        # Delta replaces exactly the rows of this batch, atomically.
        writer = writer.format("delta").option(
            "replaceWhere", f"{ScoringTable.PARTITION_COLUMN} = '{batch_id}'"
        )
        if table.is_catalog_table:
            writer.saveAsTable(table.location)
        else:
            writer.save(table.location)
        return
    # Parquet: Spark stages the new partition and swaps only it in; other batches stay.
    writer.option("partitionOverwriteMode", "dynamic").parquet(table.url)


def _write_classes(
    spark: SparkSession, table: ScoringTable, model: ResolvedModel, label_names: list[str]
) -> str | None:
    """Record the class order of ``probabilities`` beside the table, per model version.

    A table given as a URI (``s3a://``, ``dbfs:/``, ``file://``) gets the file through
    Hadoop's file system, as Spark wrote the table.
    """
    if table.format != "parquet" or not label_names:
        return None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name or 'model'}-v{model.version or 'x'}")
    text = json.dumps({"model_uri": model.uri, "label_names": label_names}) + "\n"
    location = table.classes_file(stem)
    if is_uri(location):
        hadoop_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(location)
        fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        stream = fs.create(hadoop_path, True)
        try:
            stream.write(bytearray(text.encode()))
        finally:
            stream.close()
        return location
    write_atomic(location, text)
    return location


def _count(spark: SparkSession, table: ScoringTable, batch_id: str) -> dict[str, int]:
    """Count this batch's rows as written (read back, so the numbers are the table's).

    A local Parquet table is counted from its files' ``error`` column with pyarrow, on the
    driver: a Spark job over the table cost about a sixth of a small batch's scoring time.
    """
    folder = table.local_partition(batch_id)
    if folder is not None:
        import pyarrow.parquet as pq

        rows = errors = 0
        for part in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            column = pq.ParquetFile(part).read(columns=["error"]).column("error")
            rows += len(column)
            errors += len(column) - column.null_count
    else:
        from pyspark.sql import functions as F

        counted = (
            read_table(spark, table.location, table.format)
            .where(F.col(ScoringTable.PARTITION_COLUMN) == batch_id)
            .agg(F.count("*").alias("rows"), F.count("error").alias("errors"))
            .first()
        )
        rows, errors = counted["rows"], counted["errors"]
    return {"rows": rows, "errors": errors, "scored": rows - errors}


def read_table(spark: SparkSession, table: str, fmt: str = "parquet") -> DataFrame:
    """The scoring table as a DataFrame (for users and tests)."""
    where = ScoringTable(table, fmt)
    if fmt == "delta":
        return (
            spark.table(table) if where.is_catalog_table else spark.read.format("delta").load(table)
        )
    return spark.read.parquet(where.url)
