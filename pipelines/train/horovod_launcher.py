"""Horovod's ranks on Spark: the :class:`~pipelines.train.launchers.Launcher` of ``horovod``.

In: a rank function with its arguments, a SparkSession. Out: the function's results in rank
order. :class:`HorovodSparkLauncher` runs ``train.num_proc`` ranks on the Spark executors
with ``horovod.spark.run`` over Gloo (one Spark task slot per rank), or with
``horovod.spark.run_elastic`` when asked for elastic mode (a lost rank resets the world and
the ranks left carry on). The ranks' side is :mod:`pipelines.train.horovod_distribution`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pipelines.errors import UserError
from pipelines.train import horovod_patches
from pipelines.train.launchers import (
    RankLostError,
    RankUserError,
    WorldLostError,
    returning_user_errors,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


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
        env: dict[str, str] | None = None,
    ) -> list[Any]:
        """Run ``fn(*args)`` as ``num_proc`` ranks with ``horovod.spark.run`` (or ``run_elastic``).

        Args:
            fn: The rank function.
            args: Its arguments.
            elastic: Use Horovod elastic: a lost rank resets the world, the rest go on.
            min_num_proc: Elastic: the fewest ranks training goes on with.
            rank_timeout_s: How long a rank waits in a collective for a silent peer (Gloo's
                timeout), and, elastic, for enough ranks after a reset. None: Horovod's.
            env: Added to each rank's environment (e.g. where MLflow is, and its
                credentials; Horovod sends it to the task that starts the rank).

        Raises:
            RankLostError: Not elastic, and a rank exited abnormally (killed, crashed).
            WorldLostError: Elastic, and every rank of a world failed.
        """
        try:
            import horovod.spark  # noqa: F401 - here only to fail early, and clearly
        except ImportError as exc:
            raise UserError(
                f"Horovod is not importable ({exc}); run 'make venv' to build it, "
                "or use --set train.launcher=local for one in-process rank"
            ) from None
        if elastic:
            self._check_task_retries()
        self.wait_for_slots(elastic, min_num_proc)  # at once when it was called before
        log.info("train: starting %d Horovod ranks on Spark (Gloo)", self.num_proc)
        import cloudpickle

        from pipelines.train import rank_entry

        # Horovod: each rank is a fresh process that sees only installed packages; the
        # entry point (pickled by value) first puts the shipped --py-files on its path.
        cloudpickle.register_pickle_by_value(rank_entry)
        payload = cloudpickle.dumps((returning_user_errors, (fn, *args)))
        # The .zip/.egg files shipped with the application (PySpark's own list of them).
        includes = list(getattr(self.spark.sparkContext, "_python_includes", None) or [])
        env = dict(env or {})
        if rank_timeout_s:
            # Horovod: a collective waiting on a peer that went silent (a stopped process, a
            # lost host) fails after this long instead of hanging; a dead peer's closed
            # socket fails it at once.
            env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(int(rank_timeout_s))
        with horovod_patches.launch_patches(elastic):
            results = self._launch(payload, includes, env, elastic, min_num_proc, rank_timeout_s)
        for result in results:
            if isinstance(result, RankUserError):
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
            try:
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
            except RuntimeError as exc:
                if "exited with non-zero status" not in str(exc):
                    raise
                raise WorldLostError(
                    "elastic training lost every rank of its world (a rank lost while a "
                    "reset waited for it, or all at once): resume from the last committed "
                    "epoch with `dlpipe train --resume`"
                ) from exc
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

    def _check_task_retries(self) -> None:
        """Elastic: fail in one line, before any rank starts, on a master that never retries.

        Horovod restarts a lost rank in its Spark task's next attempt; a local master that
        tries each task once (``local[N]``) would fail the job on the first lost rank.
        ``dlpipe`` builds its own session with retries; a session made elsewhere may lack them.
        """
        from pipelines.spark import ELASTIC_TASK_ATTEMPTS, local_task_attempts

        master = self.spark.sparkContext.master
        attempts = local_task_attempts(master)
        if attempts is not None and attempts < 2:
            raise UserError(
                f"train.elastic=true needs a master that retries tasks, but {master} tries "
                f"each once; use local[N,{ELASTIC_TASK_ATTEMPTS}] (spark.master)"
            )

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
