"""Whole ``dlpipe`` processes, as a user runs them: started, timed to exit, result read.

In: a command line (``dlpipe train ... --json`` or any other program), a working folder and
an environment. Out: wall seconds from launch to exit, the exit code and the output
(:func:`run_process`), or a ``dlpipe`` command's JSON result (:func:`run_dlpipe`). A
process that runs too long is stopped with everything it started (the Spark JVM, Horovod's
ranks, which live in process groups of their own).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Seconds one benchmarked process may run before it is stopped.
RUN_TIMEOUT_S = 900


def dlpipe_command() -> list[str]:
    """Our CLI, as a user runs it: the ``dlpipe`` script next to this interpreter."""
    script = Path(sys.executable).parent / "dlpipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]


def dlpipe_environment() -> dict[str, str]:
    """This process's environment for a ``dlpipe`` child: no inherited MLflow settings.

    The child's stores come from its own ``--set`` values; the executors' Python is this
    interpreter (the one whose ``dlpipe`` runs).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYSPARK_PYTHON"] = sys.executable
    return env


def run_dlpipe(
    args: Sequence[str],
    work: Path,
    sets: Mapping[str, str] = {},  # noqa: B006 - read only
    timeout_s: float = RUN_TIMEOUT_S,
) -> tuple[float, dict[str, Any]]:
    """One whole ``dlpipe ARGS --json`` process in ``work``: wall seconds and its result.

    Raises:
        RuntimeError: It failed or printed no result (the message is its last error line).
        TimeoutError: It ran past ``timeout_s`` (and was stopped).
    """
    work.mkdir(parents=True, exist_ok=True)
    command = [*dlpipe_command(), *args, "--json"]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    wall, rc, out, err = run_process(command, work, dlpipe_environment(), timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        raise RuntimeError(f"dlpipe {args[0]} failed (exit {rc}): {last_error(err)}")
    return wall, json.loads(lines[-1])


def run_process(
    command: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float = RUN_TIMEOUT_S,
) -> tuple[float, int, str, str]:
    """Run ``command`` in its own process group; stop all of it on timeout or error.

    Output goes to files in ``cwd`` (no pipe to fill up). The Spark JVM and Horovod's
    ranks are its descendants, some in process groups of their own, so they are collected
    and killed as well when the command has to be stopped.

    Returns:
        ``(wall seconds, exit code, stdout, stderr)``.

    Raises:
        TimeoutError: It ran past ``timeout_s`` (its processes are killed first).
    """
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=out, stderr=err, start_new_session=True
        )
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_tree(process)
            raise TimeoutError(
                f"{Path(command[0]).name} ran past {timeout_s:.0f} s and was stopped"
            ) from None
        except BaseException:
            stop_tree(process)
            raise
        wall = time.perf_counter() - start
    return wall, rc, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def stop_tree(process: subprocess.Popen) -> None:
    """Kill ``process``, its process group and every descendant, then reap it."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    process.wait()


def last_error(text: str) -> str:
    """The most telling line of a failed process's output (pip's ERROR line, an exception)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("ERROR:", "Error:", "Error", "error"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"
