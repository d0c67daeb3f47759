"""The Keras stack's rank side: Keras 3 on JAX, one process per rank, gradients averaged by XLA.

In: what :mod:`~pipelines.train.keras_launcher` puts in a rank's environment (:class:`RankSpec`:
the coordinator's ``host:port``, the number of processes, this one's index, its place on its
host). Out: :class:`JaxDistribution`, the ``Distribution`` the training worker calls
(``pipelines.train.distributions.Distribution``), with no Horovod anywhere.

How the ranks keep in step, against Horovod's way:

- ``jax.distributed.initialize`` joins the ranks (JAX's coordination service on rank 0, CPU
  collectives over Gloo) before anything else runs on JAX; it is called here rather than
  through ``keras.distribution.initialize``, which does the same but passes no timeouts.
- ``keras.distribution.DataParallel(auto_shard_dataset=False)`` replicates every variable on
  every device and makes each rank's batch its part of one global batch
  (``jax.make_array_from_process_local_data``): the loss is the mean over the global batch,
  and XLA inserts the all-reduce of the gradients into the compiled step. So there is no
  optimizer wrapper (:meth:`~JaxDistribution.wrap_optimizer` is the identity), and the
  metrics are those of the global batch, equal on every rank (no metric averaging).
- Horovod broadcasts rank 0's initial weights. Here every rank builds the same weights from
  the same seed (``seed=``, or ``keras.utils.set_random_seed`` before building), and a
  callback checks a digest of every rank's own copy when training begins: JAX assembles a
  replicated variable from each process's local value without comparing them, so ranks
  whose weights differ would otherwise train apart, silently.
- The learning-rate warm-up is Horovod's (Goyal et al., 2017), as a Keras 3 callback.
- ``broadcast``/``allgather`` of any picklable object go through
  ``jax.experimental.multihost_utils`` as padded byte arrays.
- Elastic training has no equivalent: the config rejects ``train.elastic`` with this
  launcher, and the elastic methods raise.

Keras is imported inside the functions that need it, after ``KERAS_BACKEND=jax`` is set.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import UserError

#: Environment of a rank: Keras' own names for the first three (``keras.distribution``).
COORDINATOR_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"
LOCAL_RANK_ENV = "DLPIPE_LOCAL_RANK"
LOCAL_SIZE_ENV = "DLPIPE_LOCAL_SIZE"
RANK_TIMEOUT_ENV = "DLPIPE_RANK_TIMEOUT_S"


@dataclass(frozen=True)
class RankSpec:
    """Where one rank stands in the job, as the launcher tells it.

    Attributes:
        coordinator: ``host:port`` of rank 0's coordination service ("" for one process).
        num_processes: The number of ranks.
        process_id: This rank.
        local_rank: This rank's index among the ranks on its host.
        local_size: The ranks on its host.
        timeout_s: How long a rank waits for the others to join, and for a silent peer's
            heartbeat before the job is failed; None: JAX's defaults (300 s, 100 s).
    """

    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_rank: int = 0
    local_size: int = 1
    timeout_s: float | None = None

    def environment(self) -> dict[str, str]:
        """The variables that carry this spec to the rank's process."""
        env = {
            COORDINATOR_ENV: self.coordinator,
            NUM_PROCESSES_ENV: str(self.num_processes),
            PROCESS_ID_ENV: str(self.process_id),
            LOCAL_RANK_ENV: str(self.local_rank),
            LOCAL_SIZE_ENV: str(self.local_size),
        }
        if self.timeout_s:
            env[RANK_TIMEOUT_ENV] = f"{self.timeout_s:g}"
        return env

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> RankSpec:
        """The spec the launcher set; a world of one where it set none."""
        env = os.environ if environ is None else environ
        timeout = env.get(RANK_TIMEOUT_ENV)
        return cls(
            coordinator=env.get(COORDINATOR_ENV, ""),
            num_processes=int(env.get(NUM_PROCESSES_ENV, "1")),
            process_id=int(env.get(PROCESS_ID_ENV, "0")),
            local_rank=int(env.get(LOCAL_RANK_ENV, "0")),
            local_size=int(env.get(LOCAL_SIZE_ENV, "1")),
            timeout_s=float(timeout) if timeout else None,
        )


class WeightsDifferError(RuntimeError):
    """The ranks start from different weights (different seeds or code)."""


