"""Score benchmark: Spark batch scoring against the same pyfunc model in one process.

In: a :class:`~pipelines.config.Config` (Spark session, ``score.arrow_batch_size``), a
number of generated JPEGs and repeats. Out: three :class:`~pipelines.bench.stats.Measurement`
records: Spark scoring images/s over in-process ``predict`` on already decoded arrays
(target >= 0.7), over in-process ``predict`` on the files' bytes (informative), and over
that ``predict`` confined to one TensorFlow thread, as each scoring task runs it (the
parallel efficiency's baseline, target >= 1.7).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import tracking
from pipelines.bench.data import (
    DATASET_CHANNELS,
    DATASET_CLASSES,
    DATASET_IMAGE_SIZE,
    DATASET_SOURCE_SIZE,
    cached_jpegs,
    scratch,
)
from pipelines.bench.feed import bench_model_config
from pipelines.bench.jobs import JobMark, JobTimeline, median_timeline
from pipelines.bench.processes import ProcessSampler
from pipelines.bench.stats import Measurement, pair, with_parallel_efficiency
from pipelines.bench.timing import check_sizes, interleaved, timed
from pipelines.config import Config
from pipelines.store import sqlite_store
from pipelines.tasks import CLASSIFICATION

log = logging.getLogger("pipelines.bench")

#: Target of Spark batch scoring over in-process predict on decoded arrays.
SCORE_TARGET_RATIO = 0.7
#: Target of Spark batch scoring over the same predict on one thread (one task slot's work).
SCORE_SLOT_TARGET_RATIO = 1.7
#: Images scored by default: a batch. A scoring job costs about 0.3 s whatever its size
#: (listing, job start, the slower worker's tail, table commit), a fifth of a 5,000-image
#: job on 2 cores; a daily batch amortises it, and so does this default.
SCORE_IMAGES = 20_000


def bench_score(
    config: Config, *, images: int = SCORE_IMAGES, repeats: int = 3
) -> list[Measurement]:
    """Spark batch scoring of a folder of JPEGs against in-process pyfunc ``predict``.

    The fixed model of the feed benchmark (``mnist_cnn`` on 28x28 grey, untrained: its
    weights do not change its speed) is logged with :func:`pipelines.image_model.log_image_model`
    to a temporary MLflow sqlite store. On ``images`` generated 64x64 JPEGs (the feed
    dataset's source, in four class folders):

    - measured ``spark batch scoring``: :func:`pipelines.score.score` end to end on the
      session of ``config.spark`` (model resolution, listing, reading, decoding and
      predicting in ``mapInPandas`` on the executors with the model loaded once per Python
      worker, Parquet table write, counts read back); images/s = images / wall seconds;
    - baseline ``pyfunc predict, decoded arrays``: ``mlflow.pyfunc.load_model`` of the same
      model (loaded once, untimed) and one ``predict`` over a DataFrame of the images
      already decoded to 28x28x1 uint8 arrays in memory; the target (>= 0.7) is against it;
    - baseline ``pyfunc predict, file bytes``: the same model, reading every file and
      calling ``predict`` on the bytes in one process: what a user without Spark would
      write. Its ratio is what Spark's parallelism gains over that. Its TensorFlow runs on
      every core, so the ratio's ceiling here is below the task slots;
    - baseline ``pyfunc predict, file bytes, 1 thread``: the same, in a spawned process
      whose TensorFlow runs one thread, as each scoring task's does (one task slot's
      share of the host): the ratio per slot is the parallel efficiency (target >= 1.7).

    Warm-up first (two scoring runs on a small set: Python workers start, import
    TensorFlow and load the model, as the first job of a session does; a predict of each
    baseline); then ``repeats`` interleaved runs, medians.
    Every run is checked to score every image without error. The store and the tables are
    removed afterwards.

    Args:
        config: Spark session, ``score.arrow_batch_size`` and ``score.format`` (the
            ``mlflow`` section is replaced by the temporary store).
        images: Number of generated JPEGs.
        repeats: Measured runs of each.

    Returns:
        Spark over predict on arrays (target ``>= 0.7``), over predict on bytes, and over
        predict on bytes on one thread (target ``>= 1.7``).

    Raises:
        UserError: ``images`` or ``repeats`` is below 1.
        RuntimeError: A run scored another number of images, or some with an error.
    """
    check_sizes("score", images, repeats)
    import mlflow
    import pandas as pd

    from pipelines.images import decode_image
    from pipelines.score import score
    from pipelines.spark import get_spark

    source = cached_jpegs(config, images, DATASET_SOURCE_SIZE)
    warm_source = cached_jpegs(config, max(8, min(500, images // 10)), DATASET_SOURCE_SIZE)
    files = sorted(source.rglob("*.jpg"))
    spark = get_spark(config.spark)
    with scoring_store(config) as (work, cfg), _OneThreadPredict(cfg) as one_thread:
        model = mlflow.pyfunc.load_model(cfg.score.model)
        side, channels = DATASET_IMAGE_SIZE, DATASET_CHANNELS
        arrays = [decode_image(p.read_bytes(), side, channels) for p in files]

        timelines: list[JobTimeline] = []

        def run_spark(src: Path, expected: int) -> float:
            table = work / f"table-{uuid.uuid4().hex[:8]}"
            mark = JobMark(spark)
            seconds, result = timed(
                lambda: score(spark, cfg, str(src), table=str(table), batch_id="bench")
            )
            if src == source and (timeline := mark.timeline()):
                timelines.append(timeline)
            _check("spark batch scoring", expected, result.rows, result.errors)
            shutil.rmtree(table, ignore_errors=True)
            return expected / seconds

        # Wall and CPU seconds (all threads of its process) of each predict baseline run.
        baseline_times: dict[str, list[tuple[float, float]]] = {
            "arrays": [],
            "bytes": [],
            "one_thread": [],
        }

        def predict(name: str, make_input: Any) -> float:
            def run() -> int:
                output = model.predict(pd.DataFrame({"image": make_input()}))
                _check("pyfunc predict", len(files), len(output), output["error"].count())
                return len(output)

            cpu_start = time.process_time()
            seconds, done = timed(run)
            baseline_times[name].append((seconds, time.process_time() - cpu_start))
            return done / seconds

        def predict_one_thread() -> float:
            seconds, cpu_seconds, rows, errors = one_thread.predict([str(p) for p in files])
            _check("pyfunc predict, 1 thread", len(files), rows, errors)
            baseline_times["one_thread"].append((seconds, cpu_seconds))
            return len(files) / seconds

        runs = {
            "spark": functools.partial(run_spark, source, images),
            "arrays": functools.partial(predict, "arrays", lambda: arrays),
            "bytes": functools.partial(predict, "bytes", lambda: [p.read_bytes() for p in files]),
            "one_thread": predict_one_thread,
        }
        log.info("bench score: warming up on %s", warm_source)
        warm_images = sum(1 for _ in warm_source.rglob("*.jpg"))
        # Twice: the first job's workers load the model; the second shows them reused.
        for _ in range(2):
            run_spark(warm_source, warm_images)
        for name in ("arrays", "bytes", "one_thread"):
            runs[name]()
        for timings in baseline_times.values():
            timings.clear()
        rates = interleaved("score", runs, repeats)
        # One more job, untimed, under the process sampler: where a scoring job's CPU goes.
        with ProcessSampler() as sampler:
            run_spark(source, images)

    details = {
        "images": images,
        "repeats": repeats,
        "source": f"{DATASET_SOURCE_SIZE}x{DATASET_SOURCE_SIZE} JPEG q90",
        "model": f"{bench_model_config().model} on {side}x{side}x{channels}",
        "spark_master": spark.sparkContext.master,
        "task_slots": spark.sparkContext.defaultParallelism,
        "arrow_batch_size": config.score.arrow_batch_size,
        "table_format": config.score.format,
        "measures": "images / wall seconds of one whole scoring job or predict call",
        # CPU seconds and peak RSS per kind of process (driver, JVM, Python workers) of one
        # more scoring job, sampled every 0.1 s outside the timed runs.
        "processes": sampler.usage.describe() if sampler.usage else {},
        # Medians over the timed scoring jobs: driver time before the first task and after
        # the last stage (the table commit and the count read back).
        "fixed_cost": median_timeline(timelines[:repeats]),
    }
    # Each baseline's label and target, in the order returned, and whether it does the
    # stage's whole work (read, decode, predict) in one process: those also get the ratio
    # per task slot and the best ratio possible here (TensorFlow on both cores in "bytes",
    # on one in "one_thread", as in each task).
    baselines = {
        "arrays": ("pyfunc predict, decoded arrays", f">= {SCORE_TARGET_RATIO}", False),
        "bytes": ("pyfunc predict, file bytes", "", True),
        "one_thread": (
            "pyfunc predict, file bytes, 1 thread",
            f">= {SCORE_SLOT_TARGET_RATIO}",
            True,
        ),
    }
    measurements = []
    for name, (label, target, whole_stage) in baselines.items():
        measurement = pair(
            "score",
            "spark batch scoring",
            rates["spark"],
            label,
            rates[name],
            unit="images/s",
            target=target,
            details=details,
        )
        if whole_stage:
            walls, cpus = zip(*baseline_times[name], strict=True)
            measurement = with_parallel_efficiency(
                measurement,
                details["task_slots"],
                baseline_wall_s=statistics.median(walls),
                baseline_cpu_s=statistics.median(cpus),
            )
        measurements.append(measurement)
    return measurements


class _OneThreadPredict:
    """The benchmark's pyfunc model in a spawned process whose TensorFlow runs one thread.

    TensorFlow sizes its thread pools once per process, so the one-thread baseline cannot
    run in the benchmark's own process, whose TensorFlow uses every core. The process is
    started (and loads the model) once, and stopped on exit, pass or fail.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._pool: Any = None

    def __enter__(self) -> _OneThreadPredict:
        import multiprocessing

        self._pool = multiprocessing.get_context("spawn").Pool(
            1,
            initializer=_load_one_thread_model,
            initargs=(self._config.mlflow.tracking_uri, self._config.score.model),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.terminate()
        self._pool.join()

    def predict(self, files: list[str]) -> tuple[float, float, int, int]:
        """Read and score ``files`` there: wall and CPU seconds, rows and errors."""
        return self._pool.apply(_predict_files, (files,))


# The one-thread process's model (see _OneThreadPredict).
_ONE_THREAD_MODEL: Any = None


def _load_one_thread_model(tracking_uri: str, model_uri: str) -> None:
    import mlflow

    from pipelines.host import limit_tf_threads

    global _ONE_THREAD_MODEL
    limit_tf_threads(1, 1)  # before the model's first op, as a scoring task does
    tracking.use_stores(tracking_uri)
    _ONE_THREAD_MODEL = mlflow.pyfunc.load_model(model_uri)


def _predict_files(files: list[str]) -> tuple[float, float, int, int]:
    import pandas as pd

    cpu_start, start = time.process_time(), time.perf_counter()
    images = [Path(file).read_bytes() for file in files]
    output = _ONE_THREAD_MODEL.predict(pd.DataFrame({"image": images}))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu_seconds, len(output), int(output["error"].count())


@contextlib.contextmanager
def scoring_store(config: Config) -> Iterator[tuple[Path, Config]]:
    """A scratch folder with its own MLflow store holding the benchmark's logged model.

    Yields the folder and ``config`` pointed at that store and model (``score.model``), with
    MLflow's fluent API pointed there too; the caller's MLflow set-up is restored after.
    """
    with scratch(config) as work:
        tracking_uri = sqlite_store(work)
        with tracking.pointed_at(tracking_uri):
            model_uri = _log_model(tracking_uri, work / "artifacts")
            yield (
                work,
                replace(
                    config,
                    mlflow=replace(config.mlflow, tracking_uri=tracking_uri),
                    score=replace(config.score, model=model_uri, table=None),
                ),
            )


def _log_model(tracking_uri: str, artifacts: Path) -> str:
    """Log the fixed model as the pyfunc image model in a new store; return its URI."""
    import mlflow

    from pipelines.image_model import log_image_model
    from pipelines.images import encode_png
    from pipelines.models import build_model

    experiment = tracking.client(tracking_uri).create_experiment(
        "dlpipe-bench", artifact_location=artifacts.as_uri()
    )
    shape = (DATASET_IMAGE_SIZE, DATASET_IMAGE_SIZE, DATASET_CHANNELS)
    model = build_model(bench_model_config(), shape, DATASET_CLASSES)
    with tracking.pointed_at(tracking_uri), mlflow.start_run(experiment_id=experiment):
        info = log_image_model(
            model,
            label_names=[f"class_{k}" for k in range(DATASET_CLASSES)],
            image_shape=list(shape),
            task=CLASSIFICATION,
            input_example_png=encode_png(np.zeros(shape, np.uint8)),
        )
    return info.model_uri


def _check(what: str, expected: int, rows: int, errors: int) -> None:
    if rows != expected or errors:
        raise RuntimeError(
            f"bench score: {what} gave {rows} rows ({errors} errors) for {expected} images"
        )
