"""The checkpoint of a training run: its format, rank 0's writer, the reader, the ranks' files.

In: a run's :class:`~pipelines.store.RunDir` (which names the files and writes them
atomically) and, while training, the Keras model and the epoch's records. Out:

- :class:`Checkpoint`, the committed state: ``checkpoint.json`` naming the model file of its
  epoch (``checkpoint-<epoch>.h5``, ``.keras`` on Keras 3; full, with optimizer state) and
  that file's digest, the history and rank 0's per-layer records so far. Each epoch's
  model goes to a new file, written before the state is replaced in one atomic write, so
  the state always names a complete model of its own epoch: a run killed at any point
  leaves the last complete epoch, never a model of one epoch with the counter of another;
- :func:`checkpoint_callback`, the Keras callback with which rank 0 commits one per epoch;
  :func:`read_checkpoint` for ``--resume``;
- the final model (:func:`save_final_model`, :func:`load_final_model`): best weights,
  float32, no optimizer state, what gets evaluated and logged;
- each rank's placement file (:func:`announce_rank`, :func:`read_rank_placements`): its
  host and pid, so the driver can name a rank that died.

Checkpoints are HDF5 on purpose: ``hvd.load_model`` restores legacy optimizers from it. On
the Keras stack they are ``.keras`` files: Keras 3 reads no optimizer state back from HDF5.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.store import RunDir, read_text, write_atomic

#: Rank 0's per-layer records (see :mod:`pipelines.train.layer_stats`): keys of its result
#: and of the checkpoint state.
LAYER_RECORDS = ("layer_stats", "layer_histograms")


@dataclass(frozen=True)
class Checkpoint:
    """The committed state of a run's last completed epoch (``checkpoint.json``).

    Attributes:
        epoch: Epochs completed.
        history: Per-epoch metrics so far (averaged across ranks).
        model: The model file of this epoch, relative to the run folder.
        model_sha256: Its digest (None in checkpoints of older versions).
        layer_stats: Rank 0's per-layer statistics so far (empty with
            ``train.layer_stats`` off or in older checkpoints).
        layer_histograms: Rank 0's per-layer histograms so far (likewise).
    """

    epoch: int
    history: dict[str, list[float]]
    model: str = RunDir.LEGACY_CHECKPOINT_MODEL
    model_sha256: str | None = None
    layer_stats: dict[str, list[float]] = field(default_factory=dict)
    layer_histograms: dict[str, list[list[list[float]]]] = field(default_factory=dict)

    def layers(self) -> dict[str, dict[str, list]]:
        """The per-layer records by :data:`LAYER_RECORDS` key (copies, to append to)."""
        return {key: dict(getattr(self, key)) for key in LAYER_RECORDS}


def read_checkpoint(run: RunDir) -> Checkpoint | None:
    """The last committed epoch of ``run``.

    Returns:
        The checkpoint, or None without one or when its model is not the one it names.
    """
    try:
        data = json.loads(read_text(run.checkpoint_state))
    except FileNotFoundError:
        return None
    known = {name: data[name] for name in Checkpoint.__dataclass_fields__ if name in data}
    state = Checkpoint(**known)
    model = run.checkpoint_model(name=state.model)
    if not model.is_file():
        return None
    if state.model_sha256 is not None and file_digest(model) != state.model_sha256:
        return None
    return state


def checkpoint_callback(
    run: RunDir,
    history: dict[str, list[float]],
    k: Any,
    layers: dict[str, dict[str, list]] | None = None,
) -> Any:
    """A Keras callback committing a :class:`Checkpoint` after every epoch (rank 0 only).

    Runs after the callbacks that record the epoch's history and layer statistics, so
    ``history`` and ``layers`` (saved beside the model, when given) already hold the epoch.
    """
    from pipelines.keras_api import is_keras3

    keras3 = is_keras3()

    def save(model: Any, path: Path) -> None:
        if not keras3:
            model.save(path, save_format="h5")
            return
        from pipelines.train.jax_distribution import without_distribution

        with without_distribution():  # rank 0 alone; Keras 3 picks the format by suffix
            model.save(path)

    class CommitCheckpoint(k.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            model_file = run.checkpoint_model(epoch + 1, keras3=keras3)
            run.save_model(model_file, lambda tmp: save(self.model, tmp))
            state = Checkpoint(
                epoch=epoch + 1,
                history=history,
                model=model_file.name,
                model_sha256=file_digest(model_file),
                **(layers or {}),
            )
            write_atomic(run.checkpoint_state, json.dumps(asdict(state)))  # the commit point
            run.clear_old_checkpoints(keep=model_file)

    return CommitCheckpoint()


def save_final_model(run: RunDir, model: Any) -> None:
    """Write the final model (no optimizer state) where the driver loads it."""
    run.save_model(
        run.final_model, lambda tmp: model.save(tmp, include_optimizer=False, save_format="h5")
    )


def load_final_model(run: RunDir) -> Any:
    """The final model, uncompiled."""
    from pipelines.keras_api import keras

    return keras().models.load_model(run.final_model, compile=False)


def placement() -> dict[str, str]:
    """Where this rank runs: host, process id and its Spark executor's working folder.

    Horovod on Spark records the executor's folder for the rank (a standalone worker's
    ``work/<app>/<executor id>``, a YARN container's folder); elsewhere it is the cwd.
    """
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "executor_dir": os.environ.get("HOROVOD_SPARK_WORK_DIR") or os.getcwd(),
    }


def announce_rank(run: RunDir, rank: int, failed: str | None = None) -> None:
    """Write this rank's host and pid where the driver can read them should the rank die.

    Args:
        run: The run's folder.
        rank: This rank.
        failed: The exception the rank is raising, if it is.
    """
    info: dict[str, Any] = {"rank": rank, **placement(), "started": time.time()}
    if failed is not None:
        info["failed"] = failed
    write_atomic(run.rank_file(rank), json.dumps(info))


def read_rank_placements(run: RunDir) -> dict[int, dict[str, Any]]:
    """What each rank of the last start wrote about itself (see :func:`announce_rank`)."""
    placements = {}
    for path in run.rank_files():
        try:
            info = json.loads(read_text(path))
        except (OSError, ValueError):
            continue
        placements[int(info["rank"])] = info
    return placements


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
