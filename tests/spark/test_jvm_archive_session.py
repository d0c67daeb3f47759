"""The class archive with real JVMs: written once, mapped by the next session, and a broken
one (which would crash the JVM) removed so that the session still starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A local session as get_spark starts it, one job, the JVM's arguments; then the archive
# saved as the dlpipe command saves it at its end.
SESSION = """
import json, sys
from pyspark import SparkContext
from pipelines import jvm_archive
from pipelines.config import SparkConfig
from pipelines.spark import get_spark

if sys.argv[1] == "write":
    jvm_archive.allow_writing()
spark = get_spark(SparkConfig(master="local[1]", conf={"spark.ui.enabled": "false"}))
rows = spark.range(100).count()
runtime = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
arguments = list(runtime.getInputArguments())
saved = jvm_archive.save_if_written(SparkContext._gateway)
print("RESULT " + json.dumps({"rows": rows, "args": arguments, "saved": saved and str(saved)}))
"""


def _session(mode: str, cache: Path) -> tuple[dict, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYSPARK_PYTHON": sys.executable}
    env.pop("DLPIPE_JVM_ARCHIVE", None)
    folder = cache / "cwd"
    folder.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", SESSION, mode],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), done.stderr


def _archive_option(arguments: list[str]) -> str | None:
    return next((a for a in arguments if a.startswith("-XX:SharedArchiveFile=")), None)


def test_the_archive_is_written_once_mapped_next_and_a_broken_one_removed(tmp_path):
    written, _ = _session("write", tmp_path)
    archive = Path(written["saved"])
    assert written["rows"] == 100 and archive.is_file()
    assert archive.stat().st_size > 1_000_000  # Spark's classes, not an empty file
    assert any(a.startswith("-XX:ArchiveClassesAtExit=") for a in written["args"])
    assert not list(archive.parent.glob("*.tmp"))

    mapped, _ = _session("use", tmp_path)
    assert mapped["rows"] == 100
    assert _archive_option(mapped["args"]) == f"-XX:SharedArchiveFile={archive}"

    with archive.open("r+b") as file:  # as a full disk or a killed writer would leave it
        file.truncate(archive.stat().st_size // 2)
    recovered, stderr = _session("use", tmp_path)
    assert recovered["rows"] == 100
    assert _archive_option(recovered["args"]) is None
    assert not archive.exists()
    assert "did not start with the class archive" in stderr
    assert not list((tmp_path / "cwd").iterdir())  # the crashed JVM's report is not left here
