"""The pinned stack's test run never imports the Keras stack's tests (tests/keras/)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    importlib.metadata.version("keras").startswith("3."), reason="this venv is the Keras stack's"
)
def test_the_keras_folder_is_ignored_where_keras_is_keras_2():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/keras", "-W", "error::pytest.PytestCollectionWarning"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, done.stdout + done.stderr
    assert "error" not in done.stdout.lower()
