"""The class archive's bookkeeping: which JVM options, when it is written, used or removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipelines import jvm_archive

CONF = {"spark.sql.session.timeZone": "UTC"}


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(jvm_archive.SWITCH, raising=False)
    monkeypatch.setattr(jvm_archive, "_allowed", {"write": False})
    monkeypatch.setattr(jvm_archive, "_writing", {})
    return tmp_path / "spark-dl-pipelines" / "jvm"


def _option(options: str, name: str) -> Path:
    values = [o.split("=", 1)[1] for o in options.split() if o.startswith(f"-XX:{name}=")]
    assert len(values) == 1, options
    return Path(values[0])


def test_without_an_archive_only_the_command_writes_one(cache):
    assert jvm_archive.java_options(CONF) == ""  # a library caller, the test session

    jvm_archive.allow_writing()
    written = _option(jvm_archive.java_options(CONF), "ArchiveClassesAtExit")

    assert written.parent == cache and written.name.endswith(".tmp")
    assert "-Xlog:cds=off" in jvm_archive.java_options(CONF)


def test_a_finished_archive_is_mapped_and_other_settings_get_their_own(cache):
    jvm_archive.allow_writing()
    written = _option(jvm_archive.java_options(CONF), "ArchiveClassesAtExit")
    final = written.with_name(written.name.split(".jsa.")[0] + ".jsa")
    final.write_bytes(b"archive")

    assert _option(jvm_archive.java_options(CONF), "SharedArchiveFile") == final
    other = jvm_archive.java_options({**CONF, "spark.jars.packages": "io.delta:delta-spark"})
    assert "ArchiveClassesAtExit" in other  # other jars, another archive


def test_an_archive_being_written_is_left_to_its_writer_and_a_stale_one_removed(cache):
    jvm_archive.allow_writing()
    first = _option(jvm_archive.java_options(CONF), "ArchiveClassesAtExit")
    first.write_bytes(b"partial")  # its JVM is writing it

    assert jvm_archive.java_options(CONF) == ""

    old = time.time() - jvm_archive.STALE_S - 10
    os.utime(first, (old, old))  # its command died long ago
    assert "ArchiveClassesAtExit" in jvm_archive.java_options(CONF)
    assert not first.exists()


def test_an_archive_the_jvm_did_not_start_with_is_removed(cache):
    cache.mkdir(parents=True)
    archive = cache / "spark-0123456789abcdef.jsa"
    archive.write_bytes(b"truncated")

    assert jvm_archive.discard(f"-XX:TieredStopAtLevel=1 -XX:SharedArchiveFile={archive}")
    assert not archive.exists()
    assert not jvm_archive.discard("-XX:TieredStopAtLevel=1")  # nothing to retry without


def test_archives_are_off_with_the_switch(cache, monkeypatch):
    monkeypatch.setenv(jvm_archive.SWITCH, "0")
    jvm_archive.allow_writing()

    assert jvm_archive.java_options(CONF) == ""


def test_only_the_newest_archives_are_kept(cache):
    cache.mkdir(parents=True)
    for age in range(jvm_archive.KEEP + 2):
        path = cache / f"spark-{age:016x}.jsa"
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age * 100, time.time() - age * 100))

    jvm_archive._keep_newest(cache)

    kept = sorted(p.name for p in cache.glob("*.jsa"))
    assert kept == [f"spark-{age:016x}.jsa" for age in range(jvm_archive.KEEP)]
