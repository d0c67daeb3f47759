"""Batch scoring: new images to a scoring table, with the model the registry says is current.

In: a folder of images (any nesting) or a Parquet table of image bytes with a ``path``
column; a model URI (default ``models:/<model_name>@champion``). Out: one row per input
image in the scoring table (:data:`TABLE_COLUMNS`), partitioned by ``batch_id``, and a
:class:`ScoreResult` with the counts and the batch's summary. Undecodable images get a row
with ``error`` set and no prediction; they never vanish.

Batches: each run writes one batch, by default named after its UTC start time
(:mod:`pipelines.batch_ids`), so that no run replaces another's rows; re-running a batch id
replaces that batch only. With ``score.only_new`` the files an earlier batch already scored
with the same model version are left out (an anti-join on the executors against the
table's identity columns; see :mod:`pipelines.score_table`).

The driver lists a folder source; the executors read the listed files by path (see
:mod:`pipelines.listing` for why not ``binaryFile``). The model is downloaded once on the
driver, shipped to the executors with the job, and loaded once per executor Python worker;
images flow to it in batches of ``score.arrow_batch_size`` rows, so wide image rows cannot
exhaust memory. The counts and the summary are read back from the written batch
(:mod:`pipelines.batch_summary`) and logged to MLflow as a run per batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import schema, tracking
from pipelines.batch_ids import resolve_batch_id
from pipelines.batch_summary import (
    BatchSummary,
    batch_groups,
    log_batch_summary,
    summarize,
    training_classes,
)
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.host import cores_per_process, limit_tf_threads, settle_python_worker
from pipelines.listing import display_path, list_tree, read_file
from pipelines.phases import PhaseClock
from pipelines.registry import ResolvedModel, download_model, resolve_model_uri
from pipelines.score_table import (
    batch_exists,
    read_table,
    record_classes,
    scored_identities,
    write_batch,
)
from pipelines.sources import SourceError
from pipelines.spark import driver_table, session_of
from pipelines.stack import STACK_TAG, check_model_stack
from pipelines.store import ModelDir, ScoringTable, Store, to_url

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

#: The scoring table, in column order (the contract is :data:`pipelines.schema.SCORING_TABLE`).
TABLE_SCHEMA = schema.ddl(schema.SCORING_TABLE)
TABLE_COLUMNS = tuple(schema.SCORING_TABLE)
#: What the executors return per image: the model's outputs, the top classes, the identity.
PREDICTED_ROW = {**schema.SCORED_ROW, **schema.TOP_K_OUTPUTS, **schema.FILE_IDENTITY}
#: Seconds tried for a generated batch id that no batch has yet.
GENERATED_ID_TRIES = 5
#: Images a scoring task handles at most (beyond one task per slot): bounds retry cost.
FILES_PER_TASK = 20_000

__all__ = ["TABLE_COLUMNS", "ScoreResult", "read_table", "score"]


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring run wrote.

    Attributes:
        table: The table's location.
        format: ``parquet`` or ``delta``.
        batch_id: The batch (partition) written.
        rows: Rows of the batch (one per file scored).
        scored: Rows with a prediction.
        errors: Rows with ``error`` set.
        skipped: Files of the source skipped as not images.
        skipped_already_scored: Images left out because an earlier batch scored them
            (``score.only_new``).
        model_uri: The model, pinned to a version.
        model_name: Its registered name (None outside the registry).
        model_version: Its version (None outside the registry).
        classes_file: The Parquet table's side file with the class order (None for Delta).
        class_order: Where the class order of ``probabilities`` is kept: that file, or
            ``TBLPROPERTIES <key>`` of a Delta table.
        summary: The batch's :class:`~pipelines.batch_summary.BatchSummary` as a dict.
        summary_run_id: The MLflow run holding the summary (None when not logged).
        seconds: Wall time.
        phases: Seconds by phase: ``resolve_model`` (the model found and downloaded),
            ``wait_spark`` (what was left of the Spark session's start, begun in the
            background), ``read_source`` (the source listed or opened, the batch id chosen),
            ``ship_model`` (its archive added to the session), ``only_new`` (the earlier
            batches read, with ``score.only_new``), ``score_job`` (the Spark job that
            predicts and writes the batch), ``summary`` (class order, the batch's summary
            read back and logged).
    """

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
    skipped_already_scored: int = 0
    class_order: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    summary_run_id: str | None = None
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def score(
    spark: SparkSession | Future[SparkSession],
    config: Config,
    source: str,
    table: str | None = None,
    model: str | None = None,
    batch_id: str | None = None,
    store: Store | None = None,
) -> ScoreResult:
    """Score the images of ``source`` into one batch of the scoring table.

    Args:
        spark: The session whose executors run the model, or its start
            (:func:`~pipelines.spark.start_in_background`), waited for once the model is
            resolved.
        config: Resolved configuration (``score``, ``mlflow`` sections).
        source: A folder of images, or a Parquet table with ``path`` and image bytes.
        table: Table location (default: ``score.table`` or ``<work_dir>/tables/scores``).
        model: Model URI (default: ``score.model`` or the champion alias).
        batch_id: The batch to (re)write, or a template with ``{date}``/``{datetime}``
            (default: the run's UTC date-time, which never replaces a batch).
        store: The MLflow stores, the model cache and the default table (default: the
            config's).

    Returns:
        Table location, counts and the batch's summary.

    Raises:
        ModelNotFoundError: The model, alias or version does not exist.
        SourceError: The source is missing or empty, or a table lacks the needed columns.
        BatchIdError: ``batch_id`` cannot name a batch.
        UserError: Every generated batch id tried is taken already.
    """
    started = time.time()
    clock = PhaseClock()
    store = store or Store.of(config)
    cfg = config.score
    resolved = resolve_model_uri(
        model or cfg.model,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )
    target = store.scoring_table(table)
    batch_id, generated = resolve_batch_id(batch_id, datetime.fromtimestamp(started, tz=UTC))
    # models:/ URIs are downloaded through the registry.
    tracking.use_stores(store.tracking_uri, store.registry_uri)
    model_dir = ModelDir(
        str(download_model(resolved, store.model_cache, store.tracking_uri, store.registry_uri))
    )
    # On the driver, before any executor loads it: a model of the other stack, in one line.
    check_model_stack(model_dir.meta().get(STACK_TAG), resolved.uri)
    label_names = model_dir.label_names()
    clock.lap("resolve_model")
    # All of the above needs no Spark: a session started in the background came up
    # meanwhile; what is left of its start is this phase.
    spark = session_of(spark)
    clock.lap("wait_spark")
    images, skipped, listed = _read_source(spark, config, source)
    if generated:
        batch_id = _unused_batch_id(spark, target, batch_id)
    log.info(
        "score: %s with %s into %s (batch %s)", source, resolved.uri, target.location, batch_id
    )
    clock.lap("read_source")
    archive = _ship(spark, model_dir)
    clock.lap("ship_model")
    threads = cores_per_process(spark.sparkContext.defaultParallelism)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", cfg.arrow_batch_size)

    already = 0
    persisted: DataFrame | None = None
    if cfg.only_new:
        persisted, remaining = _only_new(spark, images, target, batch_id, resolved, config)
        if listed is None:
            listed = images.count()
        already = listed - remaining
        images = persisted.repartition(_task_count(spark, remaining)) if remaining else None
        log.info("score: %d images new, %d scored before by this model", remaining, already)
        clock.lap("only_new")
    try:
        if images is not None:
            _score_into(
                spark, images, target, batch_id, resolved, label_names, archive, threads, config,
                started,
            )  # fmt: skip
            clock.lap("score_job")
            class_order = record_classes(spark, target, resolved, label_names)
            groups = batch_groups(spark, target, batch_id, cfg.low_confidence_below)
        else:
            class_order, groups = None, []  # nothing new: no batch is written
    finally:
        if persisted is not None:
            persisted.unpersist()
    training, note = training_classes(model_dir.run_id(), store.tracking_uri)
    summary = summarize(groups, training, cfg.low_confidence_below, [note] if note else [])
    summary_run_id = _log_summary(
        store, config, summary, source, target, batch_id, resolved, skipped, already, generated
    )
    result = ScoreResult(
        table=target.location,
        format=target.format,
        batch_id=batch_id,
        rows=summary.rows,
        scored=summary.scored,
        errors=summary.errors,
        skipped=skipped,
        skipped_already_scored=already,
        model_uri=resolved.uri,
        model_name=resolved.name,
        model_version=resolved.version,
        classes_file=class_order if target.format == "parquet" else None,
        class_order=class_order,
        summary=summary.to_dict(),
        summary_run_id=summary_run_id,
        seconds=round(time.time() - started, 1),
        phases={**clock.phases, "summary": round(clock.lap(), 2)},
    )
    log.info(
        "score: %d rows (%d scored, %d errors, %d scored before) in %s, batch %s",
        result.rows, result.scored, result.errors, already, target.location, batch_id,
    )  # fmt: skip
    return result


