"""Ingest benchmark: Spark ingest against the single-process loops a user would write.

In: a :class:`~pipelines.config.Config` (Spark session, ingest settings), a number of
generated 256x256 JPEGs and repeats. Out: two :class:`~pipelines.bench.stats.Measurement`
records, Spark's images/s over a plain PIL loop's (target >= 1.6 on 2 cores) and over the
ingest's own decode function run in one process (parallel efficiency).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import schema
from pipelines.bench.data import (
    bench_dir,
    cached_jpegs,
    folder_ingest_config,
    read_once,
    scratch,
)
from pipelines.bench.jobs import JobMark, JobTimeline, median_timeline
from pipelines.bench.processes import ProcessSampler
from pipelines.bench.stats import Measurement, pair, with_parallel_efficiency
from pipelines.bench.timing import check_sizes, tree_cpu_seconds
from pipelines.config import Config

log = logging.getLogger("pipelines.bench")

#: Ingest benchmark geometry: 256x256 JPEGs in, 64x64 RGB out.
INGEST_SOURCE_SIZE = 256
INGEST_IMAGE_SIZE = 64
INGEST_CHANNELS = 3
#: Default number of source images.
INGEST_IMAGES = 3000
#: Target of Spark ingest over the plain single-process loop, on 2 cores.
INGEST_TARGET_RATIO = 1.6


def bench_ingest(
    config: Config, *, images: int = INGEST_IMAGES, repeats: int = 3
) -> list[Measurement]:
    """Spark ingest against the single-process loops that write the same Parquet rows.

    On ``images`` generated 256x256 JPEGs in four class folders, each resized to 64x64 RGB:

    - measured: :func:`pipelines.ingest.ingest` end to end (driver listing, decode on the
      executors, three Petastorm split datasets, quarantine, manifest) on the session of
      ``config.spark``; images/s = images ingested / wall seconds;
    - baseline ``plain PIL loop``: what a user would write, one process: list the tree, for
      each file ``Image.open(path).convert("RGB").resize((64, 64))``, ``np.save``-encode,
      and write ``image, label, label_name, path, split`` to one Parquet file per split
      with pyarrow, in row groups of ``ingest.rows_per_row_group`` rows;
    - baseline ``decode_image, 1 process``: the same loop around the ingest's own
      :func:`pipelines.images.decode_image` (JPEG draft mode). Its ratio is the speed-up
      from parallelism alone; divided by the task slots it is the parallel efficiency.

    Ratios are Spark's images/s over the baseline's; the target (>= 1.6 on 2 cores) is
    against the plain loop. Spark, Python workers and the page cache are warmed up on a
    small separate set first, and the measured set is read once; the three are then run
    ``repeats`` times, interleaved, and the medians reported. Outputs go to a temporary
    directory under ``<work_dir>/bench``, removed afterwards.

    Args:
        config: The Spark session settings and the ingest settings (row-group size,
            partitions, Arrow batch size); image size and channels are fixed to 64 and 3.
        images: Number of source images.
        repeats: Measured runs of each.

    Returns:
        Two measurements: Spark over the plain loop, and Spark over the same function in
        one process.

    Raises:
        UserError: ``images`` or ``repeats`` is below 1.
    """
    from pipelines.ingest import ingest
    from pipelines.spark import get_spark

    check_sizes("ingest", images, repeats)
    cfg = folder_ingest_config(config, INGEST_IMAGE_SIZE, INGEST_CHANNELS)
    source = read_once(cached_jpegs(config, images, INGEST_SOURCE_SIZE))
    # A third of the data (at most 1,000 images): JVM hot paths compiled, Python workers up.
    warm_source = cached_jpegs(config, max(8, min(1000, images // 3)), INGEST_SOURCE_SIZE)
    spark = get_spark(config.spark)
    slots = spark.sparkContext.defaultParallelism

    def run_spark(src: Path, out: Path) -> int:
        return ingest(spark, cfg, src, out).ingested

    def cell(pixels: np.ndarray) -> bytes:
        # The loops store cells as ingest does (ingest.storage), so they do the same work.
        return schema.encode_cell(pixels, cfg.storage, cfg.jpeg_quality)

    def run_plain(src: Path, out: Path) -> int:
        return _loop_ingest(src, out, _plain_pil, cell, cfg.rows_per_row_group, cfg.splits)

    def run_same(src: Path, out: Path) -> int:
        return _loop_ingest(src, out, _same_function, cell, cfg.rows_per_row_group, cfg.splits)

    runs = {"spark": run_spark, "plain": run_plain, "same": run_same}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    timelines: list[JobTimeline] = []
    with scratch(config) as work:
        log.info("bench ingest: warming up on %s", warm_source)
        for name, run in runs.items():
            run(warm_source, work / f"warm-{name}")
        for i in range(repeats):
            for name, run in runs.items():
                out = work / f"{name}-{i}"
                mark = JobMark(spark)
                cpu_start, start = tree_cpu_seconds(), time.perf_counter()
                done = run(source, out)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(tree_cpu_seconds() - cpu_start)
                if name == "spark" and (timeline := mark.timeline()):
                    timelines.append(timeline)
                if done != images:
                    raise RuntimeError(f"bench ingest: {name} wrote {done} of {images} images")
                shutil.rmtree(out, ignore_errors=True)
                log.info("bench ingest: %s run %d: %.2fs", name, i + 1, seconds[name][-1])
        # One more Spark ingest, untimed, under the process sampler: where its CPU goes.
        with ProcessSampler() as sampler:
            run_spark(source, work / "sampled")

    rates = {name: [images / s for s in runs_s] for name, runs_s in seconds.items()}
    details = {
        "images": images,
        "repeats": repeats,
        "source": f"{INGEST_SOURCE_SIZE}x{INGEST_SOURCE_SIZE} JPEG q90",
        "output": f"{INGEST_IMAGE_SIZE}x{INGEST_IMAGE_SIZE}x{INGEST_CHANNELS}",
        "spark_master": spark.sparkContext.master,
        "task_slots": slots,
        "rows_per_row_group": cfg.rows_per_row_group,
        "cache": str(bench_dir(config)),
        "seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        # CPU seconds of this process and its children (the local JVM and Python workers):
        # unlike wall time, barely moved by other load on the machine.
        "cpu_seconds": {name: round(statistics.median(c), 3) for name, c in cpu.items()},
        # Per kind of process (driver, JVM, Python workers) for that one more Spark ingest.
        "processes": sampler.usage.describe() if sampler.usage else {},
        # Medians over the Spark runs: driver time before the first task and after the last.
        "fixed_cost": median_timeline(timelines),
    }
    against_plain = pair(
        "ingest",
        "spark ingest",
        rates["spark"],
        "plain PIL loop",
        rates["plain"],
        unit="images/s",
        target=f">= {INGEST_TARGET_RATIO}",
        details=details,
    )
    against_same = pair(
        "ingest",
        "spark ingest",
        rates["spark"],
        "decode_image, 1 process",
        rates["same"],
        unit="images/s",
        details=details,
    )
    same = with_parallel_efficiency(
        against_same,
        slots,
        baseline_wall_s=statistics.median(seconds["same"]),
        baseline_cpu_s=statistics.median(cpu["same"]),
    )
    return [against_plain, same]


def _plain_pil(path: Path) -> np.ndarray:
    """What a user would write: open, convert, resize."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((INGEST_IMAGE_SIZE, INGEST_IMAGE_SIZE)))


