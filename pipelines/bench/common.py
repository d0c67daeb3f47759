"""What every benchmark shares: the measurement record, machine facts, data, timing, output.

In: measured figures from the benchmark modules (:mod:`~pipelines.bench.ingest`,
:mod:`~pipelines.bench.feed`, ...). Out: :class:`Measurement` records (a median figure
next to the median of its baseline from the same run, their ratio, the target), machine
facts to record beside them, a fixed-width table (:func:`format_table`) and CSV rows
(:func:`append_csv`).

Generated data is cached under ``<work_dir>/bench/`` and reused by later runs:
:func:`generate_jpegs` writes photo-like JPEGs, :func:`prepared_dataset` ingests such a
set (with the project's own Spark ingest) into the Petastorm dataset the feed, reader and
train benchmarks read. Nothing heavy (TensorFlow, Spark) is imported at module import.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import schema
from pipelines.config import Config, IngestConfig, SplitConfig
from pipelines.errors import UserError
from pipelines.host import git_commit

log = logging.getLogger("pipelines.bench")

#: Bumped whenever :func:`generate_jpegs` draws different pictures (invalidates caches).
GENERATOR_VERSION = 1

#: The dataset the feed, reader, train and score benchmarks share: JPEGs of this side,
#: ingested at 28x28 grey (the Keras MNIST convnet's input), in four class folders.
DATASET_SOURCE_SIZE = 64
DATASET_IMAGE_SIZE = 28
DATASET_CHANNELS = 1
DATASET_CLASSES = 4
#: Default number of images of that dataset (about 4,000 training rows).
DATASET_IMAGES = 5000

#: Columns of the CSV history, in order.
CSV_COLUMNS = (
    "timestamp",
    "commit",
    "cores",
    "benchmark",
    "measured",
    "value",
    "unit",
    "baseline",
    "baseline_value",
    "ratio",
    "target",
    "met",
)


@dataclass(frozen=True)
class Measurement:
    """One measured figure next to its baseline from the same run.

    Attributes:
        benchmark: Benchmark name (``ingest``, ``feed``, ...).
        measured: What was measured, e.g. ``spark ingest``.
        value: Median of the measured runs, in ``unit``.
        unit: Unit of ``value`` and ``baseline_value``, e.g. ``images/s`` or ``s/epoch``.
        baseline: What ``value`` is compared with, e.g. ``plain PIL loop``.
        baseline_value: Median of the baseline runs, in ``unit``.
        ratio: ``value / baseline_value``. For a throughput above 1 means faster than the
            baseline; for a time (``s/...``) below 1 does.
        target: The ratio aimed for, e.g. ``>= 1.6`` or ``<= 1.1``; empty when the figure
            is informative only.
        met: Whether ``ratio`` meets ``target``; None without a target.
        details: Run-by-run figures and settings (JSON-ready).
    """

    benchmark: str
    measured: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    target: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)


def pair(
    benchmark: str,
    measured: str,
    values: Sequence[float],
    baseline: str,
    baseline_values: Sequence[float],
    *,
    unit: str,
    target: str = "",
    details: Mapping[str, Any] | None = None,
) -> Measurement:
    """A :class:`Measurement` from run-by-run figures: medians, their ratio, the verdict.

    Args:
        benchmark: Benchmark name.
        measured: What ``values`` measure.
        values: One figure per measured run, in ``unit``.
        baseline: What ``baseline_values`` measure.
        baseline_values: One figure per baseline run, in ``unit``.
        unit: Unit of both.
        target: ``>= x`` or ``<= x`` on the ratio, or empty.
        details: Extra JSON-ready facts; the run-by-run figures are added as ``runs``.

    Returns:
        The measurement.

    Raises:
        ValueError: No figures, a baseline median that is not positive, or a malformed
            target.
    """
    if not values or not baseline_values:
        raise ValueError(f"bench {benchmark}: no runs of {measured!r} or {baseline!r}")
    value = statistics.median(values)
    base = statistics.median(baseline_values)
    if base <= 0:
        raise ValueError(f"bench {benchmark}: baseline {baseline!r} measured {base} {unit}")
    ratio = value / base
    runs = {"measured": _rounded(values), "baseline": _rounded(baseline_values)}
    return Measurement(
        benchmark=benchmark,
        measured=measured,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_value=base,
        ratio=ratio,
        target=target,
        met=meets(ratio, target),
        details={**(details or {}), "runs": runs},
    )


def meets(ratio: float, target: str) -> bool | None:
    """Whether ``ratio`` meets a target such as ``>= 1.6`` or ``<= 1.1``; None without one.

    Raises:
        ValueError: The target is neither empty nor ``>= x`` / ``<= x``.
    """
    if not target:
        return None
    op, _, number = target.partition(" ")
    if op not in (">=", "<=") or not number:
        raise ValueError(f"a target is '>= x' or '<= x', got {target!r}")
    bound = float(number)
    return ratio >= bound if op == ">=" else ratio <= bound


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


# --- timing ----------------------------------------------------------------------------------


def interleaved(
    benchmark: str, runs: Mapping[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Call every run once per repeat, in turn, and collect the figure each returns.

    Interleaving (A, B, A, B, ... rather than A, A, B, B) lets a neighbour's load on the
    machine affect a measurement and its baseline alike.

    Args:
        benchmark: Benchmark name, for the log.
        runs: Name -> a callable that runs once and returns its figure (e.g. seconds).
        repeats: Rounds.

    Returns:
        Name -> one figure per round.
    """
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            figures[name].append(float(run()))
            log.info(
                "bench %s: %s run %d/%d: %.4g", benchmark, name, i + 1, repeats, figures[name][-1]
            )
    return figures


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(wall seconds, result)`` of calling ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants.

    Covers a local Spark's JVM and Python workers; processes that ended in between are
    missed, so it is a lower bound.
    """
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def epoch_timer() -> Any:
    """A Keras callback recording the wall seconds of every epoch in ``.seconds``.

    Put it last in the callback list: Keras calls callbacks in order, so the epoch's end
    is taken after every other callback's end-of-epoch work (e.g. Horovod's metric
    averaging), which is part of the epoch's cost.
    """
    from pipelines.keras_api import keras

    class EpochTimer(keras().callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def check_sizes(benchmark: str, images: int, repeats: int, minimum: int = 1) -> None:
    """Refuse sizes a benchmark cannot run with.

    Raises:
        UserError: ``images`` below ``minimum`` or ``repeats`` below 1.
    """
    if images < minimum or repeats < 1:
        raise UserError(
            f"bench {benchmark}: --images must be >= {minimum} and repeats >= 1, "
            f"got {images} and {repeats}"
        )


# --- machine facts ---------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """Facts to record beside the numbers: cores, memory, load, versions, platform, time.

    Versions come from the installed distributions' metadata; nothing heavy (TensorFlow,
    Horovod) is imported. A package that is not installed has version None.

    Returns:
        A JSON-ready dict.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    memory = _memory_bytes()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "load_avg": load,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "pyspark": _version("pyspark"),
        "pyarrow": _version("pyarrow"),
        "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
        "petastorm": _version("petastorm"),
        "horovod": _version("horovod"),
        "mlflow": _version("mlflow"),
        "platform": platform.platform(),
        "timestamp": _now(),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


