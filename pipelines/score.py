"""Batch scoring: new images to a scoring table, with the model the registry says is current.

In: a folder of images (any nesting) or a Parquet table of image bytes with a ``path``
column; a model URI (default ``models:/<model_name>@champion``). Out: one row per input
image in the scoring table (:data:`TABLE_COLUMNS`), partitioned by ``batch_id``, and a
:class:`ScoreResult` with the counts. Undecodable images get a row with ``error`` set and no
prediction; they never vanish. Re-running a batch replaces that batch's partition only.

The model is downloaded once on the driver, shipped to the executors with the job, and
loaded once per executor Python worker; images flow to it in Arrow batches of
``score.arrow_batch_size`` rows, so wide image rows cannot exhaust memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config import Config
from pipelines.host import cores_per_process, limit_tf_threads
from pipelines.listing import file_uri, image_glob, list_tree
from pipelines.registry import ResolvedModel, resolve_model_uri
from pipelines.sources import SourceError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

#: The scoring table, in column order.
TABLE_SCHEMA = (
    "path string, predicted_label string, probability double, probabilities array<double>, "
    "error string, model_name string, model_version string, model_uri string, "
    "scored_at timestamp, batch_id string"
)
TABLE_COLUMNS = tuple(part.split()[0] for part in TABLE_SCHEMA.split(", "))
#: Images a scoring task handles at most (beyond two tasks per slot): bounds retry cost.
FILES_PER_TASK = 20_000
#: Sidecar with the class order of ``probabilities``, one file per model version.
CLASSES_DIR = "_classes"


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
) -> ScoreResult:
    """Score every image of ``source`` into the scoring table.

    Args:
        spark: The session whose executors run the model.
        config: Resolved configuration (``score``, ``mlflow`` sections).
        source: A folder of images, or a Parquet table with ``path`` and image bytes.
        table: Table location (default: ``score.table`` or ``<work_dir>/tables/scores``).
        model: Model URI (default: ``score.model`` or the champion alias).
        batch_id: Partition to (re)write (default: derived from the source folder name).

    Returns:
        Table location and counts.

    Raises:
        ModelNotFoundError: The model, alias or version does not exist.
        SourceError: The source is missing or empty, or a table lacks the needed columns.
    """
    import mlflow
    from pyspark.sql import functions as F

    started = time.time()
    resolved = resolve_model_uri(
        model or config.score.model,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=config.tracking_uri,
    )
    table = table or config.table_path
    batch_id = batch_id or default_batch_id(source)
    log.info("score: %s with %s into %s (batch %s)", source, resolved.uri, table, batch_id)

    images, skipped, images_listed = _read_source(spark, config, source)
    mlflow.set_tracking_uri(config.tracking_uri)
    local_model = _local_model(resolved, config.work_path / "cache" / "models")
    label_names = _label_names(local_model)
    # Ship the model with the job: each executor gets a local copy, loaded once per Python
    # worker and kept there for later jobs (the name is unique per model version).
    spark.sparkContext.addFile(str(local_model), recursive=True)
    model_name = local_model.name
    threads = cores_per_process(spark.sparkContext.defaultParallelism)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", config.score.arrow_batch_size)

    def predict(batches):
        for batch in batches:
            yield _predict_batch(model_name, threads, batch)

    scored_at = datetime.fromtimestamp(started, tz=UTC).replace(tzinfo=None)
    predictions = images.mapInPandas(
        predict,
        "path string, predicted_label string, probability double, "
        "probabilities array<double>, error string",
    )
    rows = predictions.select(
        "path",
        "predicted_label",
        "probability",
        "probabilities",
        "error",
        F.lit(resolved.name).cast("string").alias("model_name"),
        F.lit(resolved.version).cast("string").alias("model_version"),
        F.lit(resolved.uri).alias("model_uri"),
        F.lit(scored_at).cast("timestamp").alias("scored_at"),
        F.lit(batch_id).alias("batch_id"),
    )
    with _scan_tasks(spark, _task_count(spark, images_listed)):
        _write(rows, table, config.score.format, batch_id)
    classes_file = _write_classes(table, resolved, label_names, config.score.format)
    counts = _count(spark, table, batch_id, config.score.format)
    result = ScoreResult(
        table=table,
        format=config.score.format,
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
        result.rows, result.scored, result.errors, table, batch_id,
    )  # fmt: skip
    return result


def _read_source(
    spark: SparkSession, config: Config, source: str
) -> tuple[DataFrame, int, int | None]:
    """``(path, content, read_error)`` rows of every image, and two counts.

    ``read_error`` is set (and ``content`` empty or null) for a file that cannot be read.
    The counts: other files skipped, and image files listed (``None`` for a table source).
    """
    from pyspark.sql import functions as F

    src = Path(source).expanduser().resolve()
    if not src.exists():
        raise SourceError(f"source not found: {src}")
    if _is_table(src):
        frame = spark.read.parquet(file_uri(src))
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
            None,
        )

    listing = list_tree(src)
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", image_glob())
        .load(file_uri(src))
        .select(F.col("path"), F.col("content"))
    )
    files = files.withColumn("path", _local_path_column(F.col("path")))
    files = files.withColumn("read_error", F.lit(None).cast("string"))
    # Spark's scan drops zero-length files and skips broken links; they still get a row.
    missed = [(str(src / rel), b"", None) for rel in listing.empty]
    missed += [(str(src / rel), None, reason) for rel, reason in listing.unreadable.items()]
    if missed:
        schema = "path string, content binary, read_error string"
        files = files.unionByName(spark.createDataFrame(missed, schema))
    log.info(
        "score: %d image files (%d empty), %d other files skipped",
        len(listing.images) + len(listing.empty), len(listing.empty), listing.skipped,
    )  # fmt: skip
    return files, listing.skipped, len(listing.images)


def _local_path_column(uri: Column) -> Column:
    """``file:/data/a b%.png`` -> ``/data/a b%.png``, in SQL (a Python UDF costs a worker).

    ``binaryFile`` paths are Hadoop paths, not URIs: nothing in them is percent-encoded.
    """
    from pyspark.sql import functions as F

    return F.regexp_replace(uri, "^file:(//)?", "")


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
            Path(downloaded).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _task_count(spark: SparkSession, files: int | None) -> int | None:
    """Scan tasks for ``files`` images: one wave over the task slots, more for big batches."""
    if not files:
        return None
    slots = spark.sparkContext.defaultParallelism
    return slots * max(1, math.ceil(files / (FILES_PER_TASK * slots)))


@contextmanager
def _scan_tasks(spark: SparkSession, tasks: int | None) -> Iterator[None]:
    """Plan the ``binaryFile`` scan as ``tasks`` even partitions, for this job only.

    Left alone, Spark caps a scan partition at 128 MB counting 4 MB per file: 5,000 small
    images became 3 partitions on 2 slots, two waves with one slot idle in the second (a
    third of the scoring time). Without the cap, ``minPartitionNum`` splits files evenly.
    """
    settings = {
        "spark.sql.files.minPartitionNum": str(tasks),
        "spark.sql.files.maxPartitionBytes": str(1 << 40),
    }
    previous = {key: spark.conf.get(key, None) for key in settings}
    if tasks:
        for key, value in settings.items():
            spark.conf.set(key, value)
    try:
        yield
    finally:
        if tasks:
            for key, value in previous.items():
                if value is None:
                    spark.conf.unset(key)
                else:
                    spark.conf.set(key, value)


def _is_table(src: Path) -> bool:
    """A Parquet table (what Spark wrote) rather than a folder of images."""
    return src.is_dir() and (any(src.glob("*.parquet")) or (src / "_SUCCESS").exists())


# The pyfunc model per executor Python worker: loaded once, reused for every batch.
_MODELS: dict[str, Any] = {}


def _predict_batch(model_name: str, threads: int, batch: Any) -> Any:
    """Run the pyfunc model over one Arrow batch of ``(path, content, read_error)`` rows."""
    import pandas as pd

    model = _MODELS.get(model_name)
    if model is None:
        import mlflow
        from pyspark import SparkFiles

        # Share the host's cores between the Python workers instead of oversubscribing.
        limit_tf_threads(threads, 1)
        model = _MODELS[model_name] = mlflow.pyfunc.load_model(SparkFiles.get(model_name))
    readable = batch["read_error"].isna().to_numpy()
    columns = {
        "predicted_label": [None] * len(batch),
        "probability": [float("nan")] * len(batch),
        "probabilities": [None] * len(batch),
        "error": list(batch["read_error"]),
    }
    if readable.any():
        output = model.predict(pd.DataFrame({"image": list(batch["content"][readable])}))
        positions = readable.nonzero()[0]
        for name, values in columns.items():
            for position, value in zip(positions, output[name].tolist(), strict=True):
                values[position] = value
    return pd.DataFrame({"path": batch["path"].to_numpy(), **columns})


def _label_names(model_dir: Path) -> list[str]:
    labels = next(model_dir.rglob("labels.json"), None)
    return json.loads(labels.read_text())["label_names"] if labels else []


def _write(rows: DataFrame, table: str, fmt: str, batch_id: str) -> None:
    """Replace this batch's partition only (dynamic partition overwrite / replaceWhere)."""
    writer = rows.write.mode("overwrite").partitionBy("batch_id")
    if fmt == "delta":
        # Delta replaces exactly the rows of this batch, atomically.
        writer = writer.format("delta").option("replaceWhere", f"batch_id = '{batch_id}'")
        if "/" in table:
            writer.save(table)
        else:
            writer.saveAsTable(table)
        return
    # Parquet: Spark stages the new partition and swaps only it in; other batches stay.
    writer.option("partitionOverwriteMode", "dynamic").parquet(_table_uri(table))


