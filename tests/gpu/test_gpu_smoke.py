"""GPU smoke test: run on a GPU host with the gpu extra (skipped anywhere else).

    .venv/bin/pytest tests/gpu -q -rs

Two Horovod ranks on local[2] Spark, each pinned to the GPU of its local rank (both on
GPU 0 with one GPU), train one short epoch, in float32 and in mixed float16, and must end
with identical weights; and a pinned process runs its ops on its one visible GPU.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest


def _gpus() -> int:
    try:
        import tensorflow as tf
    except ImportError:
        return 0
    return len(tf.config.list_physical_devices("GPU"))


pytestmark = pytest.mark.skipif(
    _gpus() == 0, reason="no GPU visible to TensorFlow (install the gpu extra)"
)


@pytest.fixture(scope="module")
def digits(spark, tmp_path_factory) -> Path:
    from pipelines.config import IngestConfig
    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("digits")
    source = write_demo_digits(root / "png").path
    ingest(spark, IngestConfig(image_size=28, rows_per_row_group=64), source, root / "prepared")
    return root / "prepared"


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed_float16"])
def test_two_ranks_on_gpus_end_with_identical_weights(spark, digits, tmp_path, mixed):
    from pipelines.config import TrainConfig
    from pipelines.store import DatasetDir, RunDir
    from pipelines.train.horovod_launcher import HorovodSparkLauncher
    from pipelines.train.worker import WorkerSpec, train_worker

    manifest = DatasetDir(str(digits)).read_manifest()
    cfg = dataclasses.replace(
        TrainConfig(),
        model="mnist_cnn",
        epochs=1,
        early_stopping_patience=0,
        use_gpu=True,
        mixed_precision=mixed,
    )
    spec = WorkerSpec(
        train=cfg,
        launcher="horovod",
        dataset=DatasetDir(str(digits)),
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows=manifest.splits,
        run_dir=RunDir(str(tmp_path / "out")),
    )
    ranks = sorted(HorovodSparkLauncher(spark, 2).run(train_worker, [spec]), key=lambda r: r.rank)
    print({r.rank: r.device for r in ranks})
    assert all(r.device.startswith("GPU:") for r in ranks)
    if _gpus() >= 2:  # one GPU per local rank
        assert ranks[0].device != ranks[1].device
    assert {r["precision"] for r in ranks} == {"mixed_float16" if mixed else "float32"}
    assert ranks[0].weights_sha256 == ranks[1].weights_sha256
    assert ranks[0]["history"]["loss"][0] < 2.5  # it learned something in one epoch


PLACEMENT = """
from pipelines.devices import pin_device
from pipelines.store import DatasetDir
device = pin_device(True, index=1)
import tensorflow as tf
x = tf.random.uniform((256, 256))
y = tf.matmul(x, x)
print(device, '|', y.device, '|', len(tf.config.get_visible_devices('GPU')))
"""


def test_pin_device_makes_one_gpu_visible_and_ops_run_there():
    done = subprocess.run(
        [sys.executable, "-c", PLACEMENT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    device, placed, visible = (part.strip() for part in done.stdout.strip().split("|"))
    assert device == f"GPU:{1 % _gpus()}" or device.startswith(f"GPU:{1 % _gpus()} (")
    assert "GPU:0" in placed  # the one visible GPU is the process's GPU:0
    assert visible == "1"
