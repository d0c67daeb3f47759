"""The only SparkSession builder.

In: :class:`~pipelines.config.SparkConfig`. Out: a SparkSession. With ``master: null`` the
session attaches to whatever the environment provides (``spark-submit --master``, a
Databricks cluster); otherwise the configured master (``local[2]`` by default) is used.
:func:`start_in_background` starts it while the caller does other work. Also
:func:`driver_table`, how a job spreads a table built on the driver over its tasks,
:func:`local_slots` / :func:`task_slots`, how many tasks can run at once (one per Horovod rank),
and :func:`storage_errors`, the one place where Spark's failure to read or write a stage's
location becomes a one-line :class:`~pipelines.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import jvm_archive
from pipelines.config import SparkConfig
from pipelines.errors import StorageError, UserError
from pipelines.store import local_path

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

#: MLflow's switch for its usage telemetry, passed on to the executors when set.
_TELEMETRY = "MLFLOW_DISABLE_TELEMETRY"
# Quiet, laptop-friendly defaults; anything in spark.conf overrides them.
_LOCAL_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    # Tables of image bytes (a scoring source) often come as many small Parquet files:
    # pack them into fewer, larger tasks (Spark's default counts 4 MB per file opened).
    "spark.sql.files.openCostInBytes": str(64 * 1024),
}
# A local master runs every task in this one JVM, on the host's few cores, where the C2
# JIT compiler kept burning 0.3-1 s of CPU per scoring job (measured per thread, still
# after a dozen jobs) beside the Python workers doing the real work: 10-15% of the job's
# time on 2 cores. C1 alone compiles far less, and the JVM's own share of these jobs is
# small. Only for a local master, and only unless spark.conf sets its own options; with
# the class archive of pipelines.jvm_archive added.
_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
_LOCAL_MASTER_DEFAULTS = {_JAVA_OPTIONS: "-XX:TieredStopAtLevel=1"}


#: Attempts a local master gives each task when training is elastic. Spark's ``local[N]``
#: tries a task once, so the Spark task of a lost Horovod rank would fail the whole job;
#: with retries Horovod starts a new rank in the task's next attempt. Each lost rank uses
#: one attempt of its task (a cluster's ``spark.task.maxFailures`` is 4 by default too).
ELASTIC_TASK_ATTEMPTS = 4


def with_task_attempts(master: str, attempts: int) -> str:
    """A local master URL whose tasks are tried ``attempts`` times (``local[N]`` -> ``local[N,F]``).

    A URL that sets its own attempts, or is no local master, is returned unchanged.
    """
    match = re.fullmatch(r"local(?:\[(\*|\d+)\])?", master.strip())
    if not match:
        return master
    return f"local[{match.group(1) or 1},{attempts}]"


def local_task_attempts(master: str) -> int | None:
    """How often a local master tries a task (``local[N,F]``: F, else 1); None for a cluster."""
    match = re.fullmatch(r"local(?:\[(?:\*|\d+)(?:,\s*(\d+))?\])?", (master or "").strip())
    if not match:
        return None
    return int(match.group(1) or 1)


def get_spark(config: SparkConfig, task_attempts: int | None = None) -> SparkSession:
    """Return the active SparkSession, or build one from ``config``.

    Args:
        config: Master, application name and extra properties.
        task_attempts: A local master that tries each task once tries it this often
            instead (:data:`ELASTIC_TASK_ATTEMPTS` for elastic training); None: as set.

    Returns:
        A SparkSession whose executors run this interpreter's Python when local.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    master = config.master or "local[*]"  # PySpark's own default outside spark-submit
    if not config.master and os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Under spark-submit its JVM is up and holds the master (connecting starts nothing;
        # outside it, starting the JVM here would lose the builder's JVM options).
        SparkContext._ensure_initialized()
        master = SparkConf().get("spark.master", "")
    local = master.startswith("local")
    if local:
        # Executors of a local master must run this interpreter (and so the same venv). On
        # a cluster this path may not exist on the nodes: spark.pyspark.python says there.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(config.app_name)
    if config.master:
        attempts = task_attempts if task_attempts else 1
        builder = builder.master(with_task_attempts(config.master, attempts))
    defaults = {**_LOCAL_DEFAULTS, **(_LOCAL_MASTER_DEFAULTS if local else {})}
    if _TELEMETRY in os.environ:  # the driver's mlflow.telemetry holds for the executors
        defaults[f"spark.executorEnv.{_TELEMETRY}"] = os.environ[_TELEMETRY]
    settings = {**defaults, **config.conf}
    archive = ""
    if local and _JAVA_OPTIONS not in config.conf and SparkContext._gateway is None:
        # This call starts the JVM (none under spark-submit): with the archive of its classes.
        archive = jvm_archive.java_options(settings)
    for key, value in settings.items():
        builder = builder.config(key, value)
    if archive:
        builder = builder.config(_JAVA_OPTIONS, f"{settings[_JAVA_OPTIONS]} {archive}")
    try:
        spark = builder.getOrCreate()
    except Exception:
        if not (archive and jvm_archive.discard(archive)):
            raise
        spark = builder.config(_JAVA_OPTIONS, settings[_JAVA_OPTIONS]).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def start_in_background(start: Callable[[], SparkSession]) -> Future[SparkSession]:
    """Run ``start`` (a session's start) in a thread; its session or error is the future's.

    A session's start is mostly waiting: for the JVM to come up, then for the executors'
    first Python worker (the preflight job), about 4 s on a local master. Meanwhile this
    interpreter can do its own start-up (importing MLflow, opening its store, resolving a
    model): that work and the JVM's run on two cores at once. :func:`session_of` waits for
    the session where the caller first needs it. The thread is a daemon: a command that
    fails before it needs Spark exits without waiting for the JVM (which ends with the
    process that started it).
    """
    future: Future[SparkSession] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(start())
        except BaseException as exc:  # the caller's session_of raises it, in its own thread
            future.set_exception(exc)

    threading.Thread(target=run, name="dlpipe-spark-start", daemon=True).start()
    return future


def session_of(spark: SparkSession | Future[SparkSession]) -> SparkSession:
    """The session itself: ``spark``, or what :func:`start_in_background` started, once up.

    PySpark cancels the running jobs on Ctrl-C only when the session was created in the
    main thread; for one started in the background the same handler is installed here
    (unless the program has its own).

    Raises:
        Exception: Whatever starting the session raised.
    """
    if not isinstance(spark, Future):
        return spark
    session = spark.result()
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        context = session.sparkContext

        def cancel_jobs(signum: int, frame: object) -> None:
            context.cancelAllJobs()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, cancel_jobs)
    return session


