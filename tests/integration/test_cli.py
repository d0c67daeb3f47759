"""The ``dlpipe`` command as a user runs it: a real subprocess, real Spark, Horovod and MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["demo-data", "ingest", "train", "score", "promote", "serve", "report", "bench", "run"]


def _dlpipe(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, dlpipe_env):
    done = _dlpipe(dlpipe_env, command, "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--conf" in done.stdout and "--set" in done.stdout and "--json" in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ingest", "--source", "/no/such/images"], "/no/such/images"),
        (["report", "--run-id", "0123456789abcdef"], "0123456789abcdef"),
        (["train", "--dataset", "/no/such/dataset"], "/no/such/dataset"),
        (["ingest", "--set", "ingest.image_size=-3"], "ingest.image_size"),
        (["promote", "--version", "3"], "registered model digits-classifier not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(args, expected, dlpipe_env, tmp_path):
    done = _dlpipe(dlpipe_env, *args, "--set", f"work_dir={tmp_path}", timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"dlpipe {args[0]}: error: ")
    assert expected in lines[-1]
    assert "Traceback" not in done.stderr


def test_run_does_every_stage_and_report_compares_runs(dlpipe_env, tmp_path):
    """``dlpipe run`` (the README's main command) on the bundled digits, made small."""
    small = [
        f"work_dir={tmp_path / 'work'}",
        "ingest.image_size=16",
        "train.model=mlp",
        "train.hidden_units=64",
        "train.epochs=2",
        "train.early_stopping_patience=0",
        # Augmentation pays off over the default 40 epochs, not in 2 or 3.
        "train.augment_shift=0.0",
        "train.augment_rotation_deg=0.0",
    ]
    sets = [arg for item in small for arg in ("--set", item)]
    done = _dlpipe(dlpipe_env, "run", "--json", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["ingest"]["ingested"] == 1797
    assert sum(result["ingest"]["splits"].values()) == 1797
    assert result["train"]["world_size"] == 2
    assert result["train"]["test_metrics"]["test_accuracy"] > 0.8
    assert result["score"]["scored"] == 1797 and result["score"]["errors"] == 0
    page = Path(result["report"])
    assert page.is_file() and "<img" in page.read_text()
    for headline in ("test_accuracy", "rows_scored", "run_id", "model_version"):
        assert headline in result["headline"]

    again = _dlpipe(dlpipe_env, "train", "--json", *sets, "--set", "train.activation=tanh")
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    compared = _dlpipe(
        dlpipe_env,
        "report",
        "--json",
        "--compare",
        result["train"]["run_id"],
        second["run_id"],
        *sets,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    page = Path(json.loads(compared.stdout.strip().splitlines()[-1])["report"])
    assert "train.activation" in page.read_text()