def _unused_batch_id(spark: SparkSession, table: ScoringTable, batch_id: str) -> str:
    """A generated batch id that no batch of the table has: the run's, or a second later.

    Two runs started within one second (a quick re-run by hand) would get the same id; the
    later one takes the next free second instead of replacing the other's batch.

    Raises:
        UserError: Still taken after a few seconds (a clock far behind the table's ids).
    """
    for _ in range(GENERATED_ID_TRIES):
        if not batch_exists(spark, table, batch_id):
            return batch_id
        time.sleep(1.0 - time.time() % 1.0)
        batch_id, _ = resolve_batch_id(None, datetime.now(tz=UTC))
    raise UserError(
        f"batch {batch_id} is already in {table.location}: is this host's clock behind? "
        "pass --batch-id to name the batch"
    )


def _score_into(
    spark: SparkSession,
    images: DataFrame,
    table: ScoringTable,
    batch_id: str,
    model: ResolvedModel,
    label_names: list[str],
    archive: str,
    threads: int,
    config: Config,
    started: float,
) -> None:
    """Predict every image of ``images`` on the executors and write them as the batch."""
    from pyspark.sql import functions as F

    cfg = config.score
    use_gpu, top_k, digest = cfg.use_gpu, cfg.top_k, cfg.identity == "sha256"

    def predict(batches):
        for batch in batches:
            yield _predict_batch(archive, threads, batch, use_gpu, label_names, top_k, digest)

    predictions = images.mapInPandas(predict, schema.ddl(PREDICTED_ROW))
    provenance = {
        "model_name": model.name,
        "model_version": model.version,
        "model_uri": model.uri,
        "scored_at": datetime.fromtimestamp(started, tz=UTC).replace(tzinfo=None),
        "batch_id": batch_id,
    }
    rows = predictions.select(
        *PREDICTED_ROW,
        *(
            F.lit(provenance[name]).cast(kind).alias(name)
            for name, kind in schema.SCORING_PROVENANCE.items()
        ),
    )
    write_batch(rows, table, batch_id)


