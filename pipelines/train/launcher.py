"""Launchers; with :mod:`~pipelines.train.horovod_patches`, the only modules importing Horovod.

In: a worker function with its arguments. Out: the worker's return value from every rank,
in rank order.

- :class:`HorovodSparkLauncher` runs ``train.num_proc`` ranks on the Spark executors with
  ``horovod.spark.run`` over Gloo (one Spark task slot per rank), or with
  ``horovod.spark.run_elastic`` when asked for elastic mode (a lost rank resets the world
  and the ranks left carry on).
- :class:`LocalLauncher` runs one rank in this process: for tests, notebooks and machines
  without Horovod.

Workers reach the collective operations through :func:`distribution`, which returns a
:class:`Distribution` for the launcher kind, so worker code never imports Horovod. Were
Horovod ever unavailable, these two modules are the seam to swap (e.g. for
``tf.distribute.MultiWorkerMirroredStrategy`` on Spark barrier tasks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.errors import UserError
from pipelines.train import horovod_patches

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipelines.config import HorovodConfig

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

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Elastic mode: the state restored after a reset (model, optimizer, ``values``)."""

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Elastic mode: ``fn(state)`` re-entered after every reset of the world."""

    def elastic_callbacks(self, state: Any) -> list:
        """Elastic mode: Keras callbacks tracking the epoch and committing the state."""


class RankLostError(RuntimeError):
    """A rank's process exited abnormally, which ends a non-elastic Horovod job.

    Attributes:
        rank: The first rank to exit abnormally (Horovod's own account).
        exit_code: Its exit status (137 or -9 for SIGKILL); None when Horovod could not
            get one (the rank's executor, or its whole host, was lost).
    """

    def __init__(self, rank: int, exit_code: int | None, detail: str) -> None:
        super().__init__(f"rank {rank} exited with status {exit_code}: {detail}")
        self.rank = rank
        self.exit_code = exit_code


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

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Not available: elastic mode needs the Horovod launcher."""
        raise NotImplementedError("elastic mode needs train.launcher=horovod")

    elastic_run = elastic_callbacks = elastic_state


class HorovodDistribution:
    """Horovod's Keras API; :meth:`__init__` calls ``hvd.init()``.

    Args:
        knobs: Horovod's performance settings (``train.horovod``); None: Horovod's defaults.
    """

    def __init__(self, knobs: HorovodConfig | None = None) -> None:
        import os

        import horovod.tensorflow.keras as hvd

        if knobs is not None:
            # Horovod: its background thread reads fusion, cycle time and autotune at init.
            os.environ.update(knobs.environment())
        hvd.init()
        self._hvd = hvd
        self._compression = (
            hvd.Compression.fp16 if knobs and knobs.compression == "fp16" else hvd.Compression.none
        )
        self._backward_passes = knobs.backward_passes_per_step if knobs else 1
        self.rank, self.size, self.local_size = hvd.rank(), hvd.size(), hvd.local_size()
        self.local_rank = hvd.local_rank()

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Horovod: average gradients across ranks with allreduce."""
        if self.size == 1:
            # Nothing to average: the per-step allreduce through Horovod's background
            # thread measured 10-15% of a small model's step (dlpipe bench train).
            return optimizer
        return self._distributed(optimizer)

    def _distributed(self, optimizer: Any) -> Any:
        """Horovod: ``DistributedOptimizer`` with the configured compression and passes."""
        return self._hvd.DistributedOptimizer(
            optimizer,
            compression=self._compression,
            backward_passes_per_step=self._backward_passes,
        )

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
        return self._load_wrapped(path)

    def _load_wrapped(self, path: str) -> Any:
        """Horovod: ``hvd.load_model``, mixed-precision checkpoints included.

        Such a checkpoint holds ``LossScaleOptimizer(inner)``: Horovod must wrap the inner
        optimizer (its own mapping would wrap the LossScaleOptimizer and fail).
        """
        return self._hvd.load_model(
            path,
            compression=self._compression,
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


class ElasticHorovodDistribution(HorovodDistribution):
    """Horovod elastic: rank and size are read afresh, as a reset may change them."""

    @property  # type: ignore[override]
    def rank(self) -> int:
        """Horovod: this rank in the current world."""
        return self._hvd.rank()

    @rank.setter
    def rank(self, value: int) -> None:  # set once by HorovodDistribution.__init__
        pass

    @property  # type: ignore[override]
    def size(self) -> int:
        """Horovod: the current world size."""
        return self._hvd.size()

    @size.setter
    def size(self, value: int) -> None:
        pass

    @property  # type: ignore[override]
    def local_rank(self) -> int:
        """Horovod: this rank's index on its host in the current world."""
        return self._hvd.local_rank()

    @local_rank.setter
    def local_rank(self, value: int) -> None:
        pass

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Horovod: always average gradients, as the world may change size."""
        return self._distributed(optimizer)

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """As non-elastic, less the initial broadcast: the elastic state's sync does it."""
        # Horovod: the first callback of the parent is BroadcastGlobalVariablesCallback.
        return super().callbacks(
            initial_lr=initial_lr, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch
        )[1:]

    def load_model(self, path: str) -> Any:
        """Horovod: always re-wrap the optimizer, even in a world of one."""
        return self._load_wrapped(path)

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Horovod: weights, optimizer and ``values``, committed and restored together."""
        return self._hvd.elastic.KerasState(model, **values)

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Horovod: restore the last commit and call ``fn`` again when the world resets."""
        return self._hvd.elastic.run(fn)

    def elastic_callbacks(self, state: Any) -> list:
        """Horovod: count epochs in the state, then commit it at the end of every epoch."""
        hvd = self._hvd
        return [
            # Horovod: state.epoch = the epochs completed, for the restart after a reset.
            hvd.elastic.UpdateEpochStateCallback(state),
            # Horovod: commit only at epoch ends (a commit copies every weight).
            hvd.elastic.CommitStateCallback(state, batches_per_commit=1 << 30),
        ]


def distribution(
    kind: str, elastic: bool = False, knobs: HorovodConfig | None = None
) -> Distribution:
    """The :class:`Distribution` a worker started by launcher ``kind`` runs under.

    Args:
        kind: ``horovod`` or ``local``.
        elastic: Horovod elastic mode.
        knobs: Horovod's performance settings (``train.horovod``); unused locally.
    """
    if kind != "horovod":
        return LocalDistribution()
    return ElasticHorovodDistribution(knobs) if elastic else HorovodDistribution(knobs)


class Launcher(Protocol):
    """Starts the training ranks."""

    kind: str
    num_proc: int

    def wait_for_slots(self, elastic: bool = False, min_num_proc: int = 1) -> None:
        """Fail (after a bounded wait) unless every rank can get a task slot at once."""

    def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        elastic: bool = False,
        min_num_proc: int = 1,
        rank_timeout_s: float | None = None,
    ) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order.

        Raises:
            RankLostError: A rank died and the job (not elastic) ended.
        """


class LocalLauncher:
    """One rank, in this process."""

    kind, num_proc = "local", 1

    def wait_for_slots(self, elastic: bool = False, min_num_proc: int = 1) -> None:
        """Nothing to wait for: the one rank runs here, not in a Spark task."""

    def run(self, fn: Callable[..., Any], args: Sequence[Any], **_faults: Any) -> list[Any]:
        """Call ``fn(*args)`` here (one rank: nothing to be elastic about, nothing to time)."""
        return [fn(*args)]


class HorovodSparkLauncher:
    """``num_proc`` Horovod ranks over Gloo, one per Spark task slot."""

    kind = "horovod"

    def __init__(
        self,
        spark: SparkSession,
        num_proc: int,
        nics: Sequence[str] = (),
        slots_timeout_s: float = 120.0,
    ) -> None:
        self.spark = spark
        self.num_proc = num_proc
        self.nics = set(nics) or None
        self.slots_timeout_s = slots_timeout_s

    def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        elastic: bool = False,
        min_num_proc: int = 1,
        rank_timeout_s: float | None = None,
    ) -> list[Any]:
        """Run ``fn(*args)`` as ``num_proc`` ranks with ``horovod.spark.run`` (or ``run_elastic``).

        Args:
            fn: The rank function.
            args: Its arguments.
            elastic: Use Horovod elastic: a lost rank resets the world, the rest go on.
            min_num_proc: Elastic: the fewest ranks training goes on with.
            rank_timeout_s: How long a rank waits in a collective for a silent peer (Gloo's
                timeout), and, elastic, for enough ranks after a reset. None: Horovod's.

        Raises:
            RankLostError: Not elastic, and a rank exited abnormally (killed, crashed).
        """
        try:
            import horovod.spark  # noqa: F401 - here only to fail early, and clearly
        except ImportError as exc:
            raise UserError(
                f"Horovod is not importable ({exc}); run 'make venv' to build it, "
                "or use --set train.launcher=local for one in-process rank"
            ) from None
        self.wait_for_slots(elastic, min_num_proc)  # at once when it was called before
        log.info("train: starting %d Horovod ranks on Spark (Gloo)", self.num_proc)
        import cloudpickle

        from pipelines.train import rank_entry

        # Horovod: each rank is a fresh process that sees only installed packages; the
        # entry point (pickled by value) first puts the shipped --py-files on its path.
        cloudpickle.register_pickle_by_value(rank_entry)
        payload = cloudpickle.dumps((_returning_user_errors, (fn, *args)))
        # The .zip/.egg files shipped with the application (PySpark's own list of them).
        includes = list(getattr(self.spark.sparkContext, "_python_includes", None) or [])
        env: dict[str, str] = {}
        if rank_timeout_s:
            # Horovod: a collective waiting on a peer that went silent (a stopped process, a
            # lost host) fails after this long instead of hanging; a dead peer's closed
            # socket fails it at once.
            env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(int(rank_timeout_s))
        with horovod_patches.launch_patches(elastic):
            results = self._launch(payload, includes, env, elastic, min_num_proc, rank_timeout_s)
        for result in results:
            if isinstance(result, _RankUserError):
                raise result.error
        return results

    def _launch(
        self,
        payload: bytes,
        includes: list[str],
        env: dict[str, str],
        elastic: bool,
        min_num_proc: int,
        rank_timeout_s: float | None,
    ) -> list[Any]:
        """Run the ranks with ``horovod.spark.run`` (or ``run_elastic``); their results."""
        import horovod.spark

        from pipelines.train import rank_entry

        if elastic:
            return horovod.spark.run_elastic(
                rank_entry.run_shipped,
                args=(payload, includes),
                num_proc=self.num_proc,
                min_num_proc=min(min_num_proc, self.num_proc),
                max_num_proc=self.num_proc,
                elastic_timeout=int(rank_timeout_s) if rank_timeout_s else None,
                # Horovod: added to each task's own environment.
                env=env or None,
                nics=self.nics,
                verbose=0,
            )
        try:
            return horovod.spark.run(
                rank_entry.run_shipped,
                # A static launch's ranks end without Python's teardown (rank_entry).
                args=(payload, includes, True),
                num_proc=self.num_proc,
                use_gloo=True,
                nics=self.nics,
                env=env or None,
                verbose=0,
            )
        except RuntimeError as exc:
            lost = _lost_rank(str(exc))
            if lost is None:
                raise
            raise RankLostError(*lost, detail=str(exc).splitlines()[0]) from exc

    def wait_for_slots(self, elastic: bool = False, min_num_proc: int = 1) -> None:
        """Wait (bounded) until the executors offer a task slot per rank, else fail in one line.

        Horovod on Spark needs every rank's task running at once: with fewer slots the
        ranks that started would wait for the others until Horovod's start timeout.
        Elastic training may start with fewer ranks than ``num_proc``, never below
        ``min_num_proc``.
        """
        from pipelines.spark import task_slots

        key, wanted = ("min_num_proc", min_num_proc) if elastic else ("num_proc", self.num_proc)
        slots = task_slots(self.spark, self.num_proc, self.slots_timeout_s)
        if slots < wanted:
            raise UserError(
                f"train.{key}={wanted} needs {wanted} concurrent Spark task slots, but the "
                f"executors offer {slots} after {self.slots_timeout_s:g} s "
                f"(train.slots_timeout_s); lower train.{key}, or add executors or cores"
            )


def _lost_rank(message: str) -> tuple[int, int | None] | None:
    """(rank, exit code) from Horovod's "processes exited with non-zero status" error.

    Horovod's launcher names each process by its slot, which is its rank, and reports the
    first one (by time) to exit with a non-zero status; its exit code is ``None`` when the
    rank's Spark task service is gone with its executor (a lost worker or host).
    """
    found = re.search(r"Process name: (\d+)\s+Exit code: (-?\d+|None)", message)
    if not found:
        return None
    code = found.group(2)
    return int(found.group(1)), None if code == "None" else int(code)


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
    kind: str,
    spark: SparkSession | None,
    num_proc: int,
    nics: Sequence[str] = (),
    slots_timeout_s: float = 120.0,
) -> Launcher:
    """The launcher for ``train.launcher``; ``local`` ignores everything but ``kind``."""
    if kind == "local":
        return LocalLauncher()
    if spark is None:
        raise ValueError("the horovod launcher needs a SparkSession")
    return HorovodSparkLauncher(spark, num_proc, nics, slots_timeout_s)
