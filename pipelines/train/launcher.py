"""Launchers, and the only module that imports Horovod.

In: a worker function with its arguments. Out: the worker's return value from every rank,
in rank order.

- :class:`HorovodSparkLauncher` runs ``train.num_proc`` ranks on the Spark executors with
  ``horovod.spark.run`` over Gloo (one Spark task slot per rank).
- :class:`LocalLauncher` runs one rank in this process: for tests, notebooks and machines
  without Horovod.

Workers reach the collective operations through :func:`distribution`, which returns a
:class:`Distribution` for the launcher kind, so worker code never imports Horovod. Were
Horovod ever unavailable, this module is the one seam to swap (e.g. for
``tf.distribute.MultiWorkerMirroredStrategy`` on Spark barrier tasks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


class Distribution(Protocol):
    """What a training rank needs from the distributed runtime."""

    rank: int
    size: int
    local_size: int
    #: This rank's index among the ranks on its host: which of the host's GPUs it pins.
    local_rank: int

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Wrap a Keras optimizer so gradients are averaged across ranks."""

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """Keras callbacks that keep ranks in step (run before any other callback)."""

    def load_model(self, path: str) -> Any:
        """Load a full Keras checkpoint (weights and optimizer state) for this runtime."""

    def broadcast(self, value: Any, name: str) -> Any:
        """Rank 0's ``value`` on every rank."""

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""


class LocalDistribution:
    """A world of one: every collective is the identity."""

    rank, size, local_size, local_rank = 0, 1, 1, 0

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Return the optimizer unchanged."""
        return optimizer

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """No callbacks: with one rank the learning rate is not scaled, so no warm-up."""
        return []

    def load_model(self, path: str) -> Any:
        """Load with plain Keras."""
        from pipelines.keras_api import keras

        return keras().models.load_model(path)

    def broadcast(self, value: Any, name: str) -> Any:
        """Return the value unchanged."""
        return value

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Return the one value as a list."""
        return [value]


class HorovodDistribution:
    """Horovod's Keras API; :meth:`__init__` calls ``hvd.init()``."""

    def __init__(self) -> None:
        import horovod.tensorflow.keras as hvd

        hvd.init()
        self._hvd = hvd
        self.rank, self.size, self.local_size = hvd.rank(), hvd.size(), hvd.local_size()
        self.local_rank = hvd.local_rank()

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Horovod: average gradients across ranks with allreduce."""
        if self.size == 1:
            # Nothing to average: the per-step allreduce through Horovod's background
            # thread measured 10-15% of a small model's step (dlpipe bench train).
            return optimizer
        return self._hvd.DistributedOptimizer(optimizer)

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """Horovod: broadcast rank 0's initial weights, average metrics, warm the rate up."""
        hvd = self._hvd
        callbacks = [
            # Horovod: start every rank from rank 0's weights (random init or checkpoint).
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            # Horovod: average epoch metrics so early stopping decides the same everywhere.
            hvd.callbacks.MetricAverageCallback(),
        ]
        if warmup_epochs > 0 and self.size > 1:
            # Horovod: ramp from the one-rank rate to the scaled one (Goyal et al., 2017).
            callbacks.append(
                hvd.callbacks.LearningRateWarmupCallback(
                    initial_lr=initial_lr,
                    warmup_epochs=warmup_epochs,
                    steps_per_epoch=steps_per_epoch,
                    verbose=0,
                )
            )
        return callbacks

    def load_model(self, path: str) -> Any:
        """Horovod: reload with the optimizer state, re-wrapped in a DistributedOptimizer."""
        if self.size == 1:
            return LocalDistribution().load_model(path)
        # A mixed-precision checkpoint holds LossScaleOptimizer(inner): Horovod must wrap
        # the inner optimizer (its own mapping would wrap the LossScaleOptimizer and fail).
        return self._hvd.load_model(
            path,
            legacy_opts=True,
            custom_objects={"lossscaleoptimizer": self._loss_scale_optimizer},
        )

    def _loss_scale_optimizer(self, inner_optimizer: dict[str, Any], **config: Any) -> Any:
        """Horovod: rebuild ``LossScaleOptimizer(DistributedOptimizer(inner))`` from its config."""
        from pipelines.keras_api import keras

        k = keras()
        inner = k.optimizers.deserialize(inner_optimizer, use_legacy_optimizer=True)
        if not hasattr(inner, "_allreduce"):  # hvd.load_model's scope may have wrapped it
            inner = self.wrap_optimizer(inner)
        return k.mixed_precision.LossScaleOptimizer(inner, **config)

    def broadcast(self, value: Any, name: str) -> Any:
        """Horovod: rank 0's value everywhere."""
        import horovod.tensorflow as hvd_tf

        return hvd_tf.broadcast_object(value, root_rank=0, name=name)

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Horovod: every rank's value everywhere."""
        import horovod.tensorflow as hvd_tf

        return hvd_tf.allgather_object(value, name=name)


