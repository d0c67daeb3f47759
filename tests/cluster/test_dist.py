"""``make dist``: the packed environment for bare cluster nodes works where Spark unpacks it.

Spark unpacks ``--archives dlpipe-env.tar.gz#env`` into each executor's folder and runs
``./env/bin/python``; this test builds the archive, unpacks it the same way into a folder far
from the checkout and the project's venv, and runs the preflight there.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_packed_environment_runs_the_project_away_from_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        # -o: a venv older than pyproject.toml is not rebuilt from inside a test.
        ["make", "-s", "-o", ".venv/.ready", "dist", f"DIST={dist}",
         f"DIST_ENV={tmp_path / 'env-build'}"],
        cwd=REPO, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    archive = dist / "dlpipe-env.tar.gz"
    executor = tmp_path / "executor"
    with tarfile.open(archive) as packed:
        packed.extractall(executor / "env", filter="tar")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # nothing of the project's venv
    python = "./env/bin/python"

    where = subprocess.run(
        [python, "-c", "import pipelines, horovod.tensorflow; print(pipelines.__file__)"],
        cwd=executor, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).resolve().is_relative_to(executor.resolve())

    doctor = subprocess.run(
        [python, "-m", "pipelines.cli", "doctor", "--json"],
        cwd=executor, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout[-2000:] + doctor.stderr[-2000:]
    assert json.loads(doctor.stdout.strip().splitlines()[-1])["ok"] is True
