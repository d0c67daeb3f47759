"""Training you can watch: each epoch in MLflow as it ends, and a progress line on the driver.

In: the run (its MLflow id and its folder) and, on rank 0, the epoch's records. Out:

- :func:`live_metrics_callback`: rank 0's Keras callback that logs every completed epoch's
  metrics and layer statistics to the MLflow run at once (:class:`~pipelines.train.runs.
  EpochLog`: no epoch twice, across ``--resume`` and elastic resets), wherever the rank
  runs. It reaches the tracking server through its environment (``MLFLOW_TRACKING_URI``
  and the credentials the launcher passes, :func:`pipelines.tracking.rank_environment`),
  never through the config file. A server it cannot reach costs a warning, not the
  training: the driver logs whatever is missing when the ranks return.
- :class:`EpochProgress`: the driver's thread that follows the checkpoint rank 0 commits
  each epoch (one ``stat`` per poll, the small state file read only when it changed) and
  logs a line per epoch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from pipelines.store import RunDir, read_text

log = logging.getLogger(__name__)

#: Seconds between the driver's looks at the checkpoint state.
POLL_S = 2.0


def epoch_metrics(
    history: dict[str, list[float]], layer_stats: dict[str, list[float]]
) -> dict[str, list[float]]:
    """What is logged per epoch: the history, and the layer statistics as ``layer/<name>``."""
    return {**history, **{f"layer/{name}": values for name, values in layer_stats.items()}}


def live_metrics_callback(
    k: Any, run_id: str, history: dict[str, list[float]], layers: dict[str, dict[str, list]]
) -> Any:
    """Rank 0's Keras callback logging each completed epoch to MLflow run ``run_id``.

    Put it after the callbacks that record the epoch and commit it (the checkpoint, and
    Horovod elastic's commit), so that only what is committed is logged: an epoch that a
    reset redoes was never logged.

    Args:
        k: The Keras module.
        run_id: The training's MLflow run.
        history: The per-epoch metrics, as the recording callback appends them.
        layers: Rank 0's per-layer records (``layer_stats`` is logged).
    """
    from pipelines.train.runs import EpochLog

    class LogEpoch(k.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: EpochLog | None = None
            self.failed = False

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            try:
                if self.epochs is None:
                    self.epochs = EpochLog(run_id)
                self.epochs.log(epoch_metrics(history, layers.get("layer_stats", {})))
            except Exception as exc:  # noqa: BLE001 - watching must never stop training
                if not self.failed:
                    log.warning(
                        "train: rank 0 cannot log epochs to MLflow (%s: %s); the driver "
                        "logs them when training ends", type(exc).__name__, exc,
                    )  # fmt: skip
                self.failed = True

    return LogEpoch()


class EpochProgress:
    """A driver thread logging one line per epoch that rank 0 commits, while ranks run.

    Args:
        run_dir: The run's folder, where rank 0 commits the checkpoint state each epoch.
        epochs: The epochs asked for (``train.epochs``), for ``epoch N/M``.
        poll_s: Seconds between looks at the state file.
    """

    def __init__(self, run_dir: RunDir, epochs: int, poll_s: float = POLL_S) -> None:
        self.run_dir, self.epochs, self.poll_s = run_dir, epochs, poll_s
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mtime: float | None = None
        self._shown = 0
        self._shown = self._committed()[0]  # a resumed run's epochs were shown before
        self._since = time.time()

    def __enter__(self) -> EpochProgress:
        self._thread = threading.Thread(target=self._follow, name="epoch-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # epochs committed since the last look

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - progress must never stop training
                log.debug("train: progress: %s", exc)

    def poll(self) -> list[str]:
        """Log a line for each epoch committed since the last look; those lines."""
        epoch, history = self._committed()
        lines = []
        now = time.time()
        for done in range(self._shown + 1, epoch + 1):
            values = ", ".join(
                f"{name} {values[done - 1]:.4g}"
                for name, values in history.items()
                if len(values) >= done and name != "lr"
            )
            seconds = (now - self._since) / (epoch - self._shown)
            lines.append(f"train: epoch {done}/{self.epochs}: {values} ({seconds:.1f} s/epoch)")
        if epoch > self._shown:
            self._shown, self._since = epoch, now
        for line in lines:
            log.info("%s", line)
        self.lines += lines
        return lines

    def _committed(self) -> tuple[int, dict[str, list[float]]]:
        """The committed epoch and history, read again only when the state file changed."""
        path = self.run_dir.checkpoint_state
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return self._shown, {}
        if mtime == self._mtime:
            return self._shown, {}
        try:
            state = json.loads(read_text(path))
        except (OSError, ValueError):  # replaced while read: the next look gets it
            return self._shown, {}
        self._mtime = mtime
        return int(state.get("epoch", 0)), dict(state.get("history", {}))