def _same_function(path: Path) -> np.ndarray:
    """The ingest's own decode, reading the whole file first as its executors do."""
    from pipelines.images import decode_image

    return decode_image(path.read_bytes(), INGEST_IMAGE_SIZE, INGEST_CHANNELS)


def _loop_ingest(
    source: Path,
    out: Path,
    decode: Callable[[Path], np.ndarray],
    cell: Callable[[np.ndarray], bytes],
    rows_per_group: int,
    splits: Any,
) -> int:
    """One process: list the class folders, decode each file, write Parquet per split.

    The split of a file comes from a stable hash of its relative path with the configured
    fractions (CRC-32 here, not Spark's xxhash64: the work is the same, the exact
    membership may differ). Returns the number of images written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    names = sorted({p.relative_to(source).parts[0] for p in files})
    labels = {name: i for i, name in enumerate(names)}
    arrow_schema = schema.prepared_arrow_schema()
    writers: dict[str, pq.ParquetWriter] = {}
    pending: dict[str, list[tuple]] = {name: [] for name in schema.SPLITS}

    def flush(split: str) -> None:
        rows = pending[split]
        if not rows:
            return
        if split not in writers:
            folder = out / f"{schema.SPLIT}={split}"
            folder.mkdir(parents=True, exist_ok=True)
            writers[split] = pq.ParquetWriter(folder / "part-0.parquet", arrow_schema)
        columns = list(zip(*rows, strict=True))
        table = pa.Table.from_arrays(
            [pa.array(col, type=f.type) for col, f in zip(columns, arrow_schema, strict=True)],
            schema=arrow_schema,
        )
        writers[split].write_table(table, row_group_size=rows_per_group)
        pending[split] = []

    written = 0
    try:
        for path in files:
            rel = path.relative_to(source).as_posix()
            label_name = rel.split("/")[0]
            bucket = (zlib.crc32(rel.encode()) % 1_000_000) / 1_000_000.0
            split = (
                "train"
                if bucket < splits.train
                else "val"
                if bucket < splits.train + splits.val
                else "test"
            )
            pending[split].append(
                (cell(decode(path)), labels[label_name], label_name, str(path), split)
            )
            written += 1
            if len(pending[split]) == rows_per_group:
                flush(split)
        for split in schema.SPLITS:
            flush(split)
    finally:
        for writer in writers.values():
            writer.close()
    return written
