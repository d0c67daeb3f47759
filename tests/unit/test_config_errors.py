"""Configuration errors fail before any Spark work: one line, exit 1, nothing written.

Each case runs the real ``dlpipe`` in a subprocess (so no Spark session of another test is
around) with its work directory in tmp; after the error the work directory must still be
empty: no demo data, no dataset, no MLflow store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {
    "unknown key": (["--set", "train.epoch=3"], "unknown config key train.epoch"),
    "wrong type": (["--set", "train.batch_size=many"], "train.batch_size: expected an integer"),
    "negative epochs": (["--set", "train.epochs=-1"], "train.epochs: -1 is out of range"),
    "negative size": (["--set", "ingest.image_size=-28"], "ingest.image_size: -28 is out of range"),
    "splits": (["--set", "ingest.splits.val=0.3"], "must add up to 1"),
    "model not in zoo": (["--set", "train.model=vgg16"], "train.model: 'vgg16' is not one of"),
    "more ranks than local slots": (
        ["--set", "train.num_proc=3", "--set", "spark.master=local[2]"],
        "train.num_proc=3 needs 3 Spark task slots, but spark.master=local[2] has 2",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_before_any_spark_work(case: str, tmp_path: Path) -> None:
    overrides, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYSPARK"))}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--set", f"work_dir={work}", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlpipe run: error: "), lines
    assert message in lines[0]
    assert not any(work.iterdir()), sorted(p.name for p in work.iterdir())
