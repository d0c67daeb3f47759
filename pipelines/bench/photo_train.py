"""Training at photo scale: MobileNetV2's images/s per Horovod rank on the photo point's data.

In: a :class:`~pipelines.config.Config` (the Spark session) and the photo point's ingested
dataset (224x224x3, :func:`pipelines.bench.scale.photo_points`). Out: one measurement,
the images/s of each of two Horovod ranks training ``mobilenet_v2`` (random weights: no
download; the same work per step as from ImageNet's) against the same rank alone in this
process without Horovod, both timed inside the rank by :func:`~pipelines.bench.train.step_worker`
(one untimed epoch, then one timed), fed by the training feed from the stored cells.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from pipelines.bench.stats import Measurement, pair
from pipelines.bench.train import StepSpec, step_worker
from pipelines.config import Config, TrainConfig
from pipelines.store import DatasetDir

log = logging.getLogger("pipelines.bench")

#: Images per rank and step: what the photos preset trains with, halved for 2 CPU cores.
BATCH_SIZE = 16


def mobilenet_images_per_rank(config: Config, dataset: Path) -> list[Measurement]:
    """MobileNetV2 on two Horovod ranks, images/s per rank, against one plain process.

    Raises:
        RuntimeError: The two ranks ended with different weights.
    """
    from pipelines.spark import get_spark
    from pipelines.train.horovod_launcher import HorovodSparkLauncher
    from pipelines.train.launchers import LocalLauncher

    manifest = DatasetDir(str(dataset)).read_manifest()
    spec = StepSpec(
        train=TrainConfig(
            model="mobilenet_v2", batch_size=BATCH_SIZE, warmup_epochs=0, layer_stats=False
        ),
        launcher="local",
        dataset=DatasetDir(str(dataset)),
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows={"train": manifest.splits["train"]},
        warmup_epochs=1,
        measured_epochs=1,
    )
    log.info("bench scale: mobilenet_v2 on %d photos, one process", manifest.splits["train"])
    (plain,) = LocalLauncher().run(step_worker, [spec])
    log.info("bench scale: mobilenet_v2 on %d photos, 2 ranks", manifest.splits["train"])
    ranks = HorovodSparkLauncher(get_spark(config.spark), 2).run(
        step_worker, [replace(spec, launcher="horovod")]
    )
    if len({r["weights_sha256"] for r in ranks}) != 1:
        raise RuntimeError("bench scale: mobilenet_v2's two ranks ended with different weights")
    per_rank = min(r["images_per_second"] for r in ranks) / len(ranks)
    return [
        pair(
            "scale",
            "photo train mobilenet_v2, images/s per rank of 2",
            [per_rank],
            "mobilenet_v2 alone, 1 process",
            [plain["images_per_second"]],
            unit="images/s",
            details={
                "model": "mobilenet_v2",
                "image_shape": list(manifest.image_shape),
                "batch_size_per_rank": BATCH_SIZE,
                "train_rows": manifest.splits["train"],
                "steps_per_epoch": {
                    "plain": plain["steps_per_epoch"],
                    "rank": ranks[0]["steps_per_epoch"],
                },
                "epoch_seconds": {
                    "plain": plain["epoch_seconds"],
                    "two_ranks": [r["epoch_seconds"] for r in ranks],
                },
                "cores_busy": {
                    "plain": round(plain["cores_busy"], 2),
                    "two_ranks": [round(r["cores_busy"], 2) for r in ranks],
                },
            },
        )
    ]
