"""The training stage, driver side: MLflow run, launch the ranks, evaluate, log, register.

In: a prepared dataset (``_manifest.json`` and ``split=*/``), :class:`~pipelines.config.Config`
and a launcher. Out: an MLflow run holding the resolved config, dataset lineage, per-epoch
metrics, test metrics and the pyfunc model; a new registered model version (the alias moved
only on improvement); and a small :class:`TrainResult`.

The MLflow run's life (owner, stale runs, resume, FAILED on error) is
:mod:`pipelines.train.runs`'; the run folder's checkpoint format is
:mod:`pipelines.train.checkpoint`'s; what each rank runs is :mod:`pipelines.train.worker`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines import schema, stack, tracking
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.host import git_commit
from pipelines.images import DEFAULT_RESIZE
from pipelines.keras_api import keras
from pipelines.phases import PhaseClock
from pipelines.store import MANIFEST_ARTIFACT, DatasetDir, ModelDir, RunDir, Store
from pipelines.tasks import REPORT_SAMPLE_IMAGES, Evaluation, Task, task_for_model
from pipelines.train.checkpoint import load_final_model, read_checkpoint, read_rank_placements
from pipelines.train.runs import log_new_epochs, training_run
from pipelines.train.watch import EpochProgress, epoch_metrics
from pipelines.train.worker import RankResult, WorkerSpec, train_worker

if TYPE_CHECKING:
    from pipelines.train.launchers import Launcher

log = logging.getLogger(__name__)


class RanksDivergedError(UserError):
    """The ranks ended with different weights; the one-line message names the layers."""


class RankDiedError(UserError):
    """A training rank died and the (non-elastic) job ended; the message says what to do."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    ``phases`` splits the wall time (seconds): ``prepare`` (manifest, MLflow run and its
    inputs), ``rank_start`` (the ranks' Spark job, Horovod and TensorFlow start-up, the
    final model saved: the launch less ``fit``), ``fit`` (the slowest rank's ``fit``,
    checkpoints and per-layer statistics included), ``evaluate`` (the test split), ``report``
    (the run report, when there is one), ``log_register`` (metrics, model logged,
    registered, alias decided) and ``challenge`` (the champion loaded and evaluated on this
    run's split).

    ``promotion_metric`` is what the decision compared; ``champion_score`` the champion's
    value of it on this run's split (None without a comparable champion);
    ``previous_champion`` the version that held the alias before; ``initial_epoch`` the
    epoch this start began at (the checkpoint's with ``--resume``, else 0).
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
    promotion_metric: str = ""
    champion_score: float | None = None
    previous_champion: str | None = None
    initial_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def train(
    config: Config,
    launcher: Launcher,
    dataset: DatasetDir | str | os.PathLike[str] | None = None,
    resume: bool = False,
    report: ReportStep | None = None,
    store: Store | None = None,
) -> TrainResult:
    """Train, evaluate, log and register one model.

    Args:
        config: The resolved configuration.
        launcher: Starts the ranks (Horovod on Spark, or one local rank).
        dataset: The prepared dataset (default: the store's).
        resume: Continue the interrupted run from its last completed epoch.
        report: Called in the active run once the model is evaluated, before it is logged
            and registered (the orchestrator passes the run report step); a failure fails
            the run. None: no report.
        store: Where the stages' files and the MLflow stores are (default: the config's).

    Returns:
        Run id, test metrics and the registry decision.

    Raises:
        UserError: No dataset, no training rows, or nothing to resume.
        RankDiedError: A rank died and ended the (non-elastic) job; one line saying which
            rank (pid, host) and what to do.
        RanksDivergedError: The ranks' final weights differ.
    """
    started = time.time()
    clock = PhaseClock()
    store = store or Store.of(config)
    if not isinstance(dataset, DatasetDir):
        dataset = store.dataset(dataset)
    manifest = dataset.read_manifest()
    if manifest.splits.get("train", 0) == 0:
        raise UserError(f"{dataset.root} has no training rows; ingest more images")
    # Each run has its own folder (concurrent runs of one model never share checkpoints);
    # --resume continues the model's run started last.
    model_name = config.mlflow.model_name
    last = store.last_run_dir(model_name) if resume else None
    state = read_checkpoint(last) if last else None
    if resume and not state:
        raise UserError(f"nothing to resume: no checkpoint in {store.training(model_name)}")

    with training_run(store, config.mlflow.experiment, model_name, last, state) as run:
        if not run.resumed:
            _log_inputs(config, launcher, dataset, manifest)
        result = _train_in_run(
            config, store, launcher, dataset, manifest, run.run_dir, resume, run.run_id, report,
            clock,
        )  # fmt: skip
    return TrainResult(**{**result, "seconds": round(time.time() - started, 1)})


def _init_model(config: Config, store: Store, run_dir: RunDir) -> str | None:
    """``train.init_from``'s Keras file, copied into the run's folder for every rank.

    The version an alias points to is pinned now and tagged on the run (``init_from``),
    so the run records what it started from even after the alias moves.
    """
    import mlflow

    from pipelines.registry import download_model, resolve_model_uri
    from pipelines.store import read_bytes, write_atomic

    uri = config.train.init_from
    if not uri:
        return None
    resolved = resolve_model_uri(
        uri,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )
    local = download_model(resolved, store.model_cache, store.tracking_uri, store.registry_uri)
    keras_file = ModelDir(str(local)).keras_path
    if not keras_file.is_file():
        raise UserError(f"train.init_from {uri}: not a model logged by dlpipe (no Keras file)")
    write_atomic(run_dir.init_model, read_bytes(keras_file))
    mlflow.set_tag("init_from", resolved.uri)
    return str(run_dir.init_model)


#: Differing layers named in a RanksDivergedError before the rest are counted.
_DIVERGED_SHOWN = 8


def _diverged(ranks: list[RankResult]) -> str:
    """One line: which ranks and layers ended with weights other than rank 0's."""
    first, *others = sorted(ranks, key=lambda r: r.rank)
    layers = [
        name
        for name, digest in first.layer_digests.items()
        if any(r.layer_digests.get(name) != digest for r in others)
    ]
    apart = [r.rank for r in others if r.weights_sha256 != first.weights_sha256]
    shown = ", ".join(layers[:_DIVERGED_SHOWN]) or "(no layer digests returned)"
    more = f" and {len(layers) - _DIVERGED_SHOWN} more" if len(layers) > _DIVERGED_SHOWN else ""
    return (
        f"ranks {apart} finished with weights other than rank 0's in {len(layers)} layer(s): "
        f"{shown}{more}; state that the ranks do not average (a layer's own variables) "
        "drifted apart, so the model is not registered"
    )


def _train_in_run(
    config: Config,
    store: Store,
    launcher: Launcher,
    dataset: DatasetDir,
    manifest: schema.Manifest,
    run_dir: RunDir,
    resume: bool,
    run_id: str,
    report: ReportStep | None,
    clock: PhaseClock,
) -> dict[str, Any]:
    import mlflow

    from pipelines import image_model, registry

    spec = WorkerSpec(
        train=config.train,
        launcher=launcher.kind,
        dataset=dataset,
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows=manifest.splits,
        run_dir=run_dir,
        resume=resume,
        run_id=run_id,  # rank 0 logs each epoch to it as the epoch ends
        init_model=_init_model(config, store, run_dir),
    )
    run_dir.clear_ranks()  # the ranks of this start write anew
    clock.lap("prepare")
    # The driver needs the model framework only once the ranks return (to load, evaluate
    # and report): imported while they start and train, its seconds leave the critical path.
    framework = threading.Thread(target=keras, name="dlpipe-import-framework", daemon=True)
    framework.start()
    try:
        with EpochProgress(run_dir, config.train.epochs):
            ranks: list[RankResult] = launcher.run(
                train_worker,
                [spec],
                elastic=config.train.elastic,
                min_num_proc=config.train.min_num_proc,
                rank_timeout_s=config.train.rank_timeout_s,
                env=tracking.rank_environment(store.tracking_uri),
            )
    except Exception as exc:
        from pipelines.train.launchers import RankLostError

        if isinstance(exc, RankLostError):
            raise _rank_died(exc, run_dir) from exc
        raise
    finally:
        framework.join()  # an import cut short at exit can crash the interpreter
    # What train.use_gpu (auto in particular) gave each rank: a param of the run as first
    # trained, and tags that a resume (maybe on other devices) updates.
    devices = {str(r.rank): r.device for r in sorted(ranks, key=lambda r: r.rank)}
    if "devices" not in mlflow.get_run(run_id).data.params:  # params cannot change later
        mlflow.log_params({"devices": json.dumps(devices), "precision": ranks[0].precision})
    mlflow.set_tags({"devices": json.dumps(devices), "precision": ranks[0].precision})
    # Which executor each rank ran on (on a cluster, two ranks should not share one), and
    # each rank's final weights: the one check that gradients really were averaged.
    placements = {str(r.rank): r.placement for r in ranks}
    mlflow.set_tag("rank_placement", json.dumps(placements, sort_keys=True))
    digests = {r.rank: r.weights_sha256 for r in ranks}
    mlflow.set_tag("rank_weights_sha256", json.dumps(digests, sort_keys=True))
    if len(set(digests.values())) != 1:
        raise RanksDivergedError(_diverged(ranks))
    rank0 = min(ranks, key=lambda r: r.rank)
    launch, fit = clock.lap(), max(r.fit_seconds for r in ranks)
    clock.add("rank_start", max(0.0, launch - fit))
    clock.add("fit", fit)
    # Elastic: the world size from each epoch on where it changed (a lost rank, a new one).
    mlflow.set_tag("world_size_changes", json.dumps(rank0.world_sizes[1:]))
    # Rank 0 logged each epoch as it ended; this logs what it could not (its tracking
    # server unreachable, a rank killed between commit and log), never an epoch twice.
    # Per-layer statistics of rank 0 (train.layer_stats), step = epoch like the history.
    layer_stats = rank0.layer_stats
    log_new_epochs(run_id, epoch_metrics(rank0.history, layer_stats))
    mlflow.log_metrics(
        {"epochs_run": rank0.epochs, "seconds_training": max(r.seconds for r in ranks)}
    )

    model = load_final_model(run_dir)
    task = task_for_model(config.train.model)
    clock.lap("log_register")
    evaluation = evaluate(model, dataset, manifest, task)
    clock.lap("evaluate")
    mlflow.log_metrics(evaluation.metrics)
    mlflow.log_text(_summary(model), "model_summary.txt")
    if report is not None:
        trained = Trained(
            model,
            rank0.history,
            evaluation,
            manifest,
            task,
            layer_stats=layer_stats,
            layer_histograms=rank0.layer_histograms,
        )
        clock.lap("log_register")
        report(config, trained)
        clock.lap("report")

    info = image_model.log_image_model(
        model,
        label_names=manifest.label_names,
        image_shape=list(manifest.image_shape),
        task=task,
        input_example_png=evaluation.example_png,
        resize=manifest.resize,
    )
    metric, higher_is_better = task.promotion_metric(config.registry.metric)
    challenge = ChampionChallenge(config, store, dataset, manifest, task, metric)
    registration = registry.register_and_promote(
        info.model_uri,
        run_id,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        metric=metric,
        higher_is_better=higher_is_better,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
        challenge=challenge,
        min_improvement=config.registry.min_improvement,
        incomparable=config.registry.incomparable,
        evidence={
            "promotion_split": evaluation_split(manifest),
            "promotion_split_sha256": hashlib.sha256(dataset.manifest_bytes()).hexdigest(),
            "promotion_dataset": dataset.root,
        },
    )
    log.info("train: %s", registration.decision)
    # Which stack trained it: scoring and serving on the other one refuse it in one line.
    tracking.client(store.tracking_uri, store.registry_uri).set_model_version_tag(
        registration.model_name, registration.version, stack.STACK_TAG, stack.current()
    )
    clock.lap("log_register")
    if challenge.seconds:  # there was a champion to evaluate
        clock.add("log_register", -challenge.seconds)
        clock.add("challenge", challenge.seconds)
    log.info(
        "train: seconds by phase: %s", ", ".join(f"{k} {v:g}" for k, v in clock.phases.items())
    )
    return {
        "run_id": run_id,
        "experiment": config.mlflow.experiment,
        "tracking_uri": tracking.shown_uri(store.tracking_uri),
        "world_size": rank0.size,
        "epochs": rank0.epochs,
        "initial_epoch": rank0.initial_epoch,
        "stopped_early": rank0.stopped_early,
        "test_metrics": evaluation.metrics,
        "model_uri": registration.model_uri,
        "model_name": registration.model_name,
        "model_version": registration.version,
        "alias": registration.alias,
        "promoted": registration.promoted,
        "decision": registration.decision,
        "promotion_metric": metric,
        "champion_score": registration.champion_score,
        "previous_champion": registration.previous_champion,
        "phases": clock.phases,
    }


@dataclass(frozen=True)
class Trained:
    """The evaluated model in memory, for a step run in the training run (the report)."""

    model: Any  # the Keras model
    history: dict[str, list[float]]  # rank 0's per-epoch metrics
    evaluation: Evaluation
    manifest: schema.Manifest  # the prepared dataset's manifest
    task: Task
    #: Rank 0's per-layer statistics and histograms per epoch (empty with
    #: ``train.layer_stats`` off); formats in :mod:`pipelines.train.layer_stats`.
    layer_stats: dict[str, list[float]] = field(default_factory=dict)
    layer_histograms: dict[str, list[list[list[float]]]] = field(default_factory=dict)


#: A step run in the active training run once the model is evaluated: ``(config, trained)``.
ReportStep = Callable[[Config, Trained], None]


def evaluation_split(manifest: schema.Manifest) -> str:
    """The split models are evaluated (and compared) on: test, else val when test is empty."""
    return "test" if manifest.splits.get("test", 0) else "val"


def evaluate(
    model: Any,
    dataset: DatasetDir,
    manifest: schema.Manifest,
    task: Task,
    sample_limit: int = REPORT_SAMPLE_IMAGES,
) -> Evaluation:
    """Evaluate the model on the test split (the val split if test is empty), streaming.

    The split is read one row group at a time: the driver holds one row group and the
    report's bounded sample (at most ``sample_limit`` images), whatever the split's size.
    """
    from pipelines.images import normalise
    from pipelines.train.feed import iter_split

    split = evaluation_split(manifest)
    if not manifest.splits.get(split, 0):
        raise UserError(f"{dataset.root} has neither test nor val rows to evaluate on")
    evaluator = task.evaluator(manifest.label_names, limit=sample_limit)
    for images, labels, paths in iter_split(dataset.split(split), tuple(manifest.image_shape)):
        outputs = model.predict(normalise(images), batch_size=256, verbose=0)
        evaluator.update(images, labels, paths, outputs)
    return evaluator.result()


class ChampionChallenge:
    """The champion evaluated on this run's split: the registry's challenge (a callable).

    The champion's Keras model is loaded from its registered pyfunc's artifacts
    (:class:`~pipelines.store.ModelDir`, downloaded once per version into the model cache)
    and evaluated by :func:`evaluate` with the task's evaluator, streaming, as the new model
    was. A champion trained for another task, input shape or set of classes cannot be
    evaluated on this split: it is not comparable, and says why.

    Attributes:
        seconds: Time spent in the challenge (download and evaluation).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        dataset: DatasetDir,
        manifest: schema.Manifest,
        task: Task,
        metric: str,
    ) -> None:
        self.config, self.store, self.dataset = config, store, dataset
        self.manifest, self.task, self.metric = manifest, task, metric
        self.seconds = 0.0

    def __call__(self, champion: Any) -> Any:
        """Evaluate ``champion`` (a registered model version); its :class:`ChampionScore`."""
        import mlflow

        from pipelines.registry import ChampionScore

        started = time.time()
        try:
            found = self._load(champion)
            if isinstance(found, str):
                log.warning("train: champion v%s is not comparable: %s", champion.version, found)
                return ChampionScore(None, found)
            evaluation = evaluate(found, self.dataset, self.manifest, self.task, sample_limit=1)
            value = float(evaluation.metrics[self.metric])
            mlflow.log_metric(f"champion_{self.metric}", value)
            log.info(
                "train: champion v%s on this run's %s split: %s %.6g",
                champion.version, evaluation_split(self.manifest), self.metric, value,
            )  # fmt: skip
            return ChampionScore(value)
        finally:
            self.seconds += time.time() - started

    def _load(self, champion: Any) -> Any:
        """The champion's Keras model, or why it cannot be evaluated on this split."""
        from pipelines.keras_api import keras
        from pipelines.registry import ResolvedModel, download_model
        from pipelines.tasks import task_of_record

        name, version = self.config.mlflow.model_name, str(champion.version)
        try:
            folder = ModelDir(
                str(
                    download_model(
                        ResolvedModel(f"models:/{name}/{version}", name, version),
                        self.store.model_cache,
                        self.store.tracking_uri,
                        self.store.registry_uri,
                    )
                )
            )
        except Exception as exc:  # noqa: BLE001 - a champion gone is a reason, not a crash
            return f"its model could not be downloaded: {type(exc).__name__}: {exc}"[:300]
        meta = folder.meta()
        if not meta or not folder.keras_path.is_file():
            return "its model has no Keras file and labels (not an image model of dlpipe?)"
        trained_on = meta.get(stack.STACK_TAG) or stack.DEFAULT
        if trained_on != stack.current():
            return f"it was trained on the {trained_on} stack, this is the {stack.current()} stack"
        why = incomparable(meta, self.manifest, self.task, task_of_record(meta))
        return why or keras().models.load_model(folder.keras_path, compile=False)


def incomparable(
    meta: dict[str, Any], manifest: schema.Manifest, task: Task, champion_task: Task
) -> str | None:
    """Why a model (its label sidecar ``meta``) cannot be evaluated on ``manifest``'s data.

    Returns:
        The reason, or None when the task, input shape, resize mode and (for a classifier)
        the classes and their order are this dataset's.
    """
    if champion_task is not task:
        return f"it is a {champion_task.name} model, this one {task.name}"
    shape = [int(d) for d in meta.get("image_shape", [])]
    if shape != list(manifest.image_shape):
        return f"input {_shape(shape)}, this dataset {_shape(manifest.image_shape)}"
    # The dataset's pixels were made square one way; a model trained on another sees others.
    resize = str(meta.get("resize", DEFAULT_RESIZE))
    if resize != manifest.resize:
        return f"images resized by {resize}, this dataset by {manifest.resize}"
    names = [str(n) for n in meta.get("label_names", [])]
    if task.uses_labels and names != list(manifest.label_names):
        return f"classes {_names(names)}, this dataset {_names(manifest.label_names)}"
    return None


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape) or "unknown"


def _names(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
    return f"[{shown}]"


def _log_inputs(
    config: Config, launcher: Launcher, dataset: DatasetDir, manifest: schema.Manifest
) -> None:
    """Params (the whole resolved config), lineage and tags, once per run."""
    import mlflow

    manifest_bytes = dataset.manifest_bytes()
    params = tracking.redacted(_flatten(config.to_dict()))
    params.update(
        {
            "world_size": launcher.num_proc,
            "dataset": dataset.root,
            "dataset_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "dataset_rows": json.dumps(manifest.splits, sort_keys=True),
        }
    )
    mlflow.log_params(params)
    mlflow.log_text(manifest_bytes.decode(), MANIFEST_ARTIFACT)
    tags = {"stage": "train", "launcher": launcher.kind, stack.STACK_TAG: stack.current()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    mlflow.set_tags(tags)


def _rank_died(exc: Any, run_dir: RunDir) -> RankDiedError:
    """The one-line error for a lost rank, with its pid and host when it had written them.

    Horovod names the first rank to exit with an error, which may be a survivor that
    noticed the loss before the dead rank's exit was collected: a rank that recorded its
    own exception is a survivor; one that recorded none was killed.
    """
    placements = read_rank_placements(run_dir)
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
