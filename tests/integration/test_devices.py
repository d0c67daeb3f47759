"""GPU settings on this GPU-less host: ``use_gpu: true`` fails in one line, ``auto`` uses the CPU.

Real TensorFlow, MLflow, Spark and Horovod; the GPU side itself is in ``tests/gpu``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import IngestConfig
from pipelines.devices import CPU, pin_device
from pipelines.errors import NoGpuError, UserError
from pipelines.store import Store
from pipelines.train.driver import train
from pipelines.train.launchers import LocalLauncher


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


pytestmark = pytest.mark.skipif(_has_gpu(), reason="these tests need a host without a GPU")

#: One small epoch in this process.
ONE_EPOCH = ("train.launcher=local", "train.hidden_units=32", "train.epochs=1")

#: The whole of the message a user must see, in parts.
MESSAGE = ("train.use_gpu is true but TensorFlow", "finds no GPU", "set train.use_gpu=auto")


def _manifest_only(root: Path) -> Path:
    """A dataset the driver accepts: the workers fail at device set-up, before any data."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"splits": {"train": 8, "val": 0, "test": 0}, "label_names": ["a", "b"]}
    (root / "_manifest.json").write_text(json.dumps({**manifest, "image_shape": [8, 8, 1]}))
    return root


def test_pin_device_on_a_host_without_a_gpu():
    assert pin_device(False) == CPU
    assert pin_device("auto", index=3) == CPU
    with pytest.raises(NoGpuError) as info:
        pin_device(True, key="score.use_gpu")
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert socket.gethostname() in message and "set score.use_gpu=auto" in message
    with pytest.raises(ValueError, match="expected true, false or 'auto'"):
        pin_device("maybe")


def test_use_gpu_true_fails_the_run_with_the_one_line_error(tmp_path, monkeypatch, small_config):
    import mlflow

    config = small_config(*ONE_EPOCH, "train.use_gpu=true")
    with pytest.raises(NoGpuError) as info:
        train(config, LocalLauncher(), _manifest_only(tmp_path / "data"))
    assert all(part in str(info.value) for part in MESSAGE)
    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    runs = mlflow.search_runs(experiment_names=[config.mlflow.experiment])
    assert list(runs["status"]) == ["FAILED"]
    assert runs["tags.error"][0].startswith("NoGpuError: train.use_gpu is true")


def test_dlpipe_train_with_use_gpu_true_on_horovod_ranks_exits_1(dlpipe_env, tmp_path):
    # The default launcher: two Horovod ranks on local Spark both fail device set-up, and
    # the driver re-raises their UserError instead of Horovod's "exited with non-zero status".
    data = _manifest_only(tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", "--dataset", str(data),
         "--set", f"work_dir={tmp_path / 'work'}", "--set", "train.use_gpu=true",
         "--set", "train.num_proc=2"],
        env=dlpipe_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlpipe train: error: train.use_gpu is true"), done.stderr[-3000:]
    assert all(part in last for part in MESSAGE)
    assert "Traceback" not in done.stderr


def test_auto_trains_on_the_cpu_and_the_run_says_so(spark, tmp_path, monkeypatch, small_config):
    import mlflow

    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest

    source = write_demo_digits(tmp_path / "png").path
    data = tmp_path / "prepared"
    ingest(spark, IngestConfig(image_size=12, rows_per_row_group=64), source, data)
    config = small_config(*ONE_EPOCH, "train.use_gpu=auto", "train.mixed_precision=true")
    result = train(config, LocalLauncher(), data)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.use_gpu"] == "auto"
    assert json.loads(run.data.tags["devices"]) == {"0": "CPU"}
    assert json.loads(run.data.params["devices"]) == {"0": "CPU"}  # auto says so in params
    # No GPU, so mixed precision fell back to float32, and said so.
    assert run.data.tags["precision"] == "float32"
    from pipelines.keras_api import keras

    assert keras().mixed_precision.global_policy().name == "float32"  # nothing leaked