def _log_summary(
    store: Store,
    config: Config,
    summary: BatchSummary,
    source: str,
    table: ScoringTable,
    batch_id: str,
    model: ResolvedModel,
    skipped: int,
    already: int,
    generated: bool,
) -> str | None:
    """Log the batch's summary as an MLflow run (``score.log_summary``); its id, or None.

    The batch is in the table by now: a tracking server that cannot be reached costs the
    summary's run (with a warning), not the batch.
    """
    if not config.score.log_summary:
        return None
    experiment = config.score.experiment or f"{config.mlflow.experiment}-scoring"
    tags = {
        "batch_id": batch_id,
        "batch_id_generated": str(generated).lower(),
        "table": table.location,
        "targetformat": table.format,
        "source": display_path(str(source)),
        "model_uri": model.uri,
        "model_name": model.name or "",
        "model_version": model.version or "",
    }
    counts = {"skipped_files": skipped, "skipped_already_scored": already}
    try:
        return log_batch_summary(store, experiment, summary, tags=tags, counts=counts)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("score: the batch summary was not logged to MLflow: %s", exc)
        return None


def _only_new(
    spark: SparkSession,
    images: DataFrame,
    table: ScoringTable,
    batch_id: str,
    model: ResolvedModel,
    config: Config,
) -> tuple[DataFrame, int]:
    """The images no earlier batch scored without error with this model, kept for the job.

    Each image's identity (:data:`~pipelines.schema.FILE_IDENTITY`) is taken on the
    executors, then anti-joined with the table's (a sort-merge join: neither side is
    gathered on the driver). The result is persisted, as the count and the scoring both
    read it.

    Returns:
        The new images with their identity, and how many they are.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    cfg = config.score
    digest = cfg.identity == "sha256"
    identified = _identify(images, digest)
    scored = scored_identities(spark, table, batch_id=batch_id, model=_same_model(model, cfg))
    if scored is not None:
        scored = scored.select(*(F.col(c).alias(f"scored_{c}") for c in scored.columns))
        if digest:
            same = F.col("file_sha256") == F.col("scored_file_sha256")
        else:
            same = (F.col("file_size") == F.col("scored_file_size")) & F.col(
                "file_modified"
            ).eqNullSafe(F.col("scored_file_modified"))
        condition = (F.col(schema.PATH) == F.col(f"scored_{schema.PATH}")) & same
        identified = identified.join(scored.hint("merge"), condition, "left_anti")
    new = identified.persist(StorageLevel.MEMORY_AND_DISK)
    return new, new.count()


def _same_model(model: ResolvedModel, cfg: Any) -> Column:
    """Which rows of the table count as scored by ``model`` (``score.rescore_on_new_version``)."""
    from pyspark.sql import functions as F

    if not model.name:  # outside the registry: the same URI only
        return F.col("model_uri") == model.uri
    same = F.col("model_name") == model.name
    return same & (F.col("model_version") == model.version) if cfg.rescore_on_new_version else same


def _identify(images: DataFrame, digest: bool) -> DataFrame:
    """``images`` with each one's identity: size, modification time, maybe a digest.

    A folder source's files are examined on the executors (one ``stat`` each, and a read
    for the digest); a table source's bytes give the size and digest (no time).
    """
    from pyspark.sql import functions as F

    if "content" in images.columns:
        return images.select(
            *images.columns,
            F.length("content").cast("bigint").alias("file_size"),
            F.lit(None).cast("timestamp").alias("file_modified"),
            (F.sha2("content", 256) if digest else F.lit(None).cast("string")).alias("file_sha256"),
        )

    def identify(batches):
        for batch in batches:
            yield batch.assign(**_identity_columns(list(batch["file"]), None, digest))

    columns = schema.ddl({"path": "string", "file": "binary", "read_error": "string"})
    return images.mapInPandas(identify, f"{columns}, {schema.ddl(schema.FILE_IDENTITY)}")


def _identity_columns(
    files: list[bytes | None], contents: list[bytes | None] | None, digest: bool
) -> dict[str, Any]:
    """The identity columns of a batch of files (``files`` None: a table source's rows).

    Size and modification time come from one ``stat`` (the time to the microsecond, as a
    Spark timestamp holds it); the digest from ``contents`` where given, else from reading
    the file. What cannot be examined is null: that file's read gives its error.
    """
    import pandas as pd

    sizes: list[int | None] = []
    modified: list[int | None] = []
    digests: list[str | None] = []
    for position, file in enumerate(files):
        content = contents[position] if contents is not None else None
        size = mtime = sha = None
        if file is not None:
            try:
                stat = os.stat(file)
                size, mtime = stat.st_size, stat.st_mtime_ns // 1000 * 1000
            except OSError:
                pass
        elif content is not None:
            size = len(content)
        if digest and content is not None:
            sha = hashlib.sha256(content).hexdigest()
        elif digest and file is not None and size is not None:
            sha = _file_sha256(file)
        sizes.append(size)
        modified.append(mtime)
        digests.append(sha)
    return {
        "file_size": pd.array(sizes, dtype="Int64"),
        "file_modified": pd.to_datetime(pd.array(modified, dtype="Int64"), unit="ns", utc=True),
        "file_sha256": pd.array(digests, dtype=object),
    }


def _file_sha256(file: bytes) -> str | None:
    """SHA-256 of a file's bytes, read a block at a time; None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _read_source(
    spark: SparkSession, config: Config, source: str
) -> tuple[DataFrame, int, int | None]:
    """The images to score, how many other files were skipped, and how many images (if known).

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
            None,
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
    return frame.withColumn("read_error", F.lit(None).cast("string")), listing.skipped, len(paths)


def _ship(spark: SparkSession, model_dir: ModelDir) -> str:
    """Ship the model folder with the session's jobs, once: each executor gets a local copy.

    Spark ships a folder only on a local master (``addFile(recursive=True)`` is refused on
    a cluster), so the folder goes as a zip archive, made once per model version beside
    it (:meth:`~pipelines.store.ModelDir.archive`: its own staging per job, an atomic
    publish, so concurrent jobs meeting a new version never share one), which every
    executor unpacks into its working folder. Each Python worker loads it once and keeps
    it for later jobs (the name is unique per model version). Spark cannot replace a file
    once added (it warns), hence the check.

    Returns:
        The archive's name, which ``SparkFiles.get`` resolves to the unpacked model folder.
    """
    archive = model_dir.archive()
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


def _predict_batch(
    model_name: str,
    threads: int,
    batch: Any,
    use_gpu: bool | str = False,
    label_names: list[str] | None = None,
    top_k: int = 0,
    digest: bool = False,
) -> Any:
    """Run the pyfunc model over one batch of ``(path, [content,] read_error)`` rows.

    Without a ``content`` column (a folder source) each file is read here, by the raw
    bytes of its path (``file``; ``path`` is only its display form). The
    first batch of a Python worker also sets its device (``score.use_gpu``): the GPU Spark
    assigned to the task (``spark.task.resource.gpu.amount``), else one by partition id.

    Returns:
        The :data:`PREDICTED_ROW` columns: the model's outputs, the ``top_k`` classes of a
        classifier (names from ``label_names``), and each file's identity (kept as given
        when the batch has it already, from ``score.only_new``'s check).
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
    files = list(batch["file"]) if "file" in batch.columns else None
    if "content" in batch.columns:
        contents = list(batch["content"])
    else:
        contents = [None] * len(batch)
        for position, file in enumerate(files or []):
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
    tops = top_classes(columns["probabilities"], label_names or [], top_k)
    if all(name in batch.columns for name in schema.FILE_IDENTITY):
        identity = {name: batch[name].array for name in schema.FILE_IDENTITY}
    else:
        identity = _identity_columns(files or [None] * len(batch), contents, digest)
    return pd.DataFrame({schema.PATH: batch["path"].to_numpy(), **columns, **tops, **identity})


def top_classes(
    probabilities: list[list[float] | None], label_names: list[str], k: int
) -> dict[str, list[Any]]:
    """The ``k`` most probable class names and probabilities of each row, most probable first.

    Ties keep the class order. Null for a row without probabilities, and for every row when
    ``k`` is 0 or the classes are unknown.
    """
    import numpy as np

    labels: list[list[str] | None] = [None] * len(probabilities)
    values: list[list[float] | None] = [None] * len(probabilities)
    if k > 0 and label_names:
        for row, scores in enumerate(probabilities):
            if scores is None:
                continue
            array = np.asarray(scores, dtype=np.float64)
            order = np.argsort(-array, kind="stable")[: min(k, len(array))]
            labels[row] = [label_names[i] for i in order]
            values[row] = array[order].tolist()
    return {"top_labels": labels, "top_probabilities": values}