def local_slots(master: str | None) -> int | None:
    """Task slots of a local master URL (``local``, ``local[N]``, ``local[N,F]``, ``local[*]``).

    Returns:
        The number of slots, or ``None`` for any other master (known only once it runs).
    """
    match = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", (master or "").strip())
    if not match:
        return None
    count = match.group(1)
    return (os.cpu_count() or 1) if count == "*" else int(count or 1)


def task_slots(spark: SparkSession, wanted: int, timeout_s: float) -> int:
    """Concurrent task slots of the session's executors, waiting up to ``timeout_s`` for ``wanted``.

    A cluster's executors register with the driver a while after the application starts
    (and ``defaultParallelism`` says 2 before any has), so the count is polled. Horovod
    on Spark needs a slot per rank at once: with fewer, the ranks that got a slot wait
    for the others until Horovod's start timeout, the classic hang this check replaces.

    Returns:
        The slots offered when ``wanted`` were reached, or after the timeout.
    """
    jsc = spark.sparkContext._jsc.sc()
    # Spark's own count for barrier stages (executors x tasks each), per resource profile.
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    deadline = time.monotonic() + timeout_s
    while True:
        slots = int(jsc.maxNumConcurrentTasks(profile))
        if slots >= wanted or time.monotonic() >= deadline:
            return slots
        time.sleep(1.0)