class JaxDistribution:
    """Keras 3 data parallelism over JAX processes; :meth:`__init__` joins the ranks.

    Must run before anything else computes with JAX in this process (a fresh process per
    rank, as :mod:`~pipelines.train.keras_launcher` starts them).

    Args:
        spec: Where this rank stands; None: from the environment the launcher set.
        seed: Seed every rank's Keras, NumPy and Python random generators alike, so that
            they build identical weights; None: the caller does it before building.
    """

    def __init__(self, spec: RankSpec | None = None, *, seed: int | None = None) -> None:
        spec = spec or RankSpec.from_environment()
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import jax

        if spec.num_processes > 1:
            # JAX: CPU collectives over Gloo (the default, named so that it stays so).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            timeouts = {}
            if spec.timeout_s:
                timeouts = {
                    "initialization_timeout": max(1, int(spec.timeout_s)),
                    "heartbeat_timeout_seconds": max(1, int(spec.timeout_s)),
                }
            jax.distributed.initialize(
                coordinator_address=spec.coordinator,
                num_processes=spec.num_processes,
                process_id=spec.process_id,
                **timeouts,
            )
        import keras

        if keras.backend.backend() != "jax":
            raise UserError(
                f"Keras runs on {keras.backend.backend()}, the keras launcher needs JAX: "
                "set KERAS_BACKEND=jax before Keras is first imported"
            )
        if seed is not None:
            keras.utils.set_random_seed(seed)
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
        )
        self.rank, self.size = jax.process_index(), jax.process_count()
        self.local_rank, self.local_size = spec.local_rank, spec.local_size

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """The optimizer itself: the compiled step already averages the gradients."""
        return optimizer

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """Check that every rank starts from the same weights; warm the rate up.

        Args:
            initial_lr: The learning rate scaled by the number of ranks; the warm-up ramps
                from ``initial_lr / size`` to it (Horovod's meaning).
            warmup_epochs: Epochs of warm-up (0: none).
            steps_per_epoch: Steps per epoch, for a ramp that rises every step.
        """
        callbacks = [weights_check(self)] if self.size > 1 else []
        if warmup_epochs > 0 and self.size > 1:
            callbacks.append(
                learning_rate_warmup(initial_lr, warmup_epochs, steps_per_epoch, self.size)
            )
        return callbacks

    def sync_model_state(self, model: Any) -> None:
        """Nothing to do: batch statistics here are already those of the global batch.

        Under ``keras.distribution.DataParallel`` each rank's batch is a shard of one global
        array and the compiled step computes batch normalisation's mean and variance over
        all of it (XLA reduces across the ranks), so every rank updates its moving mean and
        variance with the same values.
        """
        del model

    def load_model(self, path: str) -> Any:
        """A full Keras 3 checkpoint (weights and optimizer state), replicated on every rank.

        Every rank reads the same file, so it must be on storage they all see.
        """
        import keras

        return keras.models.load_model(path)

    def broadcast(self, value: Any, name: str) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        from jax.experimental import multihost_utils

        data = pickle.dumps(value) if self.rank == 0 else b""
        length = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
        buffer = np.zeros(length, np.uint8)
        if self.rank == 0:
            buffer[:] = np.frombuffer(data, np.uint8)
        return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        from jax.experimental import multihost_utils

        data = pickle.dumps(value)
        lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).tolist()
        buffer = np.zeros(max(lengths), np.uint8)
        buffer[: len(data)] = np.frombuffer(data, np.uint8)
        rows = np.asarray(multihost_utils.process_allgather(buffer))
        return [pickle.loads(row[:n].tobytes()) for row, n in zip(rows, lengths, strict=True)]

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Not available: the keras launcher has no elastic mode."""
        raise UserError("elastic mode needs train.launcher=horovod (the keras launcher has none)")

    elastic_run = elastic_callbacks = elastic_state


@contextmanager
def without_distribution() -> Iterator[None]:
    """Run the block with no Keras distribution set (restored after it), for one rank alone.

    Under the ranks' ``DataParallel`` distribution, saving a ``.keras`` file places arrays
    on every process's devices: a collective the other ranks, training on, never join.
    Rank 0's checkpoint is written inside this block; every rank reads it back under the
    distribution (:meth:`JaxDistribution.load_model`).
    """
    import keras

    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def weights_digest(model: Any) -> str:
    """SHA-256 of this process's own copy of every weight of ``model``, in order."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = variable.value
        local = value.addressable_data(0) if hasattr(value, "addressable_data") else value
        array = np.ascontiguousarray(np.asarray(local))
        digest.update(f"{variable.path}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def weights_check(distribution: JaxDistribution) -> Any:
    """A callback that fails every rank, at the start of training, unless weights agree.

    Raises (from ``on_train_begin``, on every rank alike):
        WeightsDifferError: Some rank's weights differ from rank 0's.
    """
    import keras

    class WeightsCheck(keras.callbacks.Callback):
        """Compares :func:`weights_digest` across ranks when training begins."""

        def on_train_begin(self, logs: dict | None = None) -> None:
            digests = distribution.allgather(weights_digest(self.model), "initial_weights")
            differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
            if differ:
                raise WeightsDifferError(
                    f"ranks {differ} start from other weights than rank 0: build the model "
                    "from the same seed on every rank (JaxDistribution(seed=...))"
                )

    return WeightsCheck()


def learning_rate_warmup(
    initial_lr: float, warmup_epochs: int, steps_per_epoch: int, size: int
) -> Any:
    """Horovod's learning-rate warm-up, step by step, as a Keras 3 callback.

    Before each step of the first ``warmup_epochs`` epochs the rate becomes
    ``initial_lr / size * (e * (size - 1) / warmup_epochs + 1)``, where ``e`` is the epoch
    reached at the end of that step (``epoch + (step + 1) / steps_per_epoch``): from about
    the one-rank rate up to exactly ``initial_lr`` at the end of the warm-up, where it stays.
    Horovod's momentum correction is left out (a Keras 3 optimizer's momentum is a constant
    of the compiled step).

    On the JAX backend a step's state lives outside the model's variables; the callback
    writes the state back first (``jax_state_sync``), so that the step reads the new rate.
    That costs one assignment per variable per step, during the warm-up only.
    """
    import keras

    if steps_per_epoch < 1 or warmup_epochs < 1 or size < 1:
        raise ValueError("steps_per_epoch, warmup_epochs and size must be >= 1")

    def rate(epoch: float) -> float:
        return initial_lr / size * (epoch * (size - 1) / warmup_epochs + 1)

    class LearningRateWarmup(keras.callbacks.Callback):
        """Sets the learning rate before every step of the warm-up epochs."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.rate: Callable[[float], float] = rate

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch = epoch

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if self.epoch >= warmup_epochs:
                return
            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:
                sync()
            self.model.optimizer.learning_rate = rate(self.epoch + (batch + 1) / steps_per_epoch)

    return LearningRateWarmup()
