"""Peer benchmark: the whole ``dlpipe train`` process against Horovod's own ``KerasEstimator``.

In: a :class:`~pipelines.config.Config` (Spark, ingest and training settings), seeds and
epochs. Out: two :class:`~pipelines.bench.stats.Measurement` records: the median wall
seconds of our whole ``dlpipe train`` process over the peer's whole process (target at most
0.75x), and our median test accuracy over the peer's (target at least 1.0x); or
:class:`PeerUnavailable` with a one-line reason when the peer cannot run here.

The peer is ``horovod.spark.keras.KerasEstimator`` (Horovod 0.28.1), driven by
:mod:`pipelines.bench.maintainer.peer_runner` in an environment of its own: its estimator requires
pyarrow < 11 and ours pins 14. That environment is built once under
``<work_dir>/bench/peer-env-<key>`` (see :func:`peer_env`), from the same base Python, the
same TensorFlow, Keras and PySpark as ours and the cached Horovod wheel (same TensorFlow, so
the same ABI); never in the project's ``.venv``.

Both sides train the same thing: the bundled digits as the scale benchmark ingests them
(same rows, same splits), the model of :func:`pipelines.models.build_model` (the peer loads
its ``to_json()``, initialiser seeds included), Adam at ``train.learning_rate`` per rank
scaled by the ranks, ``train.batch_size`` per rank, ``train.num_proc`` ranks on local Spark,
validation on the ``val`` split every epoch, the same epochs, accuracy on the ``test`` split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.bench.commands import last_error, run_dlpipe, run_process
from pipelines.bench.data import bench_dir, scratch
from pipelines.bench.machine import installed_version, load_average
from pipelines.bench.maintainer import peer_runner
from pipelines.bench.stats import Measurement, Skipped, pair
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.store import DatasetDir, replace_dir, sqlite_store

log = logging.getLogger("pipelines.bench")

#: Target: our whole training process at most this many times the peer's wall time.
PEER_TARGET_RATIO = 0.75
#: Target: our time outside fit (start-up, evaluation, logging, report, exit) at most the
#: peer's.
OUTSIDE_FIT_TARGET_RATIO = 1.0
#: Target: our median test accuracy at least this many times the peer's.
ACCURACY_TARGET_RATIO = 1.0
#: Seeds (one run of each side per seed) and epochs of the default benchmark.
SEEDS = (0, 1, 2)
EPOCHS = 8
#: What our ``dlpipe train`` is given beyond epochs and seed, so that it trains exactly as
#: the peer does: no augmentation, no early stopping (the same epochs on both sides), no
#: learning-rate warm-up (the estimator has none). Evaluation, MLflow logging, layer stats,
#: registration and the run report stay on: they are part of our whole process.
OUR_OVERRIDES = {
    "train.augment_shift": "0",
    "train.augment_rotation_deg": "0",
    "train.early_stopping_patience": "0",
    "train.warmup_epochs": "0",
}
#: The peer environment's pins besides TensorFlow and PySpark (ours, see :func:`peer_pins`).
#: pyarrow < 11 is the estimator's own bound; pandas 2.0 and petastorm 0.12.1 are the last
#: that work with pyarrow 10; the rest are Horovod's own (pure Python) dependencies.
PEER_REQUIREMENTS = (
    "keras==2.15.*",
    "pyarrow==10.0.1",
    "numpy==1.26.*",
    "pandas==2.0.*",
    "petastorm==0.12.1",
    "protobuf<5",
    "h5py",
    "cloudpickle",
    "psutil",
    "pyyaml",
    "packaging",
    "fsspec",
)
HOROVOD_VERSION = "0.28.1"
#: Bumped when the environment is built differently (invalidates built environments).
PEER_ENV_VERSION = 1
#: Seconds allowed per pip step (one training process of either side: RUN_TIMEOUT_S).
PIP_TIMEOUT_S = 1800
#: File written into a complete environment before it is renamed into place.
ENV_MARKER = "peer-env.json"
_IMPORT_CHECK = (
    "import json, sys, horovod, horovod.spark.keras, pyarrow, pyspark, tensorflow as tf\n"
    "assert int(pyarrow.__version__.split('.')[0]) < 11, pyarrow.__version__\n"
    "print(json.dumps({'horovod': horovod.__version__, 'pyarrow': pyarrow.__version__,"
    " 'pyspark': pyspark.__version__, 'tensorflow': tf.__version__,"
    " 'python': sys.version.split()[0]}))"
)


class PeerUnavailable(Skipped):
    """The peer cannot run here; the message is the one-line reason."""

    row = "peer"


@dataclass(frozen=True)
class PeerEnv:
    """A built peer environment.

    Attributes:
        path: Its folder.
        python: Its interpreter.
        versions: What its import check printed (horovod, pyarrow, pyspark, tensorflow).
        build_seconds: Seconds this call spent building it (0 when reused).
    """

    path: Path
    python: Path
    versions: dict[str, str]
    build_seconds: float


def peer_pins() -> tuple[str, ...]:
    """The peer environment's requirements: ours for TensorFlow and PySpark, then the rest."""
    cpu = installed_version("tensorflow-cpu")
    full = installed_version("tensorflow") or "2.15.1"
    tf = f"tensorflow-cpu=={cpu}" if cpu else f"tensorflow=={full}"
    return (tf, f"pyspark=={installed_version('pyspark') or '3.5.*'}", *PEER_REQUIREMENTS)


