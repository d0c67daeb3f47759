"""The driver side of distributed training: what starts the ranks and collects their results.

In: a rank function with its arguments. Out: the function's return value from every rank,
in rank order. :class:`Launcher` is the seam (``train.launcher``): :class:`LocalLauncher`
here runs one rank in this process (tests, notebooks, machines without Horovod);
:class:`~pipelines.train.horovod_launcher.HorovodSparkLauncher` runs Horovod's ranks on the
Spark executors. :func:`make_launcher` picks one.

What a rank does is :mod:`pipelines.train.worker`'s; what it asks of its runtime is
:mod:`pipelines.train.distributions`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


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


class WorldLostError(UserError):
    """Elastic training ended: every rank of a (reset) world failed, none was left to go on.

    Horovod elastic carries on without a lost rank, but a world whose ranks all fail ends
    the job: e.g. a rank lost while a reset's rendezvous waits for it, when Gloo aborts
    the others after ``train.rank_timeout_s``.
    """


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
        env: dict[str, str] | None = None,
    ) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order.

        ``env`` is added to each rank's environment (a rank in this process has it).

        Raises:
            RankLostError: A rank died and the job (not elastic) ended.
        """


class LocalLauncher:
    """One rank, in this process."""

    kind, num_proc = "local", 1

    def wait_for_slots(self, elastic: bool = False, min_num_proc: int = 1) -> None:
        """Nothing to wait for: the one rank runs here, not in a Spark task."""

    def run(self, fn: Callable[..., Any], args: Sequence[Any], **_options: Any) -> list[Any]:
        """Call ``fn(*args)`` here (one rank: nothing to be elastic about, nothing to time).

        The rank is this process: it has this process's environment and MLflow set-up.
        """
        return [fn(*args)]


class RankUserError:
    """A rank's :class:`UserError`, returned instead of raised so the driver can re-raise it.

    Raised in a rank it would reach the driver only as Horovod's "process exited with
    non-zero status"; the ranks raise together (e.g. after an allgather), so none is left
    waiting in a collective.
    """

    def __init__(self, error: UserError) -> None:
        self.error = error


def returning_user_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with a :class:`UserError` it raises returned as a :class:`RankUserError`."""
    try:
        return fn(*args)
    except UserError as exc:
        return RankUserError(exc)


def make_launcher(
    kind: str,
    spark: SparkSession | None,
    num_proc: int,
    nics: Sequence[str] = (),
    slots_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Launcher:
    """The launcher for ``train.launcher``; ``local`` ignores everything but ``kind``.

    ``env`` (keras only) is added to every rank's environment (``JAX_PLATFORMS``,
    ``XLA_FLAGS``: a rank's devices and threads are fixed when its JAX starts).
    """
    if kind == "local":
        return LocalLauncher()
    if spark is None:
        raise ValueError(f"the {kind} launcher needs a SparkSession")
    if kind == "keras":
        from pipelines.train.keras_launcher import KerasSparkLauncher

        return KerasSparkLauncher(spark, num_proc, slots_timeout_s, env)
    from pipelines.train.horovod_launcher import HorovodSparkLauncher

    return HorovodSparkLauncher(spark, num_proc, nics, slots_timeout_s)
