"""What every ``dlpipe`` command shares: --config, --set, --json, --output (no Spark here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import load_config, resolve_config


def _dlpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_json_prints_one_json_object_and_nothing_else_on_stdout(tmp_path: Path) -> None:
    done = _dlpipe("demo-data", "--json", "--output", str(tmp_path / "d"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON document
    assert result["images"] == 1797 and result["path"] == str(tmp_path / "d")
    assert "images: 1797" in done.stderr  # the people's lines went to stderr


def test_without_json_the_result_is_for_people_on_stdout(tmp_path: Path) -> None:
    done = _dlpipe("demo-data", "--output", str(tmp_path / "d"), cwd=tmp_path)
    assert done.returncode == 0 and "images: 1797" in done.stdout


def test_the_old_flag_names_still_work(tmp_path: Path) -> None:
    done = _dlpipe("demo-data", "--out", str(tmp_path / "d"), "--conf", "cluster", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"path: {tmp_path / 'd'}" in done.stdout
    assert "--conf is deprecated" in done.stderr and "use --config" in done.stderr
    helped = _dlpipe("report", "--help", cwd=tmp_path).stdout
    assert "--output" in helped and "--config" in helped
    assert "--out " not in helped and "--conf " not in helped  # hidden aliases


def test_config_show_gives_each_value_and_where_it_came_from(tmp_path: Path) -> None:
    done = _dlpipe(
        "config",
        "show",
        "--json",
        "--config",
        "cluster",
        "--set",
        "train.epochs=3",
        "--set",
        "spark.conf.spark.executor.memory=8g",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["config"]
    assert shown["train.epochs"] == {"value": 3, "source": "--set"}
    assert shown["train.model"] == {"value": "mnist_cnn", "source": "base"}
    assert shown["spark.master"] == {"value": None, "source": "overlay cluster"}
    assert shown["spark.conf.spark.executor.memory"] == {"value": "8g", "source": "--set"}
    assert shown["locations.tracking_uri"]["source"] in (
        "mlflow.tracking_uri",
        "environment MLFLOW_TRACKING_URI",
        "default: sqlite store in work_dir",
    )
    people = _dlpipe("config", "show", cwd=tmp_path).stdout
    assert 'train.model = "mnist_cnn"    # base' in people.splitlines()


def test_set_reaches_spark_properties_with_dots_in_their_names() -> None:
    config = load_config(
        overrides=[
            "spark.conf.spark.executor.memory=8g",
            'spark.conf."spark.sql.shuffle.partitions"=16',
        ]
    )
    assert config.spark.conf == {
        "spark.executor.memory": "8g",
        "spark.sql.shuffle.partitions": "16",
    }
    sources = resolve_config(overrides=["spark.conf.spark.executor.memory=8g"]).sources
    assert sources["spark.conf.spark.executor.memory"] == "--set"


def test_a_dotted_key_outside_a_free_mapping_is_still_an_unknown_key() -> None:
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key train.epochs.max"):
        load_config(overrides=["train.epochs.max=3"])
