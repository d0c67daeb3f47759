"""The training stage, driver side: MLflow run, launch the ranks, evaluate, log, register.

In: a prepared dataset (``_manifest.json`` and ``split=*/``), :class:`~pipelines.config.Config`
and a launcher. Out: an MLflow run holding the resolved config, dataset lineage, per-epoch
metrics, test metrics and the pyfunc model; a new registered model version (the alias moved
only on improvement); and a small :class:`TrainResult`.

A run that fails is marked FAILED with the error as a tag, never left RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import schema
from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.host import git_commit
from pipelines.train.worker import FINAL_MODEL, WorkerSpec, read_checkpoint_state, train_worker

if TYPE_CHECKING:
    from pipelines.train.launcher import Launcher

log = logging.getLogger(__name__)


class RanksDivergedError(RuntimeError):
    """The ranks ended with different weights: gradients were not averaged."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

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
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def load_manifest(dataset: Path) -> dict[str, Any]:
    """Read a prepared dataset's manifest, or fail with a one-line hint."""
    path = dataset / schema.MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"no prepared dataset at {dataset} (missing {path.name}); run 'dlpipe ingest' first"
        )
    return json.loads(path.read_text())


def checkpoint_dir(config: Config) -> Path:
    """Where rank 0 keeps the checkpoint of the current model (what ``--resume`` reads)."""
    return config.work_path / "training" / config.mlflow.model_name


def train(
    config: Config, launcher: Launcher, dataset: str | Path | None = None, resume: bool = False
) -> TrainResult:
    """Train, evaluate, log and register one model.

    Args:
        config: The resolved configuration.
        launcher: Starts the ranks (Horovod on Spark, or one local rank).
        dataset: Prepared dataset directory (default: the configured one).
        resume: Continue the interrupted run from its last completed epoch.

    Returns:
        Run id, test metrics and the registry decision.

    Raises:
        UserError: No dataset, no training rows, or nothing to resume.
        RanksDivergedError: The ranks' final weights differ.
    """
    import mlflow

    started = time.time()
    data_dir = Path(dataset).expanduser().resolve() if dataset else config.prepared_path
    manifest = load_manifest(data_dir)
    if manifest["splits"].get("train", 0) == 0:
        raise UserError(f"{data_dir} has no training rows; ingest more images")
    out = checkpoint_dir(config)
    state = read_checkpoint_state(out) if resume else None
    if resume and not state:
        raise UserError(f"nothing to resume: no checkpoint in {out}")
    if not resume:
        shutil.rmtree(out, ignore_errors=True)

    mlflow.set_tracking_uri(config.tracking_uri)
    if config.mlflow.registry_uri:
        mlflow.set_registry_uri(config.mlflow.registry_uri)
    _use_experiment(config)
    run_id = _remembered_run(out) if state else None
    with mlflow.start_run(run_id=run_id) as run:
        try:
            if state is None:
                _log_inputs(config, launcher, data_dir, manifest)
                _remember_run(out, run.info.run_id)
            result = _train_in_run(
                config, launcher, data_dir, manifest, out, resume, run.info.run_id
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
    manifest: dict[str, Any],
    out: Path,
    resume: bool,
    run_id: str,
) -> dict[str, Any]:
    import mlflow

    from pipelines import registry, serving
    from pipelines.models import is_autoencoder

    spec = WorkerSpec(
        train=config.train,
        launcher=launcher.kind,
        dataset=str(data_dir),
        image_shape=tuple(manifest["image_shape"]),
        num_classes=len(manifest["label_names"]),
        rows=manifest["splits"],
        out_dir=str(out),
        resume=resume,
    )
    ranks = launcher.run(train_worker, [spec])
    # What train.use_gpu (auto in particular) gave each rank; tags, as a resume may differ.
    devices = {str(r["rank"]): r["device"] for r in sorted(ranks, key=lambda r: r["rank"])}
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
    for name, values in rank0["history"].items():
        for epoch, value in enumerate(values):
            mlflow.log_metric(name, value, step=epoch)
    mlflow.log_metrics(
        {"epochs_run": rank0["epochs"], "seconds_training": max(r["seconds"] for r in ranks)}
    )

    model = _load_final_model(out)
    autoencoder = is_autoencoder(config.train)
    evaluation = evaluate(model, data_dir, manifest, autoencoder)
    mlflow.log_metrics(evaluation.metrics)
    mlflow.log_text(_summary(model), "model_summary.txt")
    _log_report(config, model, rank0["history"], evaluation, manifest, autoencoder)

    info = serving.log_image_model(
        model,
        label_names=manifest["label_names"],
        image_shape=list(manifest["image_shape"]),
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
        tracking_uri=config.tracking_uri,
        registry_uri=config.mlflow.registry_uri,
    )
    log.info("train: %s", registration.decision)
    return {
        "run_id": run_id,
        "experiment": config.mlflow.experiment,
        "tracking_uri": config.tracking_uri,
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
    }


