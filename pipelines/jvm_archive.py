"""A class-data archive of the JVM classes a local Spark session loads, for faster starts.

In: the Java, the Spark jars and the Spark properties of a local session about to start.
Out: the driver's JVM options (:func:`java_options`) and, once per such combination, the
archive itself (:func:`save_if_written`, at the end of a ``dlpipe`` command).

This is the JDK's dynamic class-data sharing (AppCDS, JDK 13 and later): a JVM started with
``-XX:ArchiveClassesAtExit=FILE`` writes the classes it loaded to FILE as it exits, and a
later JVM started with ``-XX:SharedArchiveFile=FILE`` maps them instead of loading and
verifying each class from Spark's jars. Measured on 2 cores, Java 17, Spark 3.5: the
session's start 3.4 s -> 2.0 s, the executors' first job (the preflight) 1.8 s -> 1.4 s.
Writing the archive costs one command about 8 s at its end, once per machine.

Only a local master's session is concerned (its JVM is the only one, executors included,
and ``dlpipe`` starts it); under ``spark-submit`` or on Databricks the JVM is up before
Python runs. ``spark.conf`` that sets ``spark.driver.extraJavaOptions`` turns it off, as
does ``DLPIPE_JVM_ARCHIVE=0``.

A truncated archive crashes the JVM that maps it (SIGBUS), so an archive is used only under
its final name, which it gets (an atomic rename) once the JVM that wrote it exited cleanly;
and a JVM that fails to start with one removes it and starts without
(:func:`discard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.store import move_into

log = logging.getLogger(__name__)

#: Archives kept in the cache (one per Java, Spark jars and properties); the oldest go.
KEEP = 3
#: A temporary archive older than this was left by a command that never finished it.
STALE_S = 3600.0
#: Seconds to wait for the JVM writing a new archive to exit.
WRITE_TIMEOUT_S = 180.0
#: The JVM's messages about class sharing (classes it cannot archive) are not the user's.
_QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"
#: Environment variable that turns archives off (``0``).
SWITCH = "DLPIPE_JVM_ARCHIVE"

#: The archive this process's JVM writes as it exits, while writing is allowed.
_writing: dict[str, Path] = {}
_allowed = {"write": False}


def allow_writing() -> None:
    """Let this process write a missing archive (the ``dlpipe`` command does, at its end).

    Other processes (a library caller, the test suite) only use an archive that exists:
    the archive is written as the JVM exits, which only the command controls.
    """
    _allowed["write"] = True


def cache_dir() -> Path:
    """Where archives are kept: ``$XDG_CACHE_HOME/spark-dl-pipelines/jvm`` (``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spark-dl-pipelines" / "jvm"


def java_options(conf: Mapping[str, Any]) -> str:
    """Driver JVM options for a local session about to start with Spark properties ``conf``.

    Maps the archive when there is one; else, where this process may write it and no other
    is writing it, has the JVM write it as it exits. Empty when archives are off or the
    cache cannot be used.
    """
    if os.environ.get(SWITCH, "1") == "0":
        return ""
    key = _key(conf)
    if key is None:
        return ""
    folder = cache_dir()
    final = folder / f"spark-{key}.jsa"
    if final.is_file():
        # A JVM that cannot map it crashes, writing its report here, not in the user's folder.
        errors = folder / "hs_err_pid%p.log"
        return f"-XX:SharedArchiveFile={final} -XX:ErrorFile={errors} {_QUIET}"
    if not _allowed["write"]:
        return ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if _being_written(folder, key):
            return ""
    except OSError:
        return ""
    temporary = folder / f"spark-{key}.jsa.{uuid.uuid4().hex}.tmp"
    _writing["archive"] = temporary
    return f"-XX:ArchiveClassesAtExit={temporary} {_QUIET}"


def discard(options: str) -> bool:
    """After a JVM failed to start with ``options``: remove the archive they map, if any.

    Returns:
        Whether an archive was removed (the caller starts the JVM again without it).
    """
    for option in options.split():
        if option.startswith("-XX:SharedArchiveFile="):
            path = Path(option.split("=", 1)[1])
            log.warning("spark: the JVM did not start with the class archive %s; removed", path)
            path.unlink(missing_ok=True)
            return True
    _writing.pop("archive", None)
    return False


def save_if_written(gateway: Any) -> Path | None:
    """If this process's JVM is to write a new archive: stop it, wait, publish the archive.

    Args:
        gateway: PySpark's ``SparkContext._gateway`` (None when no JVM was started).

    Returns:
        The published archive, or None (nothing to write, or writing failed: logged).
    """
    temporary = _writing.pop("archive", None)
    process = getattr(gateway, "proc", None)
    if temporary is None or process is None:
        return None
    from pyspark.sql import SparkSession

    started = time.monotonic()
    log.info("spark: saving the JVM's class archive for faster starts (once, about 10 s)")
    try:
        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
        gateway.shutdown()
        process.stdin.close()  # PySpark's JVM exits when its standard input closes
        code = process.wait(WRITE_TIMEOUT_S)
    except Exception as exc:  # an archive is an optimisation: never fail the command
        log.warning("spark: the class archive was not saved: %s", exc)
        temporary.unlink(missing_ok=True)
        return None
    if code != 0 or not temporary.is_file():
        log.warning("spark: the class archive was not saved (the JVM exited with %s)", code)
        temporary.unlink(missing_ok=True)
        return None
    final = temporary.with_name(temporary.name.split(".jsa.", 1)[0] + ".jsa")
    move_into(temporary, final)
    _keep_newest(final.parent)
    log.info("spark: class archive %s saved in %.1f s", final, time.monotonic() - started)
    return final


def _key(conf: Mapping[str, Any]) -> str | None:
    """What an archive belongs to: the Java binary, Spark's jars and the properties."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    try:
        from pyspark.find_spark_home import _find_spark_home

        jars = Path(os.environ.get("SPARK_HOME") or _find_spark_home()) / "jars"
        real_java = os.path.realpath(java) if java else None
        if real_java is None:
            return None
        java_stat = os.stat(real_java)
        listing = sorted((entry.name, entry.stat().st_size) for entry in os.scandir(jars))
    except (OSError, ImportError, ValueError):
        return None
    identity = {
        "java": [real_java, java_stat.st_size, java_stat.st_mtime_ns],
        "jars": [str(jars.resolve()), listing],
        "conf": sorted((str(k), str(v)) for k, v in conf.items()),
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _being_written(folder: Path, key: str) -> bool:
    """Whether another command writes this archive now; stale temporary files are removed."""
    writing = False
    for path in folder.glob(f"spark-{key}.jsa.*.tmp"):
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            continue
        if age > STALE_S:
            path.unlink(missing_ok=True)
        else:
            writing = True
    return writing


def _keep_newest(folder: Path) -> None:
    """Keep the :data:`KEEP` most recently written archives."""
    archives = sorted(folder.glob("spark-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[KEEP:]:
        old.unlink(missing_ok=True)
