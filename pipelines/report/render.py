"""After training: fetch runs from MLflow and write their HTML report pages.

In (:func:`render_run_report`, :func:`render_comparison`): run ids and a tracking URI.
Out: one self-contained HTML file per run (``run-<id>.html``) or per comparison
(``compare-<ids>.html``), written atomically under ``out_dir``; the run page is also logged
to the run as ``report/report.html``. The pages are built by :mod:`pipelines.report.pages`;
this module does the MLflow reads (run, metric histories, ``report/`` artifacts, dataset
manifest, model versions) and the writes. MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.report.artifacts import REPORT_DIR
from pipelines.report.pages import comparison_page, run_page
from pipelines.store import MANIFEST_ARTIFACT, write_atomic

log = logging.getLogger(__name__)

#: Name of the HTML page inside :data:`~pipelines.report.artifacts.REPORT_DIR`.
REPORT_HTML = "report.html"
#: Run-level metrics that are never learning curves, whatever their steps.
_RUN_LEVEL_METRICS = frozenset({"epochs_run", "seconds_training"})
#: Metric names that are per-epoch even when a run has only one epoch.
_EPOCH_METRICS = frozenset({"loss", "accuracy", "reconstruction_error", "lr"})


def render_run_report(
    run_id: str,
    *,
    tracking_uri: str,
    out_dir: str | Path,
    log_to_run: bool = True,
) -> Path:
    """Write one self-contained HTML page about a run, and log it to the run.

    The page holds the run's status, model version, headline metrics, every ``report/``
    artifact (images embedded), the per-epoch metrics, params, tags and dataset manifest.
    A run without report artifacts (e.g. one that failed during training) still gets a page
    with what it has, its learning curves drawn from the metric history, and a note.

    Args:
        run_id: MLflow run id.
        tracking_uri: Tracking server or store, e.g. ``http://127.0.0.1:5000``.
        out_dir: Directory for ``run-<run_id>.html``.
        log_to_run: Also log the page to the run as ``report/report.html``.

    Returns:
        Path of the HTML file.

    Raises:
        UserError: No such run.

    """
    client = tracking.client(tracking_uri)
    run = _get_run(client, run_id, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
        files = _download_report(client, run_id, tracking_uri, Path(tmp))
        manifest = _read_manifest(client, run_id, tracking_uri, Path(tmp))
        page = run_page(
            run,
            files,
            manifest,
            tracking_uri,
            version=_model_version(client, run),
            histories=_epoch_histories(client, run),
        )
    path = _write_page(Path(out_dir) / f"run-{run_id}.html", page)
    if log_to_run:
        with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
            copy = Path(tmp) / REPORT_HTML
            shutil.copyfile(path, copy)
            client.log_artifact(run_id, str(copy), REPORT_DIR)
    log.info("report: wrote %s", path)
    return path


def render_comparison(run_ids: Sequence[str], *, tracking_uri: str, out_dir: str | Path) -> Path:
    """Write one HTML page comparing runs: overlaid learning curves and a metrics table.

    Each run is labelled with its name and the params in which the runs differ (e.g.
    ``train.activation=sigmoid``), the motivating case being one model trained with sigmoid,
    tanh and ReLU. The table lists the differing params and the final metrics side by side,
    the best value of each metric highlighted.

    Args:
        run_ids: Two or more MLflow run ids (duplicates are dropped).
        tracking_uri: Tracking server or store.
        out_dir: Directory for ``compare-<ids>.html``.

    Returns:
        Path of the HTML file.

    Raises:
        UserError: Fewer than two distinct runs, or a run that does not exist.

    """
    ids = list(dict.fromkeys(run_ids))
    if len(ids) < 2:
        raise UserError("--compare needs at least two different run ids")
    client = tracking.client(tracking_uri)
    runs = [_get_run(client, run_id, tracking_uri) for run_id in ids]
    differing = _differing_params([run.data.params for run in runs])
    histories = [_epoch_histories(client, run) for run in runs]
    labels = [_run_label(run, differing) for run in runs]
    with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
        figures = [
            _run_figure(client, run, tracking_uri, Path(tmp) / str(i)) for i, run in enumerate(runs)
        ]
        page = comparison_page(runs, labels, differing, histories, figures, tracking_uri)
    name = "-".join(run_id[:8] for run_id in ids[:4])
    if len(ids) > 4:
        name += f"-and-{len(ids) - 4}-more"
    path = _write_page(Path(out_dir) / f"compare-{name}.html", page)
    log.info("report: wrote %s", path)
    return path


def _get_run(client: Any, run_id: str, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no MLflow run {run_id!r} in {tracking.shown_uri(tracking_uri)}; check the id "
            "(see 'mlflow runs list' or the MLflow UI) and the tracking URI"
        ) from None


def _download_report(client: Any, run_id: str, tracking_uri: str, dest: Path) -> dict[str, Path]:
    """The run's ``report/`` files (not the TensorBoard logs), by name; empty if none."""
    import mlflow

    try:
        listed = client.list_artifacts(run_id, REPORT_DIR)
    except Exception:  # an unreachable artifact store: render what the tracking store has
        log.warning("report: cannot list the artifacts of run %s", run_id, exc_info=True)
        return {}
    files = {}
    for info in listed:
        name = info.path.rsplit("/", 1)[-1]
        if info.is_dir or name == REPORT_HTML:
            continue
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=info.path, dst_path=str(dest), tracking_uri=tracking_uri
        )
        files[name] = Path(local)
    if any(info.is_dir and info.path.endswith("tensorboard") for info in listed):
        files["tensorboard/"] = dest
    return files


