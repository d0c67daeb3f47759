"""Staging folders left by killed ingests: removed by a later run, a live run's never.

Real processes throughout: a real ``dlpipe ingest`` killed with SIGKILL mid-job, and owner
files of processes that really are alive (this test's) or really gone (an exited child).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import IngestConfig
from pipelines.images import encode_png
from pipelines.ingest import ingest
from pipelines.store import Owner, Staging

_OWNER_FILE = Staging.OWNER_FILE


CONFIG = IngestConfig(image_size=8, channels=1, rows_per_row_group=64)


def _write_images(root: Path, count: int) -> None:
    png = encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png)


def _staging(folder: Path, owner: Owner | None, age_s: float = 0.0) -> Path:
    folder.mkdir()
    (folder / Staging.ATTEMPTS_DIR).mkdir()
    if owner is not None:
        (folder / _OWNER_FILE).write_text(owner.to_json())
    if age_s:
        then = time.time() - age_s
        os.utime(folder, (then, then))
    return folder


def _gone_pid() -> int:
    """The pid of a real process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_folders_are_removed_and_live_ones_kept(spark, tmp_path):
    source, output = tmp_path / "src", tmp_path / "out"
    _write_images(source, 6)
    me = Owner.me()
    here = socket.gethostname()
    gone = dataclasses.replace(me, pid=_gone_pid(), started=None)
    dead = _staging(tmp_path / ".out.tmp-dead", gone)
    reused = _staging(tmp_path / ".out.tmp-reused", dataclasses.replace(me, started=1.0))
    rebooted = _staging(tmp_path / ".out.tmp-rebooted", dataclasses.replace(me, boot=1.0))
    ancient = _staging(tmp_path / ".out.tmp-ancient", None, age_s=3 * 24 * 3600)
    live = _staging(tmp_path / ".out.tmp-live", me)
    foreign = dataclasses.replace(me, host=f"not-{here}", pid=1)
    remote = _staging(tmp_path / ".out.tmp-remote", foreign)
    fresh = _staging(tmp_path / ".out.tmp-fresh", None)
    other_output = _staging(tmp_path / ".other.tmp-dead", dataclasses.replace(me, pid=_gone_pid()))
    output.mkdir()  # a previous dataset, and the one before it, left by a killed swap
    swapped = _staging(tmp_path / ".out.old-0123abcd", None)

    result = ingest(spark, CONFIG, source, output)

    assert result.ingested == 6 and not (output / _OWNER_FILE).exists()
    for removed in (dead, reused, rebooted, ancient, swapped):
        assert not removed.exists(), removed.name
    for kept in (live, remote, fresh, other_output):
        assert kept.exists(), kept.name


@pytest.mark.slow
def test_a_killed_ingest_leaves_a_staging_folder_the_next_run_removes(spark, tmp_path, dlpipe_env):
    source, output = tmp_path / "src", tmp_path / "out"
    _write_images(source, 3000)
    dlpipe = Path(sys.executable).with_name("dlpipe")
    env = {**dlpipe_env, "DLPIPE_SKIP_PREFLIGHT": "1"}
    command = [str(dlpipe), "ingest", "--source", str(source), "--output", str(output)]
    command += ["--image-size", "8", "--channels", "1", "--set", f"work_dir={tmp_path / 'w'}"]
    # Its own process group, so that the kill takes its JVM and Python workers too.
    run = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".out.tmp-*/{_OWNER_FILE}")):
            assert run.poll() is None, "ingest ended before its staging folder was seen"
            assert time.monotonic() < deadline, "no staging folder after 120 s"
            time.sleep(0.01)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    [left] = tmp_path.glob(".out.tmp-*")
    assert json.loads((left / _OWNER_FILE).read_text())["pid"] == run.pid
    assert not output.exists()

    result = ingest(spark, CONFIG, source, output)

    assert not left.exists() and not list(tmp_path.glob(".out.*"))
    assert (result.ingested, result.quarantined) == (3000, 0)
    assert spark.read.parquet(str(output)).count() == 3000
    Image.open(source / "class0" / "00000.png").verify()  # the source is untouched