# --- generated data --------------------------------------------------------------------------


def bench_dir(config: Config) -> Path:
    """``<work_dir>/bench``: the cache of generated data, and scratch space."""
    return config.work_path / "bench"


@contextmanager
def scratch(config: Config) -> Iterator[Path]:
    """A fresh directory under ``<work_dir>/bench``, removed afterwards."""
    path = bench_dir(config) / f"tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def generate_jpegs(out: Path, count: int, size: int = 256, classes: int = 4, seed: int = 0) -> Path:
    """Write ``count`` photo-like JPEGs into one sub-folder per class, or reuse them.

    Each picture is a smooth two-colour gradient with a few blurred shapes and sensor-like
    noise, saved at quality 90: files of realistic size and decode cost (pure noise or flat
    colour would compress unrealistically badly or well). Image ``i`` belongs to class
    ``i % classes`` and depends only on ``(seed, i)``, so the classes are not learnable:
    the pictures are for measuring speed, not accuracy. The set is written to a temporary
    sibling and renamed into place, so an existing ``out`` is always complete and is reused.

    Args:
        out: Directory to hold ``class_<k>/img_<i>.jpg``.
        count: Number of images.
        size: Side of the square images in pixels.
        classes: Number of class folders.
        seed: Seed of the pictures.

    Returns:
        ``out``.

    Raises:
        UserError: ``out`` exists but is not the complete set asked for.
    """
    from PIL import Image, ImageDraw, ImageFilter

    out = Path(out).expanduser().resolve()
    expected = {f"class_{i % classes}/img_{i:06d}.jpg" for i in range(count)}
    if out.exists():
        found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        if found == expected:
            return out
        raise UserError(
            f"{out} exists but is not a generated set of {count} images in {classes} classes; "
            "remove it or choose another directory"
        )
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for k in range(classes):
            (tmp / f"class_{k}").mkdir(parents=True)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        for i in range(count):
            rng = np.random.default_rng((seed, i))
            a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
            angle = rng.uniform(0, 2 * np.pi)
            along = np.cos(angle) * (ramp[None, :] - 0.5) + np.sin(angle) * (ramp[:, None] - 0.5)
            t = np.clip(0.5 + along, 0, 1)
            pixels = a + (b - a) * t[:, :, None]
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 8))):
                x0, y0 = rng.integers(0, size, 2)
                w, h = rng.integers(size // 10, size // 2, 2)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            image = image.filter(ImageFilter.GaussianBlur(1.5))
            noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (size, size, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
            image.save(tmp / f"class_{i % classes}" / f"img_{i:06d}.jpg", quality=90)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_jpegs(config: Config, count: int, size: int) -> Path:
    """The generated JPEG set of ``count`` images of ``size`` pixels, cached under bench/."""
    name = f"jpeg-v{GENERATOR_VERSION}-{count}x{size}-c{DATASET_CLASSES}-s0"
    return generate_jpegs(bench_dir(config) / name, count, size=size, classes=DATASET_CLASSES)


@dataclass(frozen=True)
class PreparedDataset:
    """A generated, ingested dataset (see :func:`prepared_dataset`).

    Attributes:
        path: The dataset directory (``split=*/``, ``_manifest.json``).
        source: The JPEG folder it was ingested from.
        image_shape: ``(height, width, channels)`` of the stored images.
        rows: Rows per split, from the manifest.
        label_names: Class names, from the manifest.
        rows_per_row_group: The row-group size it was written with.
    """

    path: Path
    source: Path
    image_shape: tuple[int, int, int]
    rows: dict[str, int]
    label_names: list[str]
    rows_per_row_group: int

    def split(self, name: str) -> str:
        """The location of split ``name``."""
        return schema.split_path(str(self.path), name)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for a measurement's details."""
        return {
            "dataset": str(self.path),
            "image_shape": list(self.image_shape),
            "rows": dict(self.rows),
            "rows_per_row_group": self.rows_per_row_group,
        }


def folder_ingest_config(config: Config, image_size: int, channels: int) -> IngestConfig:
    """``config.ingest`` for a benchmark's generated class folders at a fixed image shape."""
    return replace(
        config.ingest,
        source=None,
        output=None,
        format="folder",
        image_size=image_size,
        channels=channels,
    )


def prepared_dataset(config: Config, images: int) -> PreparedDataset:
    """The shared benchmark dataset of ``images`` images, generated and ingested once.

    ``images`` JPEGs of :data:`DATASET_SOURCE_SIZE` pixels in :data:`DATASET_CLASSES` class
    folders, ingested by :func:`pipelines.ingest.ingest` on the session of ``config.spark``
    at 28x28 grey with the default 0.8/0.1/0.1 splits and ``ingest.rows_per_row_group`` of
    ``config``. Both are cached under ``<work_dir>/bench``; ingest writes atomically, so a
    dataset with a manifest is complete and is reused.

    Args:
        config: Spark session and ingest settings.
        images: Number of source images.

    Returns:
        The dataset.

    Raises:
        UserError: The training split is empty (too few images).
    """
    rows_per_group = config.ingest.rows_per_row_group
    source = cached_jpegs(config, images, DATASET_SOURCE_SIZE)
    side, channels = DATASET_IMAGE_SIZE, DATASET_CHANNELS
    name = f"prepared-v{GENERATOR_VERSION}-{images}x{side}x{channels}-rg{rows_per_group}"
    path = bench_dir(config) / name
    manifest_file = path / schema.MANIFEST_FILE
    if not manifest_file.is_file():
        from pipelines.ingest import ingest
        from pipelines.spark import get_spark

        cfg = replace(folder_ingest_config(config, side, channels), splits=SplitConfig())
        log.info("bench: ingesting %d generated images into %s (cached)", images, path)
        ingest(get_spark(config.spark), cfg, source, path)
    manifest = json.loads(manifest_file.read_text())
    if manifest["splits"].get("train", 0) == 0:
        raise UserError(f"bench: {images} images give no training rows; use more --images")
    return PreparedDataset(
        path=path,
        source=source,
        image_shape=tuple(int(d) for d in manifest["image_shape"]),  # type: ignore[arg-type]
        rows={k: int(v) for k, v in manifest["splits"].items()},
        label_names=[str(n) for n in manifest["label_names"]],
        rows_per_row_group=rows_per_group,
    )


# --- reporting -------------------------------------------------------------------------------


def append_csv(report: dict[str, Any], csv_path: str | os.PathLike) -> Path:
    """Append one row per measurement of ``report`` to a CSV, writing the header if new.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.
        csv_path: The CSV file; its directory is created when missing.

    Returns:
        The CSV path.
    """
    path = Path(csv_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    commit = git_commit(short=True) or ""
    machine = report["machine"]
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for result in report["results"]:
            writer.writerow(
                {
                    **result,
                    "timestamp": machine["timestamp"],
                    "commit": commit,
                    "cores": machine["cores"],
                    "value": f"{result['value']:.6g}",
                    "baseline_value": f"{result['baseline_value']:.6g}",
                    "ratio": f"{result['ratio']:.4g}",
                    "met": "" if result["met"] is None else str(result["met"]).lower(),
                }
            )
    return path


def format_table(report: dict[str, Any]) -> str:
    """Render a report as a fixed-width table, one row per measurement, machine facts above.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.

    Returns:
        The table as text (no trailing newline).
    """
    headers = ("benchmark", "measured", "value", "baseline", "baseline value", "ratio", "target")
    headers += ("met",)
    rows = [
        (
            r["benchmark"],
            r["measured"],
            f"{_fmt(r['value'])} {r['unit']}",
            r["baseline"],
            f"{_fmt(r['baseline_value'])} {r['unit']}",
            f"{r['ratio']:.2f}x",
            r["target"] or "-",
            "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
        )
        for r in report["results"]
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    numeric = {2, 4, 5}

    def line(cells: tuple) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    m = report["machine"]
    facts = (
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB, load {m['load_avg']}, "
        f"python {m['python']}, pyspark {m['pyspark']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, tensorflow {m['tensorflow']}, horovod {m['horovod']}, "
        f"{m['platform']}, {m['timestamp']}"
    )
    rule = "-" * len(line(headers))
    return "\n".join([facts, line(headers), rule, *(line(r) for r in rows)])


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
