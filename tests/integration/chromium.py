"""Headless Chromium for page tests: load a page, read its console, take a screenshot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")

#: Skips a test where Debian's chromium is not installed.
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)


def run_chromium(
    url: str, workdir: Path, *extra: str, window: tuple[int, int] = (1280, 2000)
) -> tuple[str, list[str]]:
    """Load ``url`` with no network extras; return stdout (``--dump-dom``) and console lines.

    Chromium logs page console messages, uncaught exceptions included, as
    ``...:INFO:CONSOLE:1] "msg", source: ...`` (older versions ``INFO:CONSOLE(1)]``).
    """
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={workdir / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={window[0]},{window[1]}",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    lines = (done.stdout + done.stderr).splitlines()
    return done.stdout, [line for line in lines if re.search(r":CONSOLE[:(]", line)]


def screenshot(
    html: Path, workdir: Path, window: tuple[int, int] = (1280, 2000)
) -> tuple[Path, list[str]]:
    """Open ``html`` and screenshot it; return the PNG's path and the console lines."""
    shot = workdir / "shot.png"
    _, console = run_chromium(html.as_uri(), workdir, f"--screenshot={shot}", window=window)
    return shot, console
