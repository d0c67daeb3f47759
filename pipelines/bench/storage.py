"""Storage benchmark: each ``ingest.storage`` at 224x224x3, its bytes and its feed speed.

In: a :class:`~pipelines.config.Config` (Spark session for the ingests), a number of
generated photos and repeats. Out: per storage (``raw``, ``png``, ``jpeg``) two
:class:`~pipelines.bench.stats.Measurement` records:

- ``<storage> cell bytes/image``: the dataset's Parquet bytes per row, against the source
  JPEG file's bytes per image (informative; the details give the ratio to the raw pixels,
  224 x 224 x 3 = 150,528 bytes, whose half is the bar of the default's choice);
- ``<storage> feed epoch``: the steady-state epoch of a fixed photo model (``resnet_small``)
  trained on 2 ranks (2 processes, each its own Petastorm shard), against the same 2 ranks
  fed from memory (target ``<= 1.1``, as ``bench feed``).

The default storage (``conf/base.yaml``) is the one that meets both bars with the fewest bytes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.bench.data import bench_dir, cached_jpegs, folder_ingest_config
from pipelines.bench.feed import FEED_TARGET_RATIO, WARMUP_EPOCHS, in_memory_dataset
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes
from pipelines.config import Config, SplitConfig, TrainConfig
from pipelines.schema import STORAGES
from pipelines.store import DatasetDir

log = logging.getLogger("pipelines.bench")

#: Photo side of the benchmark (the ImageNet backbones' input) and of its source JPEGs.
STORAGE_IMAGE_SIZE = 224
STORAGE_SOURCE_SIZE = 256
#: Default number of photos: about 200 training rows, a minute on two cores.
STORAGE_IMAGES = 256
#: Ranks, rows per row group (several per rank), batch per rank, the model.
STORAGE_RANKS = 2
STORAGE_ROWS_PER_GROUP = 16
STORAGE_BATCH_SIZE = 16
STORAGE_MODEL = "resnet_small"
#: The bar on bytes: at most this share of the raw pixels per image.
STORAGE_BYTES_TARGET = 0.5


def bench_storage(
    config: Config, *, images: int = STORAGE_IMAGES, repeats: int = 2
) -> list[Measurement]:
    """Bytes per image and 2-rank feed epoch of every storage, against source and memory.

    Args:
        config: Spark session for the ingests (cached under ``<work_dir>/bench``).
        images: Generated source photos (about 80 % land in the training split).
        repeats: Measured epochs of each feed on each rank.

    Returns:
        Two measurements per storage: bytes/image (informative) and s/epoch (``<= 1.1``).

    Raises:
        UserError: ``images`` or ``repeats`` is below 1.
    """
    check_sizes("storage", images, repeats, minimum=STORAGE_RANKS * STORAGE_ROWS_PER_GROUP)
    source = cached_jpegs(config, images, STORAGE_SOURCE_SIZE)
    source_bytes = sum(p.stat().st_size for p in source.rglob("*.jpg")) / images
    datasets = {storage: _ingested(config, source, images, storage) for storage in STORAGES}
    raw_pixels = STORAGE_IMAGE_SIZE * STORAGE_IMAGE_SIZE * 3
    results: list[Measurement] = []
    for storage, path in datasets.items():
        manifest = DatasetDir(str(path)).read_manifest()
        per_image = sum(p.stat().st_size for p in path.rglob("*.parquet")) / manifest.ingested
        results.append(
            pair(
                "storage",
                f"{storage} cell bytes/image",
                [per_image],
                "source JPEG bytes/image",
                [source_bytes],
                unit="bytes/image",
                details={
                    "images": manifest.ingested,
                    "image_shape": manifest.image_shape,
                    "raw_pixel_bytes": raw_pixels,
                    "share_of_raw_pixels": round(per_image / raw_pixels, 4),
                    "meets_bytes_bar": per_image <= STORAGE_BYTES_TARGET * raw_pixels,
                    "jpeg_quality": config.ingest.jpeg_quality,
                },
            )
        )
    seconds = feed_epochs(datasets, repeats)
    details = {
        "rank_count": STORAGE_RANKS,
        "model": STORAGE_MODEL,
        "batch_size_per_rank": STORAGE_BATCH_SIZE,
        "rows_per_row_group": STORAGE_ROWS_PER_GROUP,
        "repeats": repeats,
        "measures": "slowest rank's wall seconds of one steady-state epoch per run",
    }
    for storage in STORAGES:
        results.append(
            pair(
                "storage",
                f"{storage} feed epoch, {STORAGE_RANKS} ranks",
                seconds[storage],
                "in-memory epoch",
                seconds["memory"],
                unit="s/epoch",
                target=f"<= {FEED_TARGET_RATIO}",
                details=details,
            )
        )
    return results


def _ingested(config: Config, source: Path, images: int, storage: str) -> Path:
    """The generated photos ingested at 224x224 RGB in ``storage`` (cached)."""
    quality = config.ingest.jpeg_quality
    side = STORAGE_IMAGE_SIZE
    name = f"storage-{images}x{side}-{storage}-q{quality}-rg{STORAGE_ROWS_PER_GROUP}"
    path = bench_dir(config) / name
    if not (path / DatasetDir.MANIFEST_FILE).is_file():
        from pipelines.ingest import ingest
        from pipelines.spark import get_spark

        cfg = replace(
            folder_ingest_config(config, side, 3),
            splits=SplitConfig(),
            storage=storage,
            rows_per_row_group=STORAGE_ROWS_PER_GROUP,
        )
        log.info("bench storage: ingesting %d photos as %s into %s", images, storage, path)
        ingest(get_spark(config.spark), cfg, source, path)
    return path


def feed_epochs(datasets: dict[str, Path], repeats: int) -> dict[str, list[float]]:
    """Per feed (``memory`` and each dataset), the slowest rank's epoch seconds per run.

    2 spawned rank processes each fit the fixed model (``resnet_small``, batch 16) on its own
    Petastorm shard of each dataset's training split, and on the first dataset's whole
    training split in memory; every run starts at a barrier, so the ranks run together.
    """
    context = multiprocessing.get_context("spawn")  # TensorFlow is not fork-safe
    barrier = context.Barrier(STORAGE_RANKS)
    results = context.Queue()
    urls = {storage: DatasetDir(str(path)).split("train") for storage, path in datasets.items()}
    ranks = [
        context.Process(
            target=_rank, args=(rank, urls, repeats, barrier, results), name=f"storage-rank{rank}"
        )
        for rank in range(STORAGE_RANKS)
    ]
    for process in ranks:
        process.start()
    reports = []
    try:
        while len(reports) < len(ranks):
            try:
                reports.append(results.get(timeout=5))
            except queue.Empty:
                # A rank that died before reporting (killed, or failed to start) never will.
                dead = [p for p in ranks if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"bench storage: rank process {dead[0].name} exited with "
                        f"{dead[0].exitcode} before reporting"
                    ) from None
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    failed = [r["error"] for r in reports if "error" in r]
    if failed:
        raise RuntimeError(f"bench storage: a rank failed: {failed[0]}")
    names = reports[0]["seconds"].keys()
    return {
        name: [max(runs) for runs in zip(*(r["seconds"][name] for r in reports), strict=True)]
        for name in names
    }


def _rank(rank: int, urls: dict[str, str], repeats: int, barrier: Any, results: Any) -> None:
    """One rank: fit the fixed model on each feed in turn, runs aligned with the other rank."""
    try:
        results.put({"seconds": _rank_epochs(rank, urls, repeats, barrier)})
    except Exception as exc:  # reported to the parent, which fails with it
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _rank_epochs(
    rank: int, urls: dict[str, str], repeats: int, barrier: Any
) -> dict[str, list[float]]:
    from pipelines.host import limit_tf_threads

    limit_tf_threads(max(1, (os.cpu_count() or 2) // STORAGE_RANKS), 1)
    from pipelines.bench.timing import epoch_timer
    from pipelines.models import build_model
    from pipelines.train.feed import make_dataset, read_split, steps_per_epoch

    shape = (STORAGE_IMAGE_SIZE, STORAGE_IMAGE_SIZE, 3)
    cfg = TrainConfig(model=STORAGE_MODEL, batch_size=STORAGE_BATCH_SIZE, seed=0)
    arrays = read_split(next(iter(urls.values())), shape)
    steps = steps_per_epoch(len(arrays), STORAGE_RANKS, STORAGE_BATCH_SIZE)
    feeds: dict[str, Any] = {"memory": in_memory_dataset(arrays, batch_size=cfg.batch_size)}
    for storage, url in urls.items():
        feeds[storage] = make_dataset(
            url,
            image_shape=shape,
            batch_size=cfg.batch_size,
            cur_shard=rank,
            shard_count=STORAGE_RANKS,
            seed=1 + rank,
        )
    classes = len(arrays.label_names)
    models = {name: build_model(cfg, shape, classes) for name in feeds}
    for name, model in models.items():  # trace each train function, untimed
        model.fit(feeds[name], epochs=1, steps_per_epoch=1, verbose=0)
    seconds: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(repeats):
        for name, model in models.items():
            barrier.wait()
            timer = epoch_timer()
            model.fit(
                feeds[name],
                epochs=WARMUP_EPOCHS + 1,
                steps_per_epoch=steps,
                callbacks=[timer],
                verbose=0,
            )
            seconds[name].append(timer.seconds[-1])
    return seconds