@dataclass(frozen=True)
class Evaluation:
    """Test-split metrics, predictions for reports, and one example image for the signature."""

    metrics: dict[str, float]
    labels: Any  # np.ndarray (N,) true label indices
    outputs: Any  # np.ndarray: class probabilities (N, K) or reconstructions
    example_png: bytes
    arrays: Any = None  # SplitArrays: the evaluated split, for the report


def evaluate(model: Any, data_dir: Path, manifest: dict[str, Any], autoencoder: bool) -> Evaluation:
    """Score the test split (the val split if test is empty) in this process."""
    import numpy as np

    from pipelines.images import encode_png, normalise
    from pipelines.train.feed import read_split

    split = "test" if manifest["splits"].get("test", 0) else "val"
    if not manifest["splits"].get(split, 0):
        raise UserError(f"{data_dir} has neither test nor val rows to evaluate on")
    arrays = read_split(schema.split_path(str(data_dir), split), tuple(manifest["image_shape"]))
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


def _log_report(
    config: Config,
    model: Any,
    history: dict[str, list[float]],
    evaluation: Evaluation,
    manifest: dict[str, Any],
    autoencoder: bool,
) -> None:
    """Log the run report's artifacts (curves, confusion, filters, ...) under ``report/``."""
    from pipelines.report import log_training_report

    report = log_training_report(
        model,
        history=history,
        arrays=evaluation.arrays,
        outputs=evaluation.outputs,
        label_names=manifest["label_names"],
        autoencoder=autoencoder,
        tsne=config.train.tsne,
    )
    for section, error in report["errors"].items():
        log.warning("train: report section %s was not written: %s", section, error)


def _use_experiment(config: Config) -> None:
    """Make the configured experiment current, creating it if needed.

    With a local sqlite store MLflow would put artifacts in ``./mlruns`` of whatever
    directory the job started in; a new experiment keeps them in the work directory instead.
    """
    import mlflow
    from mlflow import MlflowClient

    name = config.mlflow.experiment
    if config.tracking_uri.startswith("sqlite:"):
        client = MlflowClient(tracking_uri=config.tracking_uri)
        if client.get_experiment_by_name(name) is None:
            location = (config.work_path / "mlartifacts").resolve().as_uri()
            client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def _log_inputs(
    config: Config, launcher: Launcher, data_dir: Path, manifest: dict[str, Any]
) -> None:
    """Params (the whole resolved config), lineage and tags, once per run."""
    import mlflow

    manifest_bytes = (data_dir / schema.MANIFEST_FILE).read_bytes()
    params = _flatten(config.to_dict())
    params.update(
        {
            "world_size": launcher.num_proc,
            "dataset": str(data_dir),
            "dataset_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "dataset_rows": json.dumps(manifest["splits"], sort_keys=True),
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
