"""Job overhead: what a whole ``dlpipe train`` / ``dlpipe score`` process spends outside model work.

In: a :class:`~pipelines.config.Config` (Spark and training settings), repeats. Out: two
measurements, each a whole process as a user runs it, timed from launch to exit:

- ``dlpipe train`` on the bundled digits (:data:`TRAIN_EPOCHS` epochs): seconds outside
  ``fit`` (start-up, preparation, the ranks' start, evaluation, report, logging and
  registration, exit) against ``fit`` itself;
- ``dlpipe score`` of the 1,797 digits with the model just trained: seconds outside the
  scoring job (the Spark job that predicts and writes the batch) against a bare Spark
  process (Python, PySpark, a session started and stopped: what no Spark command can
  avoid). The target of this row is absolute, :data:`SCORE_BUDGET_S`; its details say
  whether it is met.

Both carry the named causes in their details: the commands' own ``phases``, import seconds
per top-level package (``python -X importtime``) and the Spark session's start. The peer
comparison of the time outside fit is ``bench peer``'s ``outside fit`` row.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipelines.bench.commands import dlpipe_environment, last_error, run_dlpipe, run_process
from pipelines.bench.data import scratch
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.store import sqlite_store

log = logging.getLogger("pipelines.bench")

#: Epochs of each measured training run: enough for a real fit, few enough to keep the
#: benchmark short (the overhead does not grow with epochs).
TRAIN_EPOCHS = 2
#: Target: seconds of a ``dlpipe score`` of the demo's 1,797 images outside its scoring job.
SCORE_BUDGET_S = 5.0
#: The packages a training or scoring driver imports, profiled for the causes.
PROFILED_IMPORTS = (
    "pipelines.cli",
    "pipelines.pipeline",
    "pyspark.sql",
    "mlflow",
    "tensorflow",
    "horovod.spark",
    "petastorm",
)
#: A bare Spark process: Python, PySpark, the session this config starts, stopped.
_BARE_SPARK = (
    "import sys, time\n"
    "from pipelines.config import load_config\n"
    "from pipelines.spark import get_spark\n"
    "config = load_config(None, sys.argv[1:])\n"
    "started = time.perf_counter()\n"
    "spark = get_spark(config.spark)\n"
    "print(round(time.perf_counter() - started, 3))\n"
    "spark.stop()\n"
)


def bench_overhead(
    config: Config, *, repeats: int = 3, images: int | None = None
) -> list[Measurement]:
    """Whole training and scoring processes: their seconds outside model work, and why.

    Args:
        config: Spark master and training settings of the runs (model, ranks, batch size).
        repeats: Runs of each process (medians reported).
        images: Refused: both commands run on the bundled digits.

    Returns:
        Train outside fit against fit; score outside its job against a bare Spark process.

    Raises:
        UserError: ``images`` given, or ``repeats`` below 1.
        RuntimeError: A measured command failed (its last error line).
    """
    if images is not None:
        raise UserError("bench overhead runs on the bundled digits; --images does not apply")
    check_sizes("overhead", 1, repeats)
    from pipelines.bench.scale import digits_dataset
    from pipelines.demo import DEMO_IMAGES, write_demo_digits

    dataset, _ = digits_dataset(config, DEMO_IMAGES, 1)
    with scratch(config) as work:
        digits = write_demo_digits(work / "digits").path
        sets = _overrides(config, work)
        trains, scores, bare = [], [], []
        for i in range(repeats):
            wall, result = run_dlpipe(["train", "--dataset", str(dataset)], work / f"t{i}", sets)
            trains.append({"wall_s": wall, "phases": result["phases"]})
            log.info("bench overhead: train %.1f s (fit %.1f s)", wall, result["phases"]["fit"])
            args = ["score", "--source", str(digits), "--model", result["model_uri"]]
            wall, result = run_dlpipe(args, work / f"s{i}", sets)
            scores.append({"wall_s": wall, "phases": result["phases"], "rows": result["rows"]})
            log.info(
                "bench overhead: score %.1f s (job %.1f s)", wall, result["phases"]["score_job"]
            )
            bare.append(_bare_spark(config, work / f"b{i}"))
        causes = {"imports_s": import_seconds(), "spark_session_s": _median(b[1] for b in bare)}
    train_outside = [t["wall_s"] - t["phases"]["fit"] for t in trains]
    score_outside = [s["wall_s"] - s["phases"]["score_job"] for s in scores]
    score_median = statistics.median(score_outside)
    return [
        pair(
            "overhead",
            "dlpipe train outside fit",
            train_outside,
            "its fit",
            [t["phases"]["fit"] for t in trains],
            unit="s",
            details={
                "epochs": TRAIN_EPOCHS,
                "num_proc": config.train.num_proc,
                "wall_s": _median(t["wall_s"] for t in trains),
                "phases_median_s": _median_phases(t["phases"] for t in trains),
                "causes": causes,
            },
        ),
        pair(
            "overhead",
            f"dlpipe score {DEMO_IMAGES} images outside its job",
            score_outside,
            "bare Spark process",
            [b[0] for b in bare],
            unit="s",
            details={
                "budget_s": SCORE_BUDGET_S,
                "within_budget": score_median <= SCORE_BUDGET_S,
                "rows": scores[0]["rows"],
                "wall_s": _median(s["wall_s"] for s in scores),
                "phases_median_s": _median_phases(s["phases"] for s in scores),
                "causes": causes,
            },
        ),
    ]


def import_seconds(modules: tuple[str, ...] = PROFILED_IMPORTS, top: int = 8) -> dict[str, float]:
    """Seconds a fresh interpreter spends importing ``modules``, per top-level package.

    From ``python -X importtime``: each module's own (self) time, summed by the package it
    belongs to, so that a package imported from inside another is counted to itself.
    The ``top`` largest, and ``total``.

    Raises:
        RuntimeError: The imports failed.
    """
    code = "import " + ", ".join(modules)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dlpipe_environment(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench overhead: importing {code!r} failed: {last_error(done.stderr)}")
    return summarize_importtime(done.stderr, top)


def summarize_importtime(text: str, top: int = 8) -> dict[str, float]:
    """``-X importtime`` output as seconds per top-level package: the ``top`` largest, total."""
    per_package: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        per_package[name.split(".")[0]] += int(self_us) / 1e6
    largest = sorted(per_package.items(), key=lambda item: -item[1])[:top]
    return {
        **{name: round(seconds, 3) for name, seconds in largest},
        "total": round(sum(per_package.values()), 3),
    }


def _bare_spark(config: Config, work: Path) -> tuple[float, float]:
    """A bare Spark process's wall seconds, and its session's start within it."""
    work.mkdir(parents=True)
    master = config.spark.master or "local[2]"
    command = [sys.executable, "-c", _BARE_SPARK, f"spark.master={master}"]
    wall, rc, out, err = run_process(command, work, dlpipe_environment(), timeout_s=300)
    if rc != 0 or not out.strip():
        raise RuntimeError(f"bench overhead: the bare Spark process failed: {last_error(err)}")
    return wall, float(out.strip().splitlines()[-1])


def _overrides(config: Config, work: Path) -> dict[str, str]:
    """The runs' ``--set`` values: this config's Spark and training, a store of their own."""
    train = config.train
    values = {
        "spark.master": config.spark.master,
        "train.model": train.model,
        "train.batch_size": train.batch_size,
        "train.num_proc": train.num_proc,
        "train.epochs": TRAIN_EPOCHS,
        "train.early_stopping_patience": 0,
        "work_dir": work / "work",
        "mlflow.tracking_uri": sqlite_store(work),
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def _median(values: Any) -> float:
    return round(statistics.median(list(values)), 2)


def _median_phases(runs: Any) -> dict[str, float]:
    runs = list(runs)
    keys = {key for run in runs for key in run}
    return {key: _median(run.get(key, 0.0) for run in runs) for key in sorted(keys)}