def distribution(kind: str) -> Distribution:
    """The :class:`Distribution` a worker started by launcher ``kind`` runs under."""
    return HorovodDistribution() if kind == "horovod" else LocalDistribution()


class Launcher(Protocol):
    """Starts the training ranks."""

    kind: str
    num_proc: int

    def run(self, fn: Callable[..., Any], args: Sequence[Any]) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order."""


class LocalLauncher:
    """One rank, in this process."""

    kind, num_proc = "local", 1

    def run(self, fn: Callable[..., Any], args: Sequence[Any]) -> list[Any]:
        """Call ``fn(*args)`` here."""
        return [fn(*args)]


class HorovodSparkLauncher:
    """``num_proc`` Horovod ranks over Gloo, one per Spark task slot."""

    kind = "horovod"

    def __init__(self, spark: SparkSession, num_proc: int, nics: Sequence[str] = ()) -> None:
        self.spark = spark
        self.num_proc = num_proc
        self.nics = set(nics) or None

    def run(self, fn: Callable[..., Any], args: Sequence[Any]) -> list[Any]:
        """Run ``fn(*args)`` as ``num_proc`` ranks with ``horovod.spark.run``."""
        try:
            import horovod.spark
        except ImportError as exc:
            raise UserError(
                f"Horovod is not importable ({exc}); run 'make venv' to build it, "
                "or use --set train.launcher=local for one in-process rank"
            ) from None
        slots = self.spark.sparkContext.defaultParallelism
        if self.num_proc > slots:
            raise UserError(
                f"train.num_proc={self.num_proc} needs {self.num_proc} Spark task slots, "
                f"but the session has {slots}; lower train.num_proc or add executor cores"
            )
        log.info("train: starting %d Horovod ranks on Spark (Gloo)", self.num_proc)
        import cloudpickle

        from pipelines.train import rank_entry

        # Horovod: each rank is a fresh process that sees only installed packages; the
        # entry point (pickled by value) first puts the shipped --py-files on its path.
        cloudpickle.register_pickle_by_value(rank_entry)
        payload = cloudpickle.dumps((_returning_user_errors, (fn, *args)))
        # The .zip/.egg files shipped with the application (PySpark's own list of them).
        includes = list(getattr(self.spark.sparkContext, "_python_includes", None) or [])
        results = horovod.spark.run(
            rank_entry.run_shipped,
            args=(payload, includes),
            num_proc=self.num_proc,
            use_gloo=True,
            nics=self.nics,
            verbose=0,
        )
        for result in results:
            if isinstance(result, _RankUserError):
                raise result.error
        return results


class _RankUserError:
    """A rank's :class:`UserError`, returned instead of raised so the driver can re-raise it.

    Raised in a rank it would reach the driver only as Horovod's "process exited with
    non-zero status"; the ranks raise together (e.g. after an allgather), so none is left
    waiting in a collective.
    """

    def __init__(self, error: UserError) -> None:
        self.error = error


def _returning_user_errors(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except UserError as exc:
        return _RankUserError(exc)


def make_launcher(
    kind: str, spark: SparkSession | None, num_proc: int, nics: Sequence[str] = ()
) -> Launcher:
    """The launcher for ``train.launcher``; ``local`` ignores ``num_proc`` and ``nics``."""
    if kind == "local":
        return LocalLauncher()
    if spark is None:
        raise ValueError("the horovod launcher needs a SparkSession")
    return HorovodSparkLauncher(spark, num_proc, nics)
