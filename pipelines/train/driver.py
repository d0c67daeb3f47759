"""The training stage, driver side: MLflow run, launch the ranks, evaluate, log, register.

In: a prepared dataset (``_manifest.json`` and ``split=*/``), :class:`~pipelines.config.Config`
and a launcher. Out: an MLflow run holding the resolved config, dataset lineage, per-epoch
metrics, test metrics and the pyfunc model; a new registered model version (the alias moved
only on improvement); and a small :class:`TrainResult`.

A run that fails is marked FAILED with the error as a tag, never left RUNNING. A run
whose process was killed (nothing could mark it) is marked FAILED by the next ``train``:
every run is tagged with its owner (host, pid, process start time), and a RUNNING run whose
owner is gone from this host is stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import schema, tracking
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.host import git_commit
from pipelines.train.worker import (
    FINAL_MODEL,
    RANKS_DIR,
    WorkerSpec,
    read_checkpoint_state,
    read_rank_placements,
    train_worker,
)

if TYPE_CHECKING:
    from pipelines.train.launcher import Launcher

log = logging.getLogger(__name__)


#: Tags naming the process that owns a run: a RUNNING run whose owner is gone is stale.
OWNER_HOST, OWNER_PID, OWNER_STARTED = "owner_host", "owner_pid", "owner_started"


class RanksDivergedError(RuntimeError):
    """The ranks ended with different weights: gradients were not averaged."""


class RankDiedError(UserError):
    """A training rank died and the (non-elastic) job ended; the message says what to do."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    ``phases`` splits the wall time (seconds): ``prepare`` (manifest, MLflow run and its
    inputs), ``rank_start`` (the ranks' Spark job, Horovod and TensorFlow start-up, the
    final model saved: the launch less ``fit``), ``fit`` (the slowest rank's ``fit``,
    checkpoints and per-layer statistics included), ``evaluate`` (the test split), ``report``
    (the run report, when there is one) and ``log_register`` (metrics, model logged,
    registered, alias decided).
    """

    run_id: str
    experiment: str
    tracking_uri: str
    world_size: int
    epochs: int
    stopped_early: bool
    test_metrics: dict[str, float]
    model_uri: str
    model_name: str
    model_version: str
    alias: str
    promoted: bool
    decision: str
    phases: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


class _PhaseClock:
    """Wall seconds per phase of a training run: each lap adds the time since the last."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.time()

    def lap(self, phase: str | None = None) -> float:
        """Seconds since the last lap, added to ``phase`` (None: only returned)."""
        now = time.time()
        seconds, self._last = now - self._last, now
        if phase is not None:
            self.add(phase, seconds)
        return seconds

    def add(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` to ``phase``."""
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 2)


def load_manifest(dataset: Path) -> schema.Manifest:
    """Read a prepared dataset's manifest, or fail with a one-line hint."""
    return schema.Manifest.read(dataset)


def checkpoint_dir(config: Config) -> Path:
    """Where rank 0 keeps the checkpoint of the current model (what ``--resume`` reads)."""
    return config.locations.training(config.mlflow.model_name)


def train(
    config: Config,
    launcher: Launcher,
    dataset: str | Path | None = None,
    resume: bool = False,
    report: ReportStep | None = None,
) -> TrainResult:
    """Train, evaluate, log and register one model.

    Args:
        config: The resolved configuration.
        launcher: Starts the ranks (Horovod on Spark, or one local rank).
        dataset: Prepared dataset directory (default: the configured one).
        resume: Continue the interrupted run from its last completed epoch.
        report: Called in the active run once the model is evaluated, before it is logged
            and registered (the orchestrator passes the run report step); a failure fails
            the run. None: no report.

    Returns:
        Run id, test metrics and the registry decision.

    Raises:
        UserError: No dataset, no training rows, or nothing to resume.
        RankDiedError: A rank died and ended the (non-elastic) job; one line saying which
            rank (pid, host) and what to do.
        RanksDivergedError: The ranks' final weights differ.
    """
    import mlflow

    started = time.time()
    clock = _PhaseClock()
    where = config.locations
    data_dir = Path(dataset).expanduser().resolve() if dataset else where.prepared
    manifest = load_manifest(data_dir)
    if manifest.splits.get("train", 0) == 0:
        raise UserError(f"{data_dir} has no training rows; ingest more images")
    out = checkpoint_dir(config)
    state = read_checkpoint_state(out) if resume else None
    if resume and not state:
        raise UserError(f"nothing to resume: no checkpoint in {out}")
    if not resume:
        shutil.rmtree(out, ignore_errors=True)

    experiment_id = tracking.use_experiment(where, config.mlflow.experiment)
    fail_stale_runs(where.tracking_uri, experiment_id)
    run_id = _remembered_run(out) if state else None
    previous = _reopen(where.tracking_uri, run_id) if run_id else None
    with mlflow.start_run(run_id=run_id) as run:
        try:
            mlflow.set_tags(_owner_tags())
            if state is None:
                _log_inputs(config, launcher, data_dir, manifest)
                _remember_run(out, run.info.run_id)
            else:
                _tag_resume(run.info.run_id, state["epoch"], previous)
            result = _train_in_run(
                config, launcher, data_dir, manifest, out, resume, run.info.run_id, report, clock
            )
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
            raise
    return TrainResult(**{**result, "seconds": round(time.time() - started, 1)})


def _train_in_run(
    config: Config,
    launcher: Launcher,
    data_dir: Path,
    manifest: schema.Manifest,
    out: Path,
    resume: bool,
    run_id: str,
    report: ReportStep | None,
    clock: _PhaseClock,
) -> dict[str, Any]:
    import mlflow

    from pipelines import image_model, registry
    from pipelines.models import is_autoencoder

    spec = WorkerSpec(
        train=config.train,
        launcher=launcher.kind,
        dataset=str(data_dir),
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows=manifest.splits,
        out_dir=str(out),
        resume=resume,
    )
    shutil.rmtree(out / RANKS_DIR, ignore_errors=True)  # the ranks of this start write anew
    clock.lap("prepare")
    try:
        ranks = launcher.run(
            train_worker,
            [spec],
            elastic=config.train.elastic,
            min_num_proc=config.train.min_num_proc,
            rank_timeout_s=config.train.rank_timeout_s,
        )
    except Exception as exc:
        from pipelines.train.launcher import RankLostError

        if isinstance(exc, RankLostError):
            raise _rank_died(exc, out) from exc
        raise
    # What train.use_gpu (auto in particular) gave each rank: a param of the run as first
    # trained, and tags that a resume (maybe on other devices) updates.
    devices = {str(r["rank"]): r["device"] for r in sorted(ranks, key=lambda r: r["rank"])}
    if "devices" not in mlflow.get_run(run_id).data.params:  # params cannot change later
        mlflow.log_params({"devices": json.dumps(devices), "precision": ranks[0]["precision"]})
    mlflow.set_tags({"devices": json.dumps(devices), "precision": ranks[0]["precision"]})
    # Which executor each rank ran on (on a cluster, two ranks should not share one), and
    # each rank's final weights: the one check that gradients really were averaged.
    placements = {str(r["rank"]): r["placement"] for r in ranks}
    mlflow.set_tag("rank_placement", json.dumps(placements, sort_keys=True))
    digests = {r["rank"]: r["weights_sha256"] for r in ranks}
    mlflow.set_tag("rank_weights_sha256", json.dumps(digests, sort_keys=True))
    if len(set(digests.values())) != 1:
        raise RanksDivergedError(f"ranks finished with different weights: {digests}")
    rank0 = min(ranks, key=lambda r: r["rank"])
    launch, fit = clock.lap(), max(r["fit_seconds"] for r in ranks)
    clock.add("rank_start", max(0.0, launch - fit))
    clock.add("fit", fit)
    # Elastic: the world size from each epoch on where it changed (a lost rank, a new one).
    mlflow.set_tag("world_size_changes", json.dumps(rank0["world_sizes"][1:]))
    _log_new_epochs(run_id, rank0["history"])
    # Per-layer statistics of rank 0 (train.layer_stats), step = epoch like the history.
    layer_stats = rank0.get("layer_stats", {})
    _log_new_epochs(run_id, {f"layer/{name}": values for name, values in layer_stats.items()})
    mlflow.log_metrics(
        {"epochs_run": rank0["epochs"], "seconds_training": max(r["seconds"] for r in ranks)}
    )

    model = _load_final_model(out)
    autoencoder = is_autoencoder(config.train)
    clock.lap("log_register")
    evaluation = evaluate(model, data_dir, manifest, autoencoder)
    clock.lap("evaluate")
    mlflow.log_metrics(evaluation.metrics)
    mlflow.log_text(_summary(model), "model_summary.txt")
    if report is not None:
        trained = Trained(
            model,
            rank0["history"],
            evaluation,
            manifest,
            autoencoder,
            layer_stats=layer_stats,
            layer_histograms=rank0.get("layer_histograms", {}),
        )
        clock.lap("log_register")
        report(config, trained)
        clock.lap("report")

    info = image_model.log_image_model(
        model,
        label_names=manifest.label_names,
        image_shape=list(manifest.image_shape),
        autoencoder=autoencoder,
        input_example_png=evaluation.example_png,
    )
    metric = "test_reconstruction_error" if autoencoder else "test_accuracy"
    registration = registry.register_and_promote(
        info.model_uri,
        run_id,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        metric=metric,
        higher_is_better=not autoencoder,
        tracking_uri=config.locations.tracking_uri,
        registry_uri=config.locations.registry_uri,
    )
    log.info("train: %s", registration.decision)
    clock.lap("log_register")
    log.info(
        "train: seconds by phase: %s", ", ".join(f"{k} {v:g}" for k, v in clock.phases.items())
    )
    return {
        "run_id": run_id,
        "experiment": config.mlflow.experiment,
        "tracking_uri": tracking.shown_uri(config.locations.tracking_uri),
        "world_size": rank0["size"],
        "epochs": rank0["epochs"],
        "stopped_early": rank0["stopped_early"],
        "test_metrics": evaluation.metrics,
        "model_uri": registration.model_uri,
        "model_name": registration.model_name,
        "model_version": registration.version,
        "alias": registration.alias,
        "promoted": registration.promoted,
        "decision": registration.decision,
        "phases": clock.phases,
    }


@dataclass(frozen=True)
class Evaluation:
    """Test-split metrics, predictions for reports, and one example image for the signature."""

    metrics: dict[str, float]
    labels: Any  # np.ndarray (N,) true label indices
    outputs: Any  # np.ndarray: class probabilities (N, K) or reconstructions
    example_png: bytes
    arrays: Any = None  # SplitArrays: the evaluated split, for the report


@dataclass(frozen=True)
class Trained:
    """The evaluated model in memory, for a step run in the training run (the report)."""

    model: Any  # the Keras model
    history: dict[str, list[float]]  # rank 0's per-epoch metrics
    evaluation: Evaluation
    manifest: schema.Manifest  # the prepared dataset's manifest
    autoencoder: bool
    #: Rank 0's per-layer statistics and histograms per epoch (empty with
    #: ``train.layer_stats`` off); formats in :mod:`pipelines.train.layer_stats`.
    layer_stats: dict[str, list[float]] = field(default_factory=dict)
    layer_histograms: dict[str, list[list[list[float]]]] = field(default_factory=dict)


#: A step run in the active training run once the model is evaluated: ``(config, trained)``.
ReportStep = Callable[[Config, Trained], None]


def evaluate(
    model: Any, data_dir: Path, manifest: schema.Manifest, autoencoder: bool
) -> Evaluation:
    """Score the test split (the val split if test is empty) in this process."""
    import numpy as np

    from pipelines.images import encode_png, normalise
    from pipelines.train.feed import read_split

    split = "test" if manifest.splits.get("test", 0) else "val"
    if not manifest.splits.get(split, 0):
        raise UserError(f"{data_dir} has neither test nor val rows to evaluate on")
    arrays = read_split(schema.split_path(str(data_dir), split), tuple(manifest.image_shape))
    x = normalise(arrays.images)
    outputs = model.predict(x, batch_size=256, verbose=0)
    if autoencoder:
        metrics = {"test_reconstruction_error": float(np.mean(np.abs(outputs - x)))}
    else:
        picked = outputs[np.arange(len(arrays.labels)), arrays.labels]
        metrics = {
            "test_accuracy": float(np.mean(np.argmax(outputs, axis=1) == arrays.labels)),
            "test_loss": float(np.mean(-np.log(np.clip(picked, 1e-7, 1.0)))),
        }
    metrics["test_rows"] = float(len(arrays.labels))
    return Evaluation(metrics, arrays.labels, outputs, encode_png(arrays.images[0]), arrays)


def _log_inputs(
    config: Config, launcher: Launcher, data_dir: Path, manifest: schema.Manifest
) -> None:
    """Params (the whole resolved config), lineage and tags, once per run."""
    import mlflow

    manifest_bytes = (data_dir / schema.MANIFEST_FILE).read_bytes()
    params = tracking.redacted(_flatten(config.to_dict()))
    params.update(
        {
            "world_size": launcher.num_proc,
            "dataset": str(data_dir),
            "dataset_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "dataset_rows": json.dumps(manifest.splits, sort_keys=True),
        }
    )
    mlflow.log_params(params)
    mlflow.log_text(manifest_bytes.decode(), "dataset/_manifest.json")
    tags = {"stage": "train", "launcher": launcher.kind}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    mlflow.set_tags(tags)


def _rank_died(exc: Any, out: Path) -> RankDiedError:
    """The one-line error for a lost rank, with its pid and host when it had written them.

    Horovod names the first rank to exit with an error, which may be a survivor that
    noticed the loss before the dead rank's exit was collected: a rank that recorded its
    own exception is a survivor; one that recorded none was killed.
    """
    placements = read_rank_placements(out)
    lost = "its executor was lost" if exc.exit_code is None else f"exit status {exc.exit_code}"
    rank, status = exc.rank, lost
    if "failed" in placements.get(rank, {}):
        silent = [r for r, info in sorted(placements.items()) if "failed" not in info]
        if silent:
            rank, status = silent[0], "killed or crashed"
    where = placements.get(rank)
    who = f"rank {rank}"
    if where:
        who += f" (pid {where['pid']} on host {where['host']})"
    return RankDiedError(
        f"{who} died ({status}) and ended the job: resume with "
        "`dlpipe train --resume` or set train.elastic=true to carry on without it"
    )


def _log_new_epochs(run_id: str, history: dict[str, list[float]]) -> None:
    """Log each epoch's metrics at step=epoch, skipping epochs the run already holds.

    A resumed run gets the epochs of its checkpoint's history again: those logged by the
    interrupted attempt are not logged twice.
    """
    from mlflow.entities import Metric

    client = tracking.client()
    now = int(time.time() * 1000)
    metrics = []
    for name, values in history.items():
        logged = {m.step for m in client.get_metric_history(run_id, name)}
        metrics += [
            Metric(name, float(value), now, epoch)
            for epoch, value in enumerate(values)
            if epoch not in logged
        ]
    for start in range(0, len(metrics), 500):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 500])


def _owner_tags() -> dict[str, str]:
    """This process as the run's owner: host, pid and the process's start time."""
    import psutil

    me = psutil.Process()
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(me.pid),
        OWNER_STARTED: f"{me.create_time():.3f}",
    }


def _owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether a run's owner process still runs; None when unknown (no tags, another host)."""
    import psutil

    if tags.get(OWNER_HOST) != socket.gethostname() or OWNER_PID not in tags:
        return None
    try:
        process = psutil.Process(int(tags[OWNER_PID]))
        # A reused pid is another process: compare start times too.
        return abs(process.create_time() - float(tags.get(OWNER_STARTED, 0))) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def fail_stale_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Mark FAILED, with a reason, every RUNNING run of the experiment whose owner is gone.

    A run whose process was SIGKILLed (or whose host went down) could not end itself and
    would show as RUNNING for ever. Only runs owned by a process of this host are judged:
    whether a pid on another host lives cannot be told from here.

    Returns:
        The ids of the runs marked FAILED.
    """
    client = tracking.client(tracking_uri)
    failed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if _owner_alive(tags) is not False:
            continue
        reason = (
            f"stale: its process (pid {tags[OWNER_PID]} on host {tags[OWNER_HOST]}) ended "
            f"without ending the run (killed?); marked FAILED by pid {os.getpid()}"
        )
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("train: run %s was %s", run.info.run_id, reason)
        failed.append(run.info.run_id)
    return failed


def _reopen(tracking_uri: str, run_id: str) -> dict[str, str]:
    """Check that the run to resume is not still running; return its status and error."""
    run = tracking.client(tracking_uri).get_run(run_id)
    if run.info.status == "RUNNING" and _owner_alive(run.data.tags):
        raise UserError(
            f"run {run_id} is still RUNNING (pid {run.data.tags.get(OWNER_PID, '?')} on host "
            f"{run.data.tags.get(OWNER_HOST, '?')}); stop it before --resume"
        )
    return {"status": run.info.status, "error": run.data.tags.get("error", "")}


def _tag_resume(run_id: str, epoch: int, previous: dict[str, str] | None) -> None:
    """Record the resume on the run: from which epoch, after what; clear the old error."""
    import mlflow

    run = mlflow.get_run(run_id)
    resumes = json.loads(run.data.tags.get("resumes", "[]"))
    resumes.append({"epoch": epoch, **(previous or {})})
    mlflow.set_tag("resumes", json.dumps(resumes))
    if "error" in run.data.tags:
        tracking.client().delete_tag(run_id, "error")


def _remember_run(out: Path, run_id: str) -> None:
    """Let ``--resume`` find the MLflow run of an interrupted training."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id}))


def _remembered_run(out: Path) -> str | None:
    path = out / "run.json"
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def _load_final_model(out: Path) -> Any:
    from pipelines.keras_api import keras

    return keras().models.load_model(out / FINAL_MODEL, compile=False)


def _summary(model: Any) -> str:
    from pipelines.models import model_summary

    return model_summary(model)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
