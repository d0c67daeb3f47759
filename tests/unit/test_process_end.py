"""How the ``dlpipe`` process ends: its code and output intact, exit handlers run, no teardown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# The console script, with a command that registers an exit handler (as MLflow and PySpark
# do while a command runs) and ends with a given code.
CONSOLE = """
import atexit, sys
from pathlib import Path
from pipelines import cli

def command(argv=None):
    atexit.register(Path(sys.argv[1]).write_text, "handler ran")
    print("x" * 200_000)  # more than a pipe's buffer: all of it must get out
    return int(sys.argv[2])

cli.main = command
cli.console()
"""


def _console(tmp_path: Path, code: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONSOLE, str(tmp_path / "mark"), str(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_command_s_code_output_and_exit_handlers_survive_the_quick_exit(tmp_path):
    for code in (0, 3):
        (tmp_path / "mark").unlink(missing_ok=True)
        done = _console(tmp_path, code)

        assert done.returncode == code, done.stderr
        assert done.stdout == "x" * 200_000 + "\n"
        assert (tmp_path / "mark").read_text() == "handler ran"


def test_a_real_command_ends_with_its_result_and_its_error_code(tmp_path):
    dlpipe = Path(sys.executable).with_name("dlpipe")
    ok = subprocess.run(
        [str(dlpipe), "config", "show", "--json"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "train.epochs" in json.loads(ok.stdout)["config"]

    bad = subprocess.run(
        [str(dlpipe), "config", "show", "--set", "train.epoch=3"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "train.epoch" in bad.stderr