def _read_manifest(
    client: Any, run_id: str, tracking_uri: str, dest: Path
) -> dict[str, Any] | None:
    import mlflow

    try:
        names = [info.path for info in client.list_artifacts(run_id, "dataset")]
        if MANIFEST_ARTIFACT not in names:
            return None
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=MANIFEST_ARTIFACT,
            dst_path=str(dest / "manifest"),
            tracking_uri=tracking_uri,
        )
        return json.loads(Path(local).read_text())
    except Exception:
        log.warning("report: cannot read the dataset manifest of run %s", run_id, exc_info=True)
        return None


def _is_epoch_metric(key: str, steps: int) -> bool:
    """Per-epoch metrics are drawn as curves; test_* and run-level ones are single values."""
    if key.startswith("test_") or key in _RUN_LEVEL_METRICS:
        return False
    return steps > 1 or key.startswith("val_") or key in _EPOCH_METRICS


def _epoch_histories(client: Any, run: Any) -> dict[str, list[float]]:
    histories = {}
    for key in sorted(run.data.metrics):
        points = client.get_metric_history(run.info.run_id, key)
        if _is_epoch_metric(key, len(points)):
            histories[key] = [p.value for p in sorted(points, key=lambda p: (p.step, p.timestamp))]
    return histories


def _differing_params(params: Sequence[Mapping[str, str]]) -> list[str]:
    keys = sorted({key for p in params for key in p})
    return [key for key in keys if len({p.get(key) for p in params}) > 1]


def _run_label(run: Any, differing: Sequence[str]) -> str:
    name = run.info.run_name or run.info.run_id[:8]
    preferred = [k for k in differing if k.startswith("train.")] or list(differing)
    shown = ", ".join(f"{k}={run.data.params.get(k, '-')}" for k in preferred[:3])
    return f"{name} ({shown})" if shown else name


def _run_figure(client: Any, run: Any, tracking_uri: str, dest: Path) -> Path | None:
    """The run's confusion matrix (or reconstructions) PNG for the comparison, if logged."""
    import mlflow

    try:
        names = {info.path for info in client.list_artifacts(run.info.run_id, REPORT_DIR)}
    except Exception:
        return None
    for name in ("confusion_matrix.png", "reconstructions.png"):
        if f"{REPORT_DIR}/{name}" in names:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id,
                    artifact_path=f"{REPORT_DIR}/{name}",
                    dst_path=str(dest),
                    tracking_uri=tracking_uri,
                )
            )
    return None


def _model_version(client: Any, run: Any) -> str | None:
    from pipelines.registry import RUN_MODEL_TAG, RUN_VERSION_TAG

    tags = run.data.tags
    if tags.get(RUN_VERSION_TAG):
        return f"{tags.get(RUN_MODEL_TAG, 'model')} version {tags[RUN_VERSION_TAG]}"
    try:
        versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    except Exception:
        return None
    return ", ".join(f"{v.name} version {v.version}" for v in versions) or None


def _write_page(path: Path, text: str) -> Path:
    """Write a page whole or not at all; its absolute path."""
    write_atomic(path, text)
    return path.resolve()
