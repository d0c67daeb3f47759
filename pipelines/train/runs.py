"""The MLflow run of a training: opened, owned, resumed, ended, never left RUNNING by mistake.

In: the store (tracking URIs, the run's folder), the experiment name and, when resuming, the
checkpoint to continue from. Out: :func:`training_run`, the active MLflow run for the
training stage's block; and the helpers around a run's life:

- every run is tagged with its owner (:class:`~pipelines.store.Owner`: host, pid, process
  start); a RUNNING run whose owner is gone from this host is stale, and the next
  ``train`` marks it FAILED with the reason (:func:`fail_stale_runs`), since a SIGKILLed
  process could not end its own run;
- a run that fails is marked FAILED with the error as a tag;
- ``--resume`` reopens the run the folder remembers, records ``resumes`` (the epoch, and
  what it resumed after) and clears the old error;
- :func:`log_new_epochs` (:class:`EpochLog`) logs per-epoch metrics at ``step=epoch``,
  skipping the epochs the run already holds, so a resumed or reset run never logs an epoch
  twice: rank 0 logs each epoch as it ends, the driver what is left at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.store import Owner, RunDir, Store

if TYPE_CHECKING:
    from pipelines.train.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenRun:
    """The active training run.

    Attributes:
        run_id: Its MLflow id.
        resumed: Whether an interrupted run was reopened (its inputs are logged already).
        run_dir: The run's own folder (checkpoints, final model, ranks' files).
    """

    run_id: str
    resumed: bool
    run_dir: RunDir


@contextmanager
def training_run(
    store: Store,
    experiment: str,
    model_name: str,
    run_dir: RunDir | None,
    resume_from: Checkpoint | None,
) -> Iterator[OpenRun]:
    """Open (or, resuming, reopen) the training's MLflow run for the block; FAILED on error.

    A new run gets a folder of its own (:meth:`~pipelines.store.Store.start_run_dir`),
    which this process owns and ``--resume`` finds as the model's last run.

    Args:
        store: The stores and the runs' folders.
        experiment: Experiment name (created if needed).
        model_name: The model trained (names the folder of its runs).
        run_dir: Resuming: the run's folder, which remembers its MLflow run.
        resume_from: The checkpoint continued from; None starts a new run.

    Raises:
        UserError: The run to resume is still RUNNING in a live process.
    """
    import mlflow

    experiment_id = tracking.use_experiment(store, experiment)
    fail_stale_runs(store.tracking_uri, experiment_id)
    run_id = run_dir.remembered_run() if resume_from and run_dir else None
    previous = _reopen(store.tracking_uri, run_id) if run_id else None
    with mlflow.start_run(run_id=run_id) as run:
        try:
            mlflow.set_tags(Owner.me().tags())
            folder = store.start_run_dir(model_name, run.info.run_id)
            if resume_from is not None:
                _tag_resume(run.info.run_id, resume_from.epoch, previous)
            yield OpenRun(run.info.run_id, resumed=resume_from is not None, run_dir=folder)
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
            raise


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
        owner = Owner.from_tags(run.data.tags)
        if owner is None or owner.alive() is not False:
            continue
        reason = (
            f"stale: its process ({owner.describe()}) ended without ending the run "
            f"(killed?); marked FAILED by pid {os.getpid()}"
        )
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("train: run %s was %s", run.info.run_id, reason)
        failed.append(run.info.run_id)
    return failed


def _reopen(tracking_uri: str, run_id: str) -> dict[str, str]:
    """Check that the run to resume is not still running; return its status and error."""
    run = tracking.client(tracking_uri).get_run(run_id)
    owner = Owner.from_tags(run.data.tags)
    if run.info.status == "RUNNING" and owner is not None and owner.alive():
        raise UserError(
            f"run {run_id} is still RUNNING ({owner.describe()}); stop it before --resume"
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


def log_new_epochs(run_id: str, history: dict[str, list[float]]) -> None:
    """Log each epoch's metrics at step=epoch, skipping epochs the run already holds.

    A resumed run gets the epochs of its checkpoint's history again: those logged by the
    interrupted attempt (or by rank 0 as each epoch ended) are not logged twice.
    """
    EpochLog(run_id).log(history)


class EpochLog:
    """Per-epoch metrics of one run, each (metric, epoch) logged once at ``step=epoch``.

    What the run already holds is asked once per metric (only for metrics the run has at
    all), then remembered: logging an epoch later costs one ``log_batch``. The tracking
    server is the one MLflow resolves from the environment (``MLFLOW_TRACKING_URI`` and its
    credentials), which is how a rank on an executor reaches it.

    Args:
        run_id: The run.
        client: An MLflow client (default: one for the environment's tracking server).
    """

    def __init__(self, run_id: str, client: Any = None) -> None:
        self.run_id = run_id
        self.client = client or tracking.client()
        self._logged: dict[str, set[int]] | None = None
        self._present: set[str] = set()

    def log(self, history: dict[str, list[float]]) -> int:
        """Log the epochs of ``history`` the run does not hold yet; how many values went."""
        from mlflow.entities import Metric

        if self._logged is None:
            self._present = set(self.client.get_run(self.run_id).data.metrics)
            self._logged = {}
        now = int(time.time() * 1000)
        metrics = []
        for name, values in history.items():
            if name not in self._logged:
                self._logged[name] = (
                    {m.step for m in self.client.get_metric_history(self.run_id, name)}
                    if name in self._present
                    else set()
                )
            logged = self._logged[name]
            metrics += [
                Metric(name, float(value), now, epoch)
                for epoch, value in enumerate(values)
                if epoch not in logged
            ]
        for start in range(0, len(metrics), 500):  # MLflow's batch limit is 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 500])
        for metric in metrics:
            self._logged[metric.key].add(metric.step)
        return len(metrics)
