"""Rank functions the launcher tests run in real rank processes (imported there by name)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserError

#: Images of the small convnet: 6 x 6 grey, 3 classes.
SHAPE, CLASSES = (6, 6, 1), 3


def build_model(learning_rate: float, batch_norm: bool = False) -> Any:
    """A small convnet with plain SGD (no momentum: one step is one gradient times the rate).

    ``batch_norm``: with a batch-normalisation layer after the convolution (its moving mean
    and variance move with each training batch's statistics).
    """
    import keras

    norm = [keras.layers.BatchNormalization(momentum=0.5)] if batch_norm else []
    model = keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Conv2D(4, 3, activation="relu"),
            *norm,
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def batches(seed: int, steps: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` batches of ``size`` random images and labels."""
    rng = np.random.default_rng(seed)
    return [
        (rng.random((size, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, size, np.int32))
        for _ in range(steps)
    ]


def train(
    per_rank: list[list[tuple[np.ndarray, np.ndarray]]],
    seed: Any,
    rate: float,
    batch_norm: bool = False,
) -> dict:
    """Train on this rank's batches, one per step; weights, history and collectives back.

    ``seed`` is one seed for all ranks, or a list with one per rank; ``batch_norm`` as
    :func:`build_model`'s.
    """
    from pipelines.train.jax_distribution import JaxDistribution, weights_digest

    spec_rank = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
    dist = JaxDistribution(seed=seed[spec_rank] if isinstance(seed, list) else seed)
    mine = per_rank[dist.rank]
    model = build_model(rate, batch_norm)
    history = model.fit(
        (batch for batch in mine),  # Keras 3 takes generators, not other iterators
        steps_per_epoch=1,
        epochs=len(mine),
        shuffle=False,
        verbose=0,
        callbacks=dist.callbacks(initial_lr=rate, warmup_epochs=0, steps_per_epoch=1),
    )
    dist.sync_model_state(model)  # as the worker does at every epoch end
    return {
        "rank": dist.rank,
        "size": dist.size,
        "local": (dist.local_rank, dist.local_size),
        "weights": [np.asarray(w) for w in model.get_weights()],
        "digest": weights_digest(model),
        "history": history.history,
        "broadcast": dist.broadcast({"from": dist.rank, "pad": "x" * (100 * dist.rank)}, "b"),
        "allgather": dist.allgather(["r"] * (dist.rank + 1), "g"),
        "wrapped": dist.wrap_optimizer(model.optimizer) is model.optimizer,
    }


def die_while_training(folder: str, seed: int, victim: int) -> dict:
    """Rank ``victim`` SIGKILLs itself after three steps; the other trains on, into the
    collectives (rank 0 also runs JAX's coordination service)."""
    import keras

    from pipelines.train.jax_distribution import JaxDistribution

    dist = JaxDistribution(seed=seed)
    Path(folder, f"pid{dist.rank}").write_text(str(os.getpid()))
    model = build_model(0.01)
    x, y = batches(seed, 1, 4)[0]

    class Die(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if dist.rank == victim and batch == 2:
                Path(folder, "killed_at").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)

    def forever():
        while True:
            yield x, y

    fit = {"steps_per_epoch": 10**6, "epochs": 1, "shuffle": False, "verbose": 0}
    model.fit(forever(), callbacks=[Die()], **fit)
    return {"rank": dist.rank}


def die_beside_a_sleeper(folder: str) -> str:
    """No JAX: rank 1 SIGKILLs itself; rank 0 sleeps and can only go when its task goes."""
    rank = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
    Path(folder, f"pid{rank}").write_text(str(os.getpid()))
    if rank == 1:
        deadline = time.monotonic() + 60
        while not Path(folder, "pid0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        Path(folder, "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
    return "slept"


def where_am_i(fail_on: int | None = None, error: str = "user") -> dict:
    """No JAX: this rank's environment; ``fail_on`` raises a UserError (or a ValueError)."""
    rank = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
    if rank == fail_on:
        if error == "user":
            raise UserError(f"rank {rank}: the dataset has no label column")
        raise ValueError(f"rank {rank}: a bug")
    return {
        key: os.environ.get(key)
        for key in (
            "KERAS_DISTRIBUTION_JOB_ADDRESSES",
            "KERAS_DISTRIBUTION_NUM_PROCESSES",
            "KERAS_DISTRIBUTION_PROCESS_ID",
            "DLPIPE_LOCAL_RANK",
            "DLPIPE_LOCAL_SIZE",
            "DLPIPE_RANK_TIMEOUT_S",
            "KERAS_BACKEND",
            "XLA_FLAGS",
        )
    } | {"pid": os.getpid(), "ppid": os.getppid()}