def _write_classes(
    table: str, model: ResolvedModel, label_names: list[str], fmt: str
) -> str | None:
    """Record the class order of ``probabilities`` beside the table, per model version."""
    if fmt != "parquet" or not label_names:
        return None
    folder = Path(table) / CLASSES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name or 'model'}-v{model.version or 'x'}")
    path = folder / f"{stem}.json"
    path.write_text(json.dumps({"model_uri": model.uri, "label_names": label_names}) + "\n")
    return str(path)


def _count(spark: SparkSession, table: str, batch_id: str, fmt: str) -> dict[str, int]:
    """Count this batch's rows as written (read back, so the numbers are the table's)."""
    from pyspark.sql import functions as F

    row = (
        read_table(spark, table, fmt)
        .where(F.col("batch_id") == batch_id)
        .agg(F.count("*").alias("rows"), F.count("error").alias("errors"))
        .first()
    )
    return {"rows": row["rows"], "errors": row["errors"], "scored": row["rows"] - row["errors"]}


def _table_uri(table: str) -> str:
    if "://" in table or table.startswith(("dbfs:", "s3", "abfss:", "gs:")):
        return table
    return file_uri(Path(table))


def read_table(spark: SparkSession, table: str, fmt: str = "parquet") -> DataFrame:
    """The scoring table as a DataFrame (for users and tests)."""
    if fmt == "delta":
        return spark.read.format("delta").load(table) if "/" in table else spark.table(table)
    return spark.read.parquet(_table_uri(table))