def driver_table(spark: SparkSession, rows: pd.DataFrame, schema: str, tasks: int) -> DataFrame:
    """A DataFrame of ``rows`` (built on the driver, e.g. from a listing) in ``tasks`` partitions.

    A pandas table enters Spark as Arrow batches of ``spark.sql.execution.arrow.
    maxRecordsPerBatch`` rows. Below ``spark.sql.execution.arrow.localRelationThreshold``
    (48 MB) Spark turns them into rows on the driver, one thread, and deals them to
    ``defaultParallelism`` slices: more tasks than slots then cost a shuffle, and the
    driver converts every row before the first task starts. So the table is cut here into
    one batch per task and sent as an RDD of batches (threshold 0), which the tasks
    themselves convert: ``tasks`` partitions, no shuffle (measured when ingest still used
    it, on 30,000 listed files: time to the first task 0.38 s -> 0.18 s). Both settings
    are restored for the job's own batches.

    Args:
        spark: The session.
        rows: The table.
        schema: Its Spark DDL schema.
        tasks: Partitions wanted (fewer if there are fewer rows).

    Returns:
        The DataFrame, in ``tasks`` partitions (one per batch).
    """
    settings = {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(max(1, -(-len(rows) // tasks))),
        "spark.sql.execution.arrow.localRelationThreshold": "0",
    }
    previous = {key: spark.conf.get(key) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        return spark.createDataFrame(rows, schema)
    finally:
        for key, value in previous.items():
            spark.conf.set(key, value)


@dataclass(frozen=True)
class Access:
    """A location a stage reads or writes, and what to do when that fails.

    Attributes:
        action: What the stage does with it, as the error says it: ``cannot ACTION WHERE``.
        where: The path or URI.
        fix: What to do about it, one clause.
    """

    action: str
    where: str
    fix: str


#: A path in an error message, with or without a ``file:`` scheme (``file:/x``, ``file:///x``).
_PATH_IN_TEXT = re.compile(r"(?:file:)?(/[^\s'\"\[\](),;]+)")
#: Links of a Java exception's cause chain followed at most.
_MAX_CAUSES = 32
#: Longest reason quoted from an error message.
_MAX_REASON = 400


@contextlib.contextmanager
def storage_errors(*accesses: Access) -> Iterator[None]:
    """Raise a failed read or write of one of ``accesses`` as one :class:`StorageError` line.

    Spark reports a file it cannot read or write as a Py4J or Spark exception whose text is a
    JVM stack trace (with the executor's Python traceback inside it when a task raised);
    the driver's own file operations raise :class:`OSError`. Either becomes one line: the
    location, the reason (from the chain of causes, the deepest message that names a path of
    one of the locations: the file itself, a folder above it, or a staging folder beside it)
    and the fix. An error that names none of the locations (a bug, a lost cluster) is left
    as it is, traceback and all; so is a :class:`UserError`.

    Args:
        accesses: The stage's locations, the first that an error names being the one blamed.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        blamed = _blame(exc, accesses)
        if blamed is None:
            raise
        access, reason = blamed
        raise StorageError(
            f"cannot {access.action} {access.where}: {reason}; {access.fix}"
        ) from exc


def _blame(exc: Exception, accesses: tuple[Access, ...]) -> tuple[Access, str] | None:
    """The access an error is about and its one-line reason; None if it names none.

    The reason is the deepest message naming the location, followed by its cause's (which
    says what was wrong with the file) when there is one.
    """
    lines = [_one_line(message) for message in reversed(_messages(exc))]  # the root first
    for depth, reason in enumerate(lines):
        for access in accesses:
            if _names(reason, access.where):
                cause = lines[depth - 1] if depth else ""
                if cause and cause not in reason:
                    reason = f"{reason.rstrip(' :.')}: {cause}"
                return access, _cut(reason)
    return None


def _messages(exc: Exception) -> list[str]:
    """The messages of ``exc`` and of its Java causes, outermost first (Spark/Py4J/OS errors)."""
    if isinstance(exc, OSError):
        return [str(exc)]
    try:
        from py4j.protocol import Py4JError, Py4JJavaError
        from pyspark.errors import PySparkException
    except ImportError:
        return []
    if isinstance(exc, Py4JJavaError):
        messages, throwable = [], exc.java_exception
    elif isinstance(exc, PySparkException):
        messages, throwable = [str(exc)], getattr(exc, "_origin", None)
    else:
        return []
    try:
        for _ in range(_MAX_CAUSES):
            if throwable is None:
                break
            messages.append(str(throwable.getMessage() or throwable.toString()))
            throwable = throwable.getCause()
    except Py4JError:  # the JVM is gone: what was read so far, or the Python side's text
        messages = messages or [str(exc)]
    return messages


def _one_line(message: str) -> str:
    """A message's line that says what failed: a traceback's last, otherwise the first."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    traceback = any(line.startswith("Traceback (most recent call last)") for line in lines)
    return _cut(lines[-1] if traceback else lines[0])


def _cut(line: str) -> str:
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


def _names(text: str, where: str) -> bool:
    """Whether ``text`` names ``where`` (a URI by its text, a local path as :func:`_related`)."""
    if local_path(where) is None:
        return where.rstrip("/") in text
    return any(_related(path, where) for path in _PATH_IN_TEXT.findall(text))


def _related(mentioned: str, where: str) -> bool:
    """Whether a path in a message is ``where``, inside it, a folder above it, or its staging.

    Staging: a hidden sibling named after it (``.NAME.tmp-*``, as ingest stages its output).
    """
    local = local_path(where)
    if local is None or mentioned.strip("/") == "":
        return False
    path = Path("/" + mentioned.strip("/").rstrip(".:"))
    target = Path(local)
    if path == target or path.is_relative_to(target) or target.is_relative_to(path):
        return True
    return path.is_relative_to(target.parent) and path.relative_to(target.parent).parts[
        0
    ].startswith(f".{target.name}.")
