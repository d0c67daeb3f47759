"""Benchmarks: every measurement paired with its baseline, run in the same process.

In: a :class:`~pipelines.config.Config` (the Spark session and stage settings to measure),
the name of a benchmark (a key of :data:`BENCHMARKS`; ``all`` runs every one) and a data
size. Out: a report ``{"machine": facts, "results": [measurement, ...]}``, a fixed-width
table of it (:func:`format_table`) and, on request, one CSV row per measurement appended
to a file, so the effect of a change stays visible from run to run.

=========  ======================================  =====================================
benchmark  measured                                baseline (target on the ratio)
=========  ======================================  =====================================
ingest     Spark ingest, images/s                  plain PIL loop (>= 1.6); same decode
                                                   function in one process
feed       Petastorm -> tf.data, s/epoch           in-memory tensors (<= 1.1)
reader     Petastorm batch reader, rows/s          pyarrow on the same Parquet
train      Horovod 1 rank, s/step; 2 ranks,        plain Keras fit (<= 1.05)
           images/s
score      Spark batch scoring, images/s           pyfunc predict on decoded arrays
                                                   (>= 0.7); on file bytes
scale      ingest, score, train, listing at        the same stage at the reference size
           growing sizes, ms/image; peak RSS and   (<= 1.1 above it); not part of
           CPU per process kind                    ``all``
overhead   whole ``dlpipe train`` / ``score``      its fit; a bare Spark process
           processes: s outside model work, by     (score: <= 5 s outside its job)
           phase, with imports and Spark start
peer       the whole ``dlpipe train`` process, s;  Horovod's KerasEstimator on the same
           outside fit, s; its test accuracy       digits, in its own environment
                                                   (<= 0.75; <= 1.0; >= 1.0); not part
                                                   of ``all``
=========  ======================================  =====================================

Each benchmark generates its data once (cached under ``<work_dir>/bench/``), warms up
before measuring (JVM, Python workers, imports, tracing, page cache), repeats every
measurement and its baseline interleaved (so a neighbour's load affects both alike) and
reports medians. Speed is measured here and only here; tests never assert it. One module
per benchmark; what they share is split by job: :mod:`~pipelines.bench.stats` (the
measurement record and its maths), :mod:`~pipelines.bench.timing` (sizes, interleaved and
timed runs), :mod:`~pipelines.bench.jobs` (a Spark job's fixed cost, from Spark's status
store), :mod:`~pipelines.bench.processes` (CPU and memory per kind of process),
:mod:`~pipelines.bench.machine` (machine facts), :mod:`~pipelines.bench.data` (generated
data and its cache), :mod:`~pipelines.bench.output` (table and CSV) and
:mod:`~pipelines.bench.markdown` (the tables of a run in ``docs/performance.md``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from pipelines.bench.data import generate_jpegs, prepared_dataset
from pipelines.bench.feed import bench_feed
from pipelines.bench.ingest import bench_ingest
from pipelines.bench.machine import machine_facts
from pipelines.bench.markdown import check_page, markdown_blocks, write_markdown
from pipelines.bench.output import CSV_COLUMNS, append_csv, format_table
from pipelines.bench.overhead import bench_overhead
from pipelines.bench.reader import bench_reader
from pipelines.bench.scale import bench_scale, format_scale_table
from pipelines.bench.score import bench_score
from pipelines.bench.stats import Measurement, Skipped
from pipelines.bench.train import bench_train
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.host import git_commit

__all__ = [
    "BENCHMARKS",
    "CSV_COLUMNS",
    "Measurement",
    "append_csv",
    "bench_feed",
    "bench_ingest",
    "bench_overhead",
    "bench_reader",
    "bench_scale",
    "bench_score",
    "bench_train",
    "format_scale_table",
    "format_table",
    "generate_jpegs",
    "machine_facts",
    "markdown_blocks",
    "prepared_dataset",
    "run_benchmarks",
    "write_markdown",
]

log = logging.getLogger("pipelines.bench")

#: Benchmark name -> function(config, *, images=..., repeats=...) -> measurements, in the
#: order ``all`` runs them.
BENCHMARKS: dict[str, Callable[..., list[Measurement]]] = {
    "ingest": bench_ingest,
    "feed": bench_feed,
    "reader": bench_reader,
    "train": bench_train,
    "score": bench_score,
    "overhead": bench_overhead,
}

#: Benchmarks run only by name, never by ``all`` (long: growth with size; whole training
#: processes against a peer built in an environment of its own).
ON_REQUEST: dict[str, Callable[..., list[Measurement]]] = {
    "scale": bench_scale,
    "peer": lambda config, **kwargs: _maintainer_peer().bench_peer(config, **kwargs),
}


def _maintainer_peer() -> Any:
    """The peer benchmark, which only a checkout has (it is not part of the wheel)."""
    try:
        from pipelines.bench.maintainer import peer
    except ImportError:
        raise UserError(
            "bench peer is a maintainer's benchmark and not part of the installed package: "
            "run it from a checkout of the project (make venv, then .venv/bin/dlpipe bench peer)"
        ) from None
    return peer


def run_benchmarks(
    config: Config,
    which: str = "all",
    *,
    images: int | None = None,
    repeats: int = 3,
    csv_path: str | os.PathLike | None = None,
    max_size: bool = False,
    markdown_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run one benchmark or all registered ones; optionally append the results to a CSV.

    Args:
        config: Configuration of the Spark session and the stages measured.
        which: A name in :data:`BENCHMARKS` or :data:`ON_REQUEST`, or ``all`` (the former).
        images: Data size (images) for each benchmark; None uses each one's default.
        repeats: Measured runs of each figure (the median is reported).
        csv_path: File to append one row per measurement to (header written when new).
        max_size: ``scale`` only: add its largest point.
        markdown_path: A Markdown page whose blocks of the benchmarks run are rewritten
            with their tables (:func:`~pipelines.bench.markdown.write_markdown`).

    Returns:
        ``{"machine": machine_facts(), "results": [Measurement as dict, ...], "skipped":
        [why, ...]}``; a row that cannot be measured here (the peer without its
        environment) is skipped with a one-line reason, not failed.

    Raises:
        UserError: ``which`` is not a registered benchmark, ``max_size`` without
            ``scale``, or a ``markdown_path`` without the blocks of the benchmarks run.
    """
    registry = {**BENCHMARKS, **ON_REQUEST}
    if max_size and which != "scale":
        raise UserError(f"--max applies to bench scale only, not {which!r}")
    if which == "all":
        names = list(BENCHMARKS)
    elif which in registry:
        names = [which]
    else:
        available = ", ".join([*BENCHMARKS, "all", *ON_REQUEST])
        raise UserError(f"unknown benchmark {which!r}; available: {available}")
    if markdown_path is not None:
        check_page(markdown_path, names)  # a page without the blocks fails before the work
    machine = machine_facts()
    results: list[Measurement] = []
    skipped: list[str] = []
    for name in names:
        kwargs: dict[str, Any] = {"repeats": repeats}
        if images is not None:
            kwargs["images"] = images
        if name == "scale":
            kwargs["max_size"] = max_size
        log.info("bench: running %s", name)
        try:
            results.extend(registry[name](config, **kwargs))
        except Skipped as exc:
            log.warning("bench: %s", exc.skip_message)
            skipped.append(exc.skip_message)
    report = {
        "machine": machine,
        "results": [asdict(m) for m in results],
        "skipped": skipped,
    }
    if csv_path is not None:
        append_csv(report, csv_path)
    if markdown_path is not None:
        write_markdown(report, markdown_path, names, git_commit(short=True))
    return report