def horovod_wheel() -> Path | None:
    """The cached Horovod wheel ``make venv`` built against our TensorFlow, or None.

    Found where the Makefile keeps it: ``$XDG_CACHE_HOME`` (else ``~/.cache``)
    ``/spark-dl-pipelines/wheels/py311-tf<version>/``.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tf = installed_version("tensorflow-cpu") or installed_version("tensorflow") or "2.15.1"
    folder = cache / "spark-dl-pipelines" / "wheels" / f"py311-tf{tf}"
    wheels = sorted(folder.glob(f"horovod-{HOROVOD_VERSION}-*.whl"))
    return wheels[-1] if wheels else None


def base_python() -> Path:
    """The base interpreter our environment was made from (a venv's ``sys.base_prefix``)."""
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidate = Path(sys.base_prefix) / "bin" / name
    return candidate if candidate.exists() else Path(getattr(sys, "_base_executable", name))


def env_key(python: Path, requirements: Sequence[str], wheel: Path | None) -> str:
    """A short hash of what the environment is built from (interpreter, pins, wheel)."""
    parts = [str(PEER_ENV_VERSION), str(python), *requirements, wheel.name if wheel else "-"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def peer_env(
    root: Path,
    *,
    python: Path | None = None,
    requirements: Sequence[str] | None = None,
    wheel: Path | None = None,
    pip_options: Sequence[str] = (),
) -> PeerEnv:
    """Build the peer environment under ``root``, or reuse it.

    ``python -m venv`` into a staging folder, ``pip install`` of the pins, the Horovod wheel
    with ``--no-deps`` (its dependencies are among the pins), an import check (Horovod's
    Spark Keras estimator imports, pyarrow < 11); only then is the folder renamed to
    ``root/peer-env-<key>``, so a half-built environment is never reused. Only
    ``<env>/bin/python`` is used afterwards: the renamed folder's console scripts still
    name the staging path.

    Args:
        root: The benchmark cache (``<work_dir>/bench``).
        python: Base interpreter; default :func:`base_python`.
        requirements: Pins; default :func:`peer_pins`.
        wheel: Horovod wheel; default :func:`horovod_wheel`.
        pip_options: Extra ``pip install`` options (e.g. ``--no-index``).

    Returns:
        The environment.

    Raises:
        PeerUnavailable: No Horovod wheel, no such interpreter, or a step failed; the
            message names the step and pip's (or Python's) last error line.
    """
    python = Path(python or base_python())
    requirements = tuple(peer_pins() if requirements is None else requirements)
    wheel = wheel or horovod_wheel()
    if wheel is None or not Path(wheel).is_file():
        raise PeerUnavailable(
            f"no Horovod {HOROVOD_VERSION} wheel in the wheel cache (run `make venv` first)"
        )
    if not python.is_file() or not os.access(python, os.X_OK):
        raise PeerUnavailable(f"base Python {python} does not exist or is not executable")
    final = Path(root) / f"peer-env-{env_key(python, requirements, Path(wheel))}"
    if (final / ENV_MARKER).is_file():
        versions = json.loads((final / ENV_MARKER).read_text())["versions"]
        log.info("bench peer: reusing the peer environment %s", final)
        return PeerEnv(final, final / "bin" / "python", versions, 0.0)

    started = time.perf_counter()
    staging = Path(root) / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    env_python = staging / "bin" / "python"
    pip = [str(env_python), "-m", "pip", "install", "--disable-pip-version-check", *pip_options]
    try:
        _step("venv", [str(python), "-m", "venv", str(staging)])
        _step(f"pip install {len(requirements)} pins", [*pip, *requirements])
        _step("horovod wheel", [*pip, "--no-deps", str(wheel)])
        out = _step("import check", [str(env_python), "-c", _IMPORT_CHECK])
        versions = json.loads(out.strip().splitlines()[-1])
        marker = {"requirements": list(requirements), "wheel": str(wheel), "versions": versions}
        (staging / ENV_MARKER).write_text(json.dumps(marker, indent=2))
        if not (final / ENV_MARKER).is_file():  # else another build finished first: use it
            replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("bench peer: peer environment %s built in %.0f s: %s", final, seconds, versions)
    return PeerEnv(final, final / "bin" / "python", versions, round(seconds, 1))


def bench_peer(
    config: Config,
    *,
    seeds: Sequence[int] = SEEDS,
    epochs: int = EPOCHS,
    repeats: int | None = None,
    images: int | None = None,
) -> list[Measurement]:
    """Our whole ``dlpipe train`` against Horovod's ``KerasEstimator``, one run each per seed.

    Per seed, both as subprocesses, timed from launch to exit (the first side alternates
    from seed to seed, so that neither always runs on a cooler machine):

    - measured ``dlpipe train``: ``<venv>/bin/dlpipe train --json`` with ``OUR_OVERRIDES``,
      the seed and epochs, into a fresh work directory and MLflow store (start-up, Horovod
      ranks, evaluation, MLflow logging, registration, run report); its split
      (:func:`our_split`, from the run's times in MLflow): start-up, fit (the Horovod job),
      evaluation, logging/report/registration, exit;
    - baseline ``KerasEstimator``: :mod:`~pipelines.bench.maintainer.peer_runner` in the peer
      environment; its split (:func:`peer_split`): start-up (interpreter, imports, Spark,
      data decoded to arrays), fit (the estimator's Parquet preparation, the Horovod job,
      the model's reload), evaluation (``KerasModel.transform`` of the test split), exit.

    Args:
        config: Spark, ingest (which digits dataset) and training settings (model,
            optimizer, learning rate, batch size, ranks).
        seeds: ``train.seed`` of each pair of runs; the peer's ``random_seed`` and its
            model's initialiser seeds are the same.
        epochs: Epochs of every run.
        repeats: When given, ``seeds`` is ``range(repeats)`` (the benchmark CLI's knob).
        images: Refused: both sides train on the bundled digits.

    Returns:
        Our wall seconds over the peer's (target ``<= 0.75``), our seconds outside fit over
        the peer's (``<= 1.0``), then our test accuracy over the peer's (``>= 1.0``); all
        with the per-seed figures in their details.

    Raises:
        PeerUnavailable: The peer environment cannot be built or the peer run failed.
        UserError: No seeds, epochs below 1, or ``images`` given.
        RuntimeError: Our ``dlpipe train`` failed.
        TimeoutError: Our ``dlpipe train`` ran past ``RUN_TIMEOUT_S``.
    """
    if images is not None:
        raise UserError("bench peer trains on the bundled digits; --images does not apply")
    if repeats is not None:
        seeds = tuple(range(repeats))
    if not seeds or epochs < 1:
        raise UserError(f"bench peer: need at least one seed and epoch, got {seeds}, {epochs}")
    from pipelines.bench.scale import digits_dataset
    from pipelines.demo import DEMO_IMAGES

    env = peer_env(bench_dir(config))
    # Raw cells: the estimator's side reads them as arrays, and both train on equal pixels.
    dataset, rows = digits_dataset(config, DEMO_IMAGES, 1, storage="raw")
    load_before = load_average()
    runs: list[dict[str, Any]] = []
    with scratch(config) as work:
        _warm_up(env.python)
        for i, seed in enumerate(seeds):
            model_json = work / f"model-{seed}.json"
            model_json.write_text(_model_json(config, dataset, seed))
            sides = {
                "ours": lambda s=seed: run_ours(config, dataset, work / f"ours-{s}", s, epochs),
                "peer": lambda s=seed, m=model_json: run_peer(
                    env, config, dataset, m, work / f"peer-{s}", s, epochs
                ),
            }
            order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
            result = {"seed": seed, **{side: sides[side]() for side in order}}
            versions = result["peer"].pop("versions")
            log.info(
                "bench peer: seed %d: ours %.1f s (accuracy %.4f), peer %.1f s (accuracy %.4f)",
                seed,
                result["ours"]["wall_s"],
                result["ours"]["test_accuracy"],
                result["peer"]["wall_s"],
                result["peer"]["test_accuracy"],
            )
            runs.append(result)
    details = _details(config, env, versions, dataset, rows, seeds, epochs, runs, load_before)
    walls = {side: [r[side]["wall_s"] for r in runs] for side in ("ours", "peer")}
    # Everything that is not the Horovod job: start-up, evaluation, logging, exit.
    outside = {
        side: [r[side]["wall_s"] - r[side]["split_s"]["fit"] for r in runs]
        for side in ("ours", "peer")
    }
    accuracy = {side: [r[side]["test_accuracy"] for r in runs] for side in ("ours", "peer")}
    return [
        pair(
            "peer",
            "dlpipe train (whole process)",
            walls["ours"],
            "horovod KerasEstimator (whole process)",
            walls["peer"],
            unit="s",
            target=f"<= {PEER_TARGET_RATIO}",
            details=details,
        ),
        pair(
            "peer",
            "dlpipe train outside fit",
            outside["ours"],
            "horovod KerasEstimator outside fit",
            outside["peer"],
            unit="s",
            target=f"<= {OUTSIDE_FIT_TARGET_RATIO}",
            details=details,
        ),
        pair(
            "peer",
            "dlpipe train test accuracy",
            accuracy["ours"],
            "horovod KerasEstimator test accuracy",
            accuracy["peer"],
            unit="accuracy",
            target=f">= {ACCURACY_TARGET_RATIO}",
            details=details,
        ),
    ]


def run_ours(config: Config, dataset: Path, work: Path, seed: int, epochs: int) -> dict[str, Any]:
    """One whole ``dlpipe train`` process: wall seconds, test accuracy and its split.

    Raises:
        RuntimeError: It failed or printed no result.
        TimeoutError: It ran past ``RUN_TIMEOUT_S`` (and was stopped).
    """
    work.mkdir(parents=True)
    sets = {
        **OUR_OVERRIDES,
        "train.epochs": str(epochs),
        "train.seed": str(seed),
        "work_dir": str(work),
        "mlflow.tracking_uri": sqlite_store(work),
    }
    # The configured Spark, ingest and training settings travel as overrides too, so the
    # subprocess trains what ``config`` says (not only conf/base.yaml).
    sets = {**_config_overrides(config), **sets}
    launched = time.time()
    try:
        wall, result = run_dlpipe(["train", "--dataset", str(dataset)], work, sets)
    except RuntimeError as exc:
        raise RuntimeError(f"bench peer: seed {seed}: {exc}") from None
    times = _run_times(result["tracking_uri"], result["run_id"])
    return {
        "wall_s": round(wall, 2),
        "test_accuracy": float(result["test_metrics"]["test_accuracy"]),
        "split_s": our_split(times, launched, launched + wall),
        "phases_s": result.get("phases", {}),  # the training stage's own split
        "epochs": result["epochs"],
    }


def our_split(times: Mapping[str, float], launched: float, ended: float) -> dict[str, float]:
    """Our wall time by phase, from the training run's MLflow times (see :func:`_run_times`).

    Args:
        times: ``run_start`` (the run opened), ``trained`` (the ranks' results logged),
            ``evaluated`` (the test metrics logged), ``run_end`` (the run closed, after the
            report, the model and its registration), as ``time.time()`` values, and
            ``ranks_s`` (the slowest rank's own seconds, ``seconds_training``).
        launched: ``time.time()`` when the process was started.
        ended: ``time.time()`` when it had exited.

    Returns:
        Seconds of ``start_up`` (imports, config, Spark session, run opened), ``fit`` (the
        Horovod job), of which ``fit_ranks`` (inside the ranks: feed, epochs, checkpoints)
        and ``fit_launch`` (the rest: Spark job, rank start-up, results), ``evaluation``,
        ``logging_report_registration`` and ``exit``. ``start_up``, ``fit``,
        ``evaluation``, ``logging_report_registration`` and ``exit`` add up to the wall time.

    Raises:
        ValueError: The times are out of order.
    """
    order = [launched, times["run_start"], times["trained"], times["evaluated"]]
    order += [times["run_end"], ended]
    if any(b < a for a, b in zip(order, order[1:], strict=False)):
        raise ValueError(f"run times out of order: {dict(times)}, {launched} to {ended}")
    fit = times["trained"] - times["run_start"]
    split = {
        "start_up": times["run_start"] - launched,
        "fit": fit,
        "fit_ranks": times["ranks_s"],
        "fit_launch": fit - times["ranks_s"],
        "evaluation": times["evaluated"] - times["trained"],
        "logging_report_registration": times["run_end"] - times["evaluated"],
        "exit": ended - times["run_end"],
    }
    return {k: round(v, 2) for k, v in split.items()}


def run_peer(
    env: PeerEnv,
    config: Config,
    dataset: Path,
    model_json: Path,
    work: Path,
    seed: int,
    epochs: int,
) -> dict[str, Any]:
    """One whole peer runner process: wall seconds, test accuracy and its split.

    Raises:
        PeerUnavailable: It failed, printed no result or ran past ``RUN_TIMEOUT_S``.
    """
    work.mkdir(parents=True)
    cfg = config.train
    command = [
        str(env.python),
        str(Path(peer_runner.__file__).resolve()),
        "--dataset",
        str(dataset),
        "--model-json",
        str(model_json),
        "--work",
        str(work),
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--learning-rate",
        repr(cfg.learning_rate),  # per rank: the estimator scales it by the ranks, as we do
        "--batch-size",
        str(cfg.batch_size),
        "--num-proc",
        str(cfg.num_proc),
    ]
    # Our interpreter's settings must not leak into the peer's (its own site-packages).
    env_vars = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYSPARK_PYTHON")
    }
    launched = time.time()
    try:
        wall, rc, out, err = run_process([*command, "--launched", repr(launched)], work, env_vars)
    except TimeoutError as error:
        raise PeerUnavailable(f"the peer run (seed {seed}): {error}") from None
    ended = launched + wall
    try:
        result = parse_peer_output(out)
    except ValueError:
        raise PeerUnavailable(
            f"the peer run (seed {seed}) failed (exit {rc}): {last_error(err)}"
        ) from None
    return {
        "wall_s": round(wall, 2),
        "test_accuracy": float(result["test_accuracy"]),
        "split_s": peer_split(result["marks"], ended),
        "final_val_accuracy": result["history"].get("val_accuracy", [None])[-1],
        "versions": result["versions"],
    }


def parse_peer_output(stdout: str) -> dict[str, Any]:
    """The result the peer runner printed (its last ``PEER_RESULT`` line).

    Raises:
        ValueError: No such line, or not JSON.
    """
    prefix = peer_runner.RESULT_PREFIX
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    if not lines:
        raise ValueError("the peer printed no result line")
    return json.loads(lines[-1][len(prefix) :])


def peer_split(marks: Mapping[str, float], ended: float) -> dict[str, float]:
    """The peer's wall time by phase, from its marks and the time its process ended.

    Returns:
        Seconds of ``start_up`` (launch to fit: interpreter, imports, Spark session, data
        decoded and cached), ``fit`` (the estimator's ``fit``), of which ``fit_prepare``
        (Parquet written to the store), ``fit_train`` (the Horovod job: ranks started,
        epochs, rank 0's checkpoints) and ``fit_load`` (the driver's reload of the trained
        model); ``evaluation`` (transform of the test split and the
        accuracy) and ``exit`` (Spark stopped, interpreter exit). ``start_up``, ``fit``,
        ``evaluation`` and ``exit`` add up to the wall time.

    Raises:
        ValueError: A mark is missing or the marks are out of order.
    """
    missing = [m for m in peer_runner.MARKS if m not in marks]
    if missing:
        raise ValueError(f"peer marks missing: {', '.join(missing)}")
    order = [marks[m] for m in peer_runner.MARKS] + [ended]
    if any(b < a for a, b in zip(order, order[1:], strict=False)):
        raise ValueError(f"peer marks out of order: {dict(marks)}, ended {ended}")
    split = {
        "start_up": marks["fit_start"] - marks["launched"],
        "fit": marks["fit_end"] - marks["fit_start"],
        "fit_prepare": marks["prepared"] - marks["fit_start"],
        "fit_train": marks["trained"] - marks["prepared"],
        "fit_load": marks["fit_end"] - marks["trained"],
        "evaluation": marks["evaluated"] - marks["fit_end"],
        "exit": ended - marks["evaluated"],
    }
    return {k: round(v, 2) for k, v in split.items()}


def _step(name: str, command: Sequence[str]) -> str:
    """One build step, logged on one line with its time; its stdout."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PeerUnavailable(f"peer environment: {name} failed: {error}") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise PeerUnavailable(
            f"peer environment: {name} failed: {last_error(done.stderr or done.stdout)}"
        )
    installed = [line for line in done.stdout.splitlines() if line.startswith("Successfully")]
    summary = f" ({len(installed[-1].split()) - 2} packages)" if installed else ""
    log.info("bench peer: env %s%s: %.1f s", name, summary, seconds)
    return done.stdout


def _warm_up(python: Path) -> None:
    """Import TensorFlow once in each environment, untimed: both start from a warm disk."""
    for interpreter in (Path(sys.executable), python):
        try:
            subprocess.run(
                [str(interpreter), "-c", "import tensorflow, pyspark"],
                capture_output=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:  # only a warm-up: the timed runs will tell
            log.warning("bench peer: warm-up import in %s took over 300 s", interpreter)


def _model_json(config: Config, dataset: Path, seed: int) -> str:
    """Our model for ``seed`` as Keras JSON (initialiser seeds included)."""
    from pipelines.models import build_model

    manifest = DatasetDir(str(dataset)).read_manifest()
    cfg = replace(config.train, seed=seed)
    model = build_model(cfg, tuple(manifest.image_shape), len(manifest.label_names))
    return model.to_json()


def _config_overrides(config: Config) -> dict[str, str]:
    """``--set`` values that make a ``dlpipe`` subprocess use ``config``'s Spark and training."""
    train = config.train
    values = {
        "spark.master": config.spark.master,
        "train.model": train.model,
        "train.optimizer": train.optimizer,
        "train.learning_rate": train.learning_rate,
        "train.batch_size": train.batch_size,
        "train.num_proc": train.num_proc,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def _run_times(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The phase times of a finished training run, read back from its MLflow store."""
    from pipelines import tracking

    client = tracking.client(tracking_uri)
    run = client.get_run(run_id)

    def logged(key: str) -> float:
        return max(m.timestamp for m in client.get_metric_history(run_id, key)) / 1000

    return {
        "run_start": run.info.start_time / 1000,
        "trained": logged("seconds_training"),
        "evaluated": logged("test_accuracy"),
        "run_end": run.info.end_time / 1000,
        "ranks_s": float(run.data.metrics["seconds_training"]),
    }


def _details(
    config: Config,
    env: PeerEnv,
    versions: Mapping[str, str],
    dataset: Path,
    rows: Mapping[str, int],
    seeds: Sequence[int],
    epochs: int,
    runs: list[dict[str, Any]],
    load_before: list[float] | None,
) -> dict[str, Any]:
    def median_split(side: str) -> dict[str, float]:
        keys = runs[0][side]["split_s"]
        return {k: round(statistics.median(r[side]["split_s"][k] for r in runs), 2) for k in keys}

    accuracy = {side: [r[side]["test_accuracy"] for r in runs] for side in ("ours", "peer")}
    return {
        "dataset": str(dataset),
        "rows": dict(rows),
        "seeds": list(seeds),
        "epochs": epochs,
        "model": config.train.model,
        "optimizer": config.train.optimizer,
        "learning_rate_per_rank": config.train.learning_rate,
        "batch_size_per_rank": config.train.batch_size,
        "num_proc": config.train.num_proc,
        "our_overrides": dict(OUR_OVERRIDES),
        "measures": "wall seconds of the whole process, launch to exit; test split accuracy",
        "per_seed": runs,
        "split_median_s": {"ours": median_split("ours"), "peer": median_split("peer")},
        "test_accuracy": {
            **{side: [round(a, 4) for a in accuracy[side]] for side in accuracy},
            "median": {side: round(statistics.median(a), 4) for side, a in accuracy.items()},
        },
        "peer_env": str(env.path),
        "peer_env_build_s": env.build_seconds,
        # the environment's, and what the peer's own process reported
        "peer_versions": {**env.versions, **versions},
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }
