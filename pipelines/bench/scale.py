"""Scale benchmark: how the cost of ingest, scoring, training and listing grows with data.

In: a :class:`~pipelines.config.Config` (Spark session, stage settings), the sizes (3,000
and 30,000 generated images, 100,000 with ``max_size``; or ``images/10`` and ``images``),
repeats. Out: one :class:`~pipelines.bench.stats.Measurement` per stage and size, in
ms/image against the same stage's ms/image at the reference size (30,000, or ``images``;
training: the 1x digits), target ``<= 1.1`` at sizes above it; and ``list_tree``'s cost
extrapolated per million files. Each point's details hold its wall seconds, peak RSS and
CPU seconds per kind of process (:mod:`~pipelines.bench.processes`) and its output bytes;
:func:`format_scale_table` renders them.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import tracking
from pipelines.bench.data import (
    DATASET_CHANNELS,
    DATASET_IMAGE_SIZE,
    DATASET_SOURCE_SIZE,
    bench_dir,
    cached_jpegs,
    cached_photos,
    folder_ingest_config,
    read_once,
    scratch,
)
from pipelines.bench.ingest import INGEST_CHANNELS, INGEST_IMAGE_SIZE, INGEST_SOURCE_SIZE
from pipelines.bench.jobs import JobMark, median_timeline
from pipelines.bench.output import fixed_width
from pipelines.bench.photo_train import mobilenet_images_per_rank
from pipelines.bench.processes import KINDS, ProcessSampler, ProcessUsage
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes
from pipelines.config import Config, SplitConfig
from pipelines.errors import UserError
from pipelines.store import DatasetDir, replace_dir, sqlite_store

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("pipelines.bench")

#: Generated images per point; the second is the reference the others are set against.
SCALE_SIZES = (3_000, 30_000)
#: The extra point of ``--max``.
SCALE_MAX_SIZE = 100_000
#: Target: ms/image at the sizes above the reference at most this many times the reference's.
SCALE_TARGET_RATIO = 1.1
#: Training points: the bundled digits repeated this many times (the first is the reference).
TRAIN_COPIES = (1, 4)
#: Fixed epochs of every training point, so that only the data changes (and it is bounded).
TRAIN_EPOCHS = 2
#: Disk a generated image costs (blocks, not bytes): a 256x256 source, a 64x64 source, its
#: ingested row (64x64x3 .npy in Parquet) and its scoring-table row; a little over measured.
_SOURCE_BYTES = {INGEST_SOURCE_SIZE: 20 * 1024, DATASET_SOURCE_SIZE: 4 * 1024}
_OUTPUT_BYTES_PER_IMAGE = 17 * 1024
#: Free disk kept beyond the estimate.
_DISK_MARGIN = 1 << 30
#: Photo point: generated mixed-size RGB JPEGs ingested at 224x224x3, centre-cropped, in the
#: configured storage; a few minutes on 2 cores (``--photos 20000`` for the issue's size).
PHOTO_IMAGES = 600
PHOTO_SIDE = 224
#: Photos decoded in one process for the photo ingest's baseline.
_PHOTO_BASELINE_IMAGES = 100
#: Hooks adding training figures to the photo point (e.g. a backbone's images/s per rank):
#: each gets the config and the ingested photo dataset and returns its measurements.
PHOTO_TRAIN_POINTS: list[Callable[[Config, Path], list[Measurement]]] = [mobilenet_images_per_rank]


def scale_sizes(images: int | None, max_size: bool) -> tuple[int, ...]:
    """The generated-image sizes measured: the defaults, or ``(images // 10, images)``.

    With ``max_size`` a larger point is added: 100,000 by default, else ``images * 10 / 3``
    (the same step over the reference).
    """
    if images is None:
        return (*SCALE_SIZES, SCALE_MAX_SIZE) if max_size else SCALE_SIZES
    sizes = (max(1, images // 10), images)
    return (*sizes, round(images * SCALE_MAX_SIZE / SCALE_SIZES[1])) if max_size else sizes


def bench_scale(
    config: Config,
    *,
    images: int | None = None,
    repeats: int = 1,
    max_size: bool = False,
    digits: int | None = None,
    train: bool = True,
    photos: int = PHOTO_IMAGES,
) -> list[Measurement]:
    """Ingest, score, train and list at growing sizes; per-image cost against the reference.

    - ``ingest``: :func:`pipelines.ingest.ingest` of N generated 256x256 JPEGs to 64x64 RGB
      (the ingest benchmark's geometry); output: the prepared dataset's bytes;
    - ``score``: :func:`pipelines.score.score` of N generated 64x64 JPEGs with the score
      benchmark's untrained ``mnist_cnn`` (logged to a temporary MLflow store); output: the
      scoring table's bytes;
    - ``train``: :func:`pipelines.pipeline.train_stage` (Horovod ranks, evaluation, run
      report, MLflow logging and registration, in a temporary store) for ``TRAIN_EPOCHS``
      epochs on the bundled digits ingested as they are and with every file repeated 4
      times (extra files in the same class folders); per-image cost over the dataset's
      images; run once per point (a launch is long); output: the training folder's bytes;
    - ``list``: :func:`pipelines.listing.list_tree` on each ingest source tree, as ingest
      and scoring call it (names only, no ``stat``): seconds
      (median of ``repeats``) and peak Python memory (tracemalloc), per million files;
    - ``photo``: ``photos`` generated RGB JPEGs of mixed sizes (200-640 px, both
      orientations) ingested at 224x224x3 with ``resize: crop`` in ``ingest.storage``:
      images/s against :func:`~pipelines.images.decode_image` in one process, dataset bytes
      per image against the source's, and the 2-rank feed epoch against in-memory
      (:func:`~pipelines.bench.storage.feed_epochs`); then :data:`PHOTO_TRAIN_POINTS`.

    Every point runs inside a :class:`~pipelines.bench.processes.ProcessSampler`: peak RSS
    and CPU seconds of the driver, the JVM, the Python workers and the Horovod ranks go to
    its details. Warm-up first (the smallest ingest and two scorings of the smallest set,
    untimed). Generated data is cached under ``<work_dir>/bench``; outputs are removed.

    Args:
        config: Spark session and stage settings (``train.model``, ``train.num_proc``, ...).
        images: Reference size; sizes are ``(images // 10, images)``. None: 3,000, 30,000.
        repeats: Runs per ingest and score point (median seconds; peaks over all runs).
        max_size: Add the largest point (100,000, or ``images * 10 / 3``).
        digits: Use only this many bundled digits as 1x, every class kept (tests); None: all.
        train: Measure the training points.
        photos: Photos of the photo point (0: none).

    Returns:
        Per stage and size, ms/image against the reference (target ``<= 1.1`` above it),
        then ``list_tree`` seconds and MiB per million files at the largest tree.

    Raises:
        UserError: Sizes below 1, repeats below 1, or too little free disk for the data.
    """
    sizes = scale_sizes(images, max_size)
    check_sizes("scale", min(sizes), repeats)
    if digits is not None and digits < 10:
        raise UserError(f"bench scale: digits must be >= 10, got {digits}")
    check_disk(config, sizes)
    reference = sizes[1]
    results = [
        *_ingest_points(config, sizes, reference, repeats),
        *_score_points(config, sizes, reference, repeats),
    ]
    if train:
        results += _train_points(config, digits)
    results += _listing(config, sizes, repeats)
    if photos:
        results += photo_points(config, photos, repeats)
    return results


def photo_points(config: Config, photos: int, repeats: int = 1) -> list[Measurement]:
    """The photo point: ingest speed, bytes per image, 2-rank feed epoch (see bench_scale)."""
    from pipelines.bench.storage import feed_epochs
    from pipelines.images import decode_image
    from pipelines.ingest import ingest
    from pipelines.spark import get_spark

    check_sizes("scale photos", photos, repeats, minimum=32)
    source = read_once(cached_photos(config, photos))
    files = sorted(source.rglob("*.jpg"))
    source_bytes = sum(p.stat().st_size for p in files) / len(files)
    cfg = replace(
        folder_ingest_config(config, PHOTO_SIDE, 3),
        resize="crop",
        splits=SplitConfig(),
        rows_per_row_group=16,
    )
    spark = get_spark(config.spark)
    sample = files[:_PHOTO_BASELINE_IMAGES]
    with scratch(config) as work:
        ingest(spark, cfg, cached_photos(config, 32), work / "warm")  # JVM and workers up
        seconds, baseline = [], []
        with ProcessSampler() as sampler:
            for i in range(repeats):
                start = time.perf_counter()
                result = ingest(spark, cfg, source, work / f"photos-{i}")
                seconds.append(time.perf_counter() - start)
                start = time.perf_counter()
                for path in sample:
                    decode_image(path.read_bytes(), PHOTO_SIDE, 3, "crop")
                baseline.append(len(sample) / (time.perf_counter() - start))
        dataset = work / f"photos-{repeats - 1}"
        output = _du(dataset)
        stored = sum(p.stat().st_size for p in dataset.rglob("*.parquet")) / result.ingested
        epochs = feed_epochs({cfg.storage: dataset}, repeats)
        extra = [m for point in PHOTO_TRAIN_POINTS for m in point(config, dataset)]
    details = {
        "stage": "photo",
        "photos": photos,
        "ingested": result.ingested,
        "image_shape": [PHOTO_SIDE, PHOTO_SIDE, 3],
        "resize": cfg.resize,
        "storage": cfg.storage,
        "jpeg_quality": cfg.jpeg_quality,
        "source": "generated RGB JPEGs q90, 200-640 px sides, mixed orientations",
        "seconds": statistics.median(seconds),
        "repeats": repeats,
        "processes": sampler.usage.describe(),
        "output_bytes": output,
    }
    return [
        pair(
            "scale",
            f"photo ingest {photos:,} images",
            [photos / s for s in seconds],
            "decode_image, 1 process",
            baseline,
            unit="images/s",
            details=details,
        ),
        pair(
            "scale",
            f"photo dataset {cfg.storage} bytes/image",
            [stored],
            "source JPEG bytes/image",
            [source_bytes],
            unit="bytes/image",
            details={**details, "raw_pixel_bytes": PHOTO_SIDE * PHOTO_SIDE * 3},
        ),
        pair(
            "scale",
            f"photo feed epoch {cfg.storage}, 2 ranks",
            epochs[cfg.storage],
            "in-memory epoch",
            epochs["memory"],
            unit="s/epoch",
            target="<= 1.1",
            details=details,
        ),
        *extra,
    ]


def check_disk(config: Config, sizes: tuple[int, ...]) -> None:
    """Fail before any work when the generated sets and outputs would not fit on disk.

    Raises:
        UserError: Free space under ``<work_dir>/bench`` is below the estimate plus 1 GiB.
    """
    root = bench_dir(config)
    need = max(sizes) * _OUTPUT_BYTES_PER_IMAGE  # outputs are removed after every point
    for size in sizes:
        for side, per_image in _SOURCE_BYTES.items():
            if not (root / _jpeg_set_name(size, side)).is_dir():
                need += size * per_image
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + _DISK_MARGIN:
        raise UserError(
            f"bench scale: needs about {(need + _DISK_MARGIN) / 2**30:.1f} GiB free under "
            f"{root}, {free / 2**30:.1f} GiB are; free space or use fewer --images"
        )


def _jpeg_set_name(count: int, side: int) -> str:
    """The folder name :func:`~pipelines.bench.data.cached_jpegs` gives a set."""
    from pipelines.bench.data import DATASET_CLASSES, GENERATOR_VERSION

    return f"jpeg-v{GENERATOR_VERSION}-{count}x{side}-c{DATASET_CLASSES}-s0"


#: One point: run seconds, output bytes, images, process usage, extra details.
_Point = tuple[list[float], int, int, ProcessUsage, dict[str, Any]]


def _points(
    stage: str, sizes: tuple[int, ...], reference: int, run: Callable[[Any], _Point]
) -> list[Measurement]:
    """Run ``stage`` at every size; one measurement per size against the reference."""
    figures = {}
    for size in sizes:
        seconds, output, count, usage, extra = run(size)
        figures[size] = (seconds, output, count, usage, extra)
        log.info(
            "bench scale: %s %d images: %.2fs (%.3g ms/image), output %.1f MiB",
            stage,
            count,
            statistics.median(seconds),
            1000 * statistics.median(seconds) / count,
            output / 2**20,
        )
    _add_driver_cost_per_file(figures)
    ref_seconds, _, ref_count, _, _ = figures[reference]
    ref_cost = [1000 * s / ref_count for s in ref_seconds]
    return [_point(stage, size, reference, ref_count, ref_cost, *figures[size]) for size in sizes]


def _add_driver_cost_per_file(figures: dict[int, _Point]) -> None:
    """Add the driver's seconds per million files before the first task, to every point.

    The slope of the time to the first task between the smallest and the largest size:
    the serial driver work (listing, planning, shipping the listing) that grows with N.
    """
    fixed = {size: point[4].get("fixed_cost") for size, point in figures.items()}
    small, large = min(figures), max(figures)
    if small == large or not fixed[small] or not fixed[large]:
        return
    slope = (fixed[large]["to_first_task_s"] - fixed[small]["to_first_task_s"]) / (large - small)
    for point in figures.values():
        point[4]["driver_s_per_million_files"] = round(slope * 1e6, 2)


def _point(
    stage: str,
    size: int,
    reference: int,
    ref_count: int,
    ref_cost: list[float],
    seconds: list[float],
    output: int,
    count: int,
    usage: ProcessUsage,
    extra: dict[str, Any],
) -> Measurement:
    target = f"<= {SCALE_TARGET_RATIO}" if size > reference else ""
    details = {
        "stage": stage,
        "size": size,
        "images": count,
        "reference_images": ref_count,
        "repeats": len(seconds),
        "seconds": statistics.median(seconds),
        "output_bytes": output,
        "processes": usage.describe(),
        **extra,
    }
    return pair(
        "scale",
        f"{stage} {count:,} images",
        [1000 * s / count for s in seconds],
        f"{stage} {ref_count:,} images",
        ref_cost,
        unit="ms/image",
        target=target,
        details=details,
    )


def _ingest_points(
    config: Config, sizes: tuple[int, ...], reference: int, repeats: int
) -> list[Measurement]:
    """Ingest at every size, after an untimed ingest of the smallest set."""
    from pipelines.ingest import ingest
    from pipelines.spark import get_spark

    cfg = folder_ingest_config(config, INGEST_IMAGE_SIZE, INGEST_CHANNELS)
    spark = get_spark(config.spark)
    extra = {"source": f"{INGEST_SOURCE_SIZE}x{INGEST_SOURCE_SIZE} JPEG q90"}
    with scratch(config) as work:
        # JVM hot paths compiled, Python workers up: not part of any point.
        warm = cached_jpegs(config, min(sizes), INGEST_SOURCE_SIZE)
        log.info("bench scale: warming up ingest on %s", warm)
        ingest(spark, cfg, warm, work / "warm")
        shutil.rmtree(work / "warm", ignore_errors=True)

        def once(size: int, source: Path, out: Path) -> int:
            done = ingest(spark, cfg, source, out).ingested
            if done != size:
                raise RuntimeError(f"bench scale: ingest wrote {done} of {size} images")
            return _du(out)

        def run(size: int) -> _Point:
            source = read_once(cached_jpegs(config, size, INGEST_SOURCE_SIZE))
            return _sampled(size, repeats, lambda out: once(size, source, out), work, extra, spark)

        return _points("ingest", sizes, reference, run)


def _score_points(
    config: Config, sizes: tuple[int, ...], reference: int, repeats: int
) -> list[Measurement]:
    """Score at every size with one logged model, after two untimed scorings."""
    from pipelines.bench.score import scoring_store
    from pipelines.score import score
    from pipelines.spark import get_spark

    spark = get_spark(config.spark)
    extra = {
        "source": f"{DATASET_SOURCE_SIZE}x{DATASET_SOURCE_SIZE} JPEG q90",
        "model": f"mnist_cnn on {DATASET_IMAGE_SIZE}x{DATASET_IMAGE_SIZE}x{DATASET_CHANNELS}",
    }
    with scoring_store(config) as (work, cfg):

        def once(size: int, source: Path, table: Path) -> int:
            result = score(spark, cfg, str(source), table=str(table), batch_id="bench")
            if result.rows != size or result.errors:
                raise RuntimeError(
                    f"bench scale: scoring gave {result.rows} rows "
                    f"({result.errors} errors) for {size} images"
                )
            return _du(table)

        warm = cached_jpegs(config, min(sizes), DATASET_SOURCE_SIZE)
        log.info("bench scale: warming up score on %s", warm)
        # Twice: the first job's workers load the model; the second shows them reused.
        for i in range(2):
            once(min(sizes), warm, work / f"warm-{i}")

        def run(size: int) -> _Point:
            source = read_once(cached_jpegs(config, size, DATASET_SOURCE_SIZE))
            return _sampled(size, repeats, lambda out: once(size, source, out), work, extra, spark)

        return _points("score", sizes, reference, run)


def _sampled(
    size: int,
    repeats: int,
    once: Callable[[Path], int],
    work: Path,
    extra: dict[str, Any],
    spark: SparkSession,
) -> _Point:
    """``repeats`` timed calls of ``once(output)`` inside one process sampler.

    ``extra`` gains the jobs' ``fixed_cost`` (see :mod:`pipelines.bench.jobs`).
    """
    seconds, output, timelines = [], 0, []
    with ProcessSampler() as sampler:
        for i in range(repeats):
            out = work / f"out-{size}-{i}"
            mark = JobMark(spark)
            start = time.perf_counter()
            output = once(out)
            seconds.append(time.perf_counter() - start)
            if timeline := mark.timeline():
                timelines.append(timeline)
            shutil.rmtree(out, ignore_errors=True)
    extra = {**extra, "fixed_cost": median_timeline(timelines)}
    return seconds, output, size, sampler.usage, extra  # type: ignore[return-value]


def _train_points(config: Config, digits: int | None) -> list[Measurement]:
    """The training stage on 1x and 4x the bundled digits, same model, same epochs."""
    from pipelines.demo import DEMO_IMAGES
    from pipelines.pipeline import train_stage

    count = digits or DEMO_IMAGES
    datasets = {copies: digits_dataset(config, count, copies) for copies in TRAIN_COPIES}

    def run(copies: int) -> _Point:
        path, rows = datasets[copies]
        with scratch(config) as work:
            cfg = _train_config(config, work)
            with tracking.pointed_at(cfg.mlflow.tracking_uri), ProcessSampler() as sampler:
                start = time.perf_counter()
                result = train_stage(cfg, dataset=str(path))
                seconds = time.perf_counter() - start
            output = _du(work)  # checkpoints, MLflow store, model and run report
        extra = {
            "copies": copies,
            "dataset": str(path),
            "dataset_bytes": _du(path),
            "rows": rows,
            "epochs": TRAIN_EPOCHS,
            "model": cfg.train.model,
            "num_proc": cfg.train.num_proc,
            "launcher": cfg.train.launcher,
            "run_id": result.run_id,
        }
        return [seconds], output, sum(rows.values()), sampler.usage, extra  # type: ignore[return-value]

    return _points("train", TRAIN_COPIES, TRAIN_COPIES[0], run)


def _train_config(config: Config, work: Path) -> Config:
    """``config`` training for ``TRAIN_EPOCHS`` epochs into a temporary store under ``work``."""
    return replace(
        config,
        work_dir=str(work),
        mlflow=replace(config.mlflow, tracking_uri=sqlite_store(work), registry_uri=None),
        train=replace(config.train, epochs=TRAIN_EPOCHS, early_stopping_patience=0),
    )


def digits_dataset(
    config: Config, count: int, copies: int, storage: str | None = None
) -> tuple[Path, dict[str, int]]:
    """``count`` digits (every class), each file ``copies`` times, ingested once (cached).

    ``storage``: the cells' encoding (``ingest.storage``), default the config's.
    """
    from pipelines.demo import write_demo_digits
    from pipelines.ingest import ingest
    from pipelines.spark import get_spark

    root = bench_dir(config)
    digits = write_demo_digits(root / "digits").path
    source = root / f"digits-{count}x{copies}"
    if not source.is_dir():
        _repeat_files(digits, source, count, copies)
    side = config.ingest.image_size
    channels = config.ingest.channels
    rows_per_group = config.ingest.rows_per_row_group
    storage = storage or config.ingest.storage
    name = f"prepared-digits-{count}x{copies}-{side}x{channels}-rg{rows_per_group}-{storage}"
    path = root / name
    if not (path / DatasetDir.MANIFEST_FILE).is_file():
        cfg = replace(
            folder_ingest_config(config, side, channels), splits=SplitConfig(), storage=storage
        )
        log.info("bench scale: ingesting %d digits x%d into %s (cached)", count, copies, path)
        ingest(get_spark(config.spark), cfg, source, path)
    return path, dict(DatasetDir(str(path)).read_manifest().splits)


def _repeat_files(digits: Path, out: Path, count: int, copies: int) -> None:
    """Link (or copy) ``count`` digit files ``copies`` times into their class folders.

    The files are taken from the classes in turn, so that a subset keeps every class.
    """
    import uuid

    by_class = [sorted(p for p in c.iterdir() if p.is_file()) for c in sorted(digits.iterdir())]
    turns = [(i, k) for k, files in enumerate(by_class) for i in range(len(files))]
    files = [by_class[k][i] for i, k in sorted(turns)[:count]]
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for path in files:
            folder = tmp / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(copies):
                target = folder / f"copy{k}_{path.name}"
                try:
                    os.link(path, target)
                except OSError:  # another file system, or no hard links: copy
                    shutil.copyfile(path, target)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _listing(config: Config, sizes: tuple[int, ...], repeats: int) -> list[Measurement]:
    """``list_tree`` seconds and peak memory per million files, on every ingest source."""
    per_size = {
        size: _list_cost(cached_jpegs(config, size, INGEST_SOURCE_SIZE), repeats) for size in sizes
    }
    for size, (seconds, mib) in per_size.items():
        log.info(
            "bench scale: list_tree %d files: %.3g s and %.3g MiB per million files",
            size,
            statistics.median(seconds),
            mib,
        )
    largest, smallest = max(sizes), min(sizes)
    details = {
        "files": largest,
        "per_size": {
            str(size): {
                "seconds_per_million": round(statistics.median(s), 4),
                "mib_per_million": round(m, 2),
            }
            for size, (s, m) in per_size.items()
        },
        "measures": "list_tree wall seconds (median) and tracemalloc peak, scaled to 1e6 files",
        "repeats": repeats,
    }
    seconds, mib = per_size[largest]
    base_seconds, base_mib = per_size[smallest]
    return [
        pair(
            "scale",
            f"list_tree {largest:,} files",
            seconds,
            f"list_tree {smallest:,} files",
            base_seconds,
            unit="s/1e6 files",
            details=details,
        ),
        pair(
            "scale",
            f"list_tree {largest:,} files memory",
            [mib],
            f"list_tree {smallest:,} files memory",
            [base_mib],
            unit="MiB/1e6 files",
            details={**details, "repeats": 1},
        ),
    ]


def _list_cost(source: Path, repeats: int) -> tuple[list[float], float]:
    """Seconds per million files of each listing, and the peak MiB per million files.

    Timed without tracemalloc (it slows every allocation); the memory from one more call
    under it: the peak of what the listing allocates, its result included.
    """
    import tracemalloc

    from pipelines.listing import list_tree

    # As ingest and scoring list: by name, no stat per file.
    files = len(list_tree(source, sizes=False).images)  # also warms the directory cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        list_tree(source, sizes=False)
        seconds.append((time.perf_counter() - start) * 1e6 / files)
    tracemalloc.start()
    try:
        listing = list_tree(source, sizes=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del listing
    return seconds, peak / 2**20 * 1e6 / files


def _du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def format_scale_table(report: dict[str, Any]) -> str:
    """The scale points of a report as a fixed-width table: time, cost, memory, CPU, output.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned for ``scale``.

    Returns:
        The table (no trailing newline); empty when the report has no scale points.
    """
    headers, rows = scale_cells(report)
    return fixed_width(headers, rows, range(1, len(headers))) if rows else ""


def scale_cells(report: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The headers and one row of cells per scale point of a report (none: no rows)."""
    kinds = [k for k in KINDS if k != "other"]
    short = {"driver": "driver", "jvm": "jvm", "python_worker": "worker", "horovod_rank": "rank"}
    headers = ("point", "seconds", "ms/image", "vs ref", "target", "met")
    headers += tuple(f"{short[k]} MiB" for k in kinds)
    headers += tuple(f"{short[k]} cpu s/run" for k in kinds)
    headers += ("output MiB",)
    rows = []
    for r in report["results"]:
        d = r["details"]
        if r["benchmark"] != "scale" or "stage" not in d:
            continue
        procs = d["processes"]
        rows.append(
            (
                r["measured"],
                f"{d['seconds']:.2f}",
                f"{r['value']:.3g}",
                f"{r['ratio']:.2f}x",
                r["target"] or "-",
                "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
                *(_cell(procs, k, "peak_rss_mib") for k in kinds),
                *(_cell(procs, k, "cpu_seconds", d["repeats"]) for k in kinds),
                f"{d['output_bytes'] / 2**20:.3g}",
            )
        )
    return headers, rows


def _cell(processes: dict[str, Any], kind: str, key: str, runs: int = 1) -> str:
    """One kind's figure, per run (the sampler covers all runs of a point), or ``-``."""
    return f"{processes[kind][key] / runs:.1f}" if kind in processes else "-"
