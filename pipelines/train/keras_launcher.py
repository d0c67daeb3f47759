"""The Keras stack's driver side: training ranks as Spark barrier tasks, each in a fresh process.

In: a rank function with its arguments. Out: its return value from every rank, in rank
order (the ``Launcher`` protocol of :mod:`pipelines.train.launchers`); a rank that dies ends
the job with :class:`~pipelines.train.launchers.RankLostError`.

How, as PySpark's own ``TorchDistributor`` starts its ranks (``pyspark/ml/torch/
distributor.py``):

- one barrier stage of ``num_proc`` tasks (``rdd.barrier().mapPartitions``), so all ranks get
  a task slot at once or none starts; the task's partition is the rank;
- rank 0's task picks a free port on its executor's host, and
  ``BarrierTaskContext.allGather`` hands ``host:port`` (JAX's coordinator) to every task, with
  each task's host, from which each rank's place on its host follows;
- every task runs its rank in a fresh Python process (the executor's interpreter), because
  ``jax.distributed.initialize`` must come before any JAX computation, and a Python worker
  may be reused. The rank's environment carries its
  :class:`~pipelines.train.jax_distribution.RankSpec`; its first code is
  :func:`pipelines.train.rank_entry.run_shipped`, pickled by value, which puts the shipped
  ``--py-files`` on its path before unpickling the rank function;
- the rank's result travels back pickled, through the task, to ``collect()``.

When a rank dies: its task sees the exit status at once and fails with a line naming the
rank and the status; Spark then fails the barrier stage and kills the other tasks (their
Python workers within ``spark.python.task.killTimeout``). A rank is tied to its task's process
with ``PR_SET_PDEATHSIG`` (SIGKILL), so no rank outlives the task that started it, whoever
ends that task. The others' own failures follow from the lost rank (JAX's coordination
service ends every process once one is gone); so that the driver hears of the lost one, a
task whose rank failed in any other way than SIGKILL (which no rank sends itself) waits
:data:`PEER_GRACE_S` before failing. With a local master (one attempt per task) the job then
ends with :class:`RankLostError`; on a cluster Spark may first retry the whole stage, every
rank anew (``spark.task.maxFailures``, ``spark.stage.maxConsecutiveAttempts``).

A rank that stops without dying (a hung host) is failed by JAX's heartbeat timeout,
``rank_timeout_s``: the job ends about ``rank_timeout_s`` + :data:`PEER_GRACE_S` + Spark's
kill timeout after the rank went silent.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from pipelines.errors import UserError
from pipelines.train.launchers import RankLostError, RankUserError, returning_user_errors

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: How long a task whose rank failed other than by SIGKILL waits before failing the stage,
#: so that a peer killed at the same time is the one the driver hears of.
PEER_GRACE_S = 3.0

#: Lines of a rank's output kept for the error when it fails.
_TAIL_LINES = 40

#: Marks every rank process: ``<marker>=<job>:<rank>`` is its last argument.
RANK_MARKER = "dlpipe-keras-rank"

#: The message a task fails with when its rank exits abnormally, parsed on the driver.
_LOST = "dlpipe: keras rank lost: rank {rank} exited with status {status}: {detail}"
_LOST_PATTERN = re.compile(
    r"dlpipe: keras rank lost: rank (\d+) exited with status (-?\d+): ([^\n]*)"
)

#: A rank process's first code, before anything of the project can be imported: die with
#: the task's process (PR_SET_PDEATHSIG = 1; if that process is already gone, exit), load
#: the entry point (pickled by value) and its arguments, call it, write the result.
_BOOT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    os._exit(70)
import cloudpickle
folder = sys.argv[2]
with open(os.path.join(folder, "entry.pkl"), "rb") as handle:
    entry, args = cloudpickle.load(handle)
try:
    result = entry(*args)
    data = cloudpickle.dumps(result)
except BaseException as exc:
    import traceback
    with open(os.path.join(folder, "error.txt"), "w") as handle:
        handle.write(traceback.format_exception_only(type(exc), exc)[0].strip())
    sys.stderr.write(traceback.format_exc())
    sys.stderr.flush()
    os._exit(1)  # not through exit handlers: JAX's would wait for the other ranks
with open(os.path.join(folder, "result.tmp"), "wb") as handle:
    handle.write(data)
os.replace(os.path.join(folder, "result.tmp"), os.path.join(folder, "result.pkl"))
"""


class KerasSparkLauncher:
    """``num_proc`` Keras-on-JAX ranks, one per Spark barrier task, each in its own process.

    Args:
        spark: The session whose executors run the ranks.
        num_proc: The number of ranks (``train.num_proc``).
        slots_timeout_s: How long :meth:`wait_for_slots` waits for enough task slots.
        env: Environment added to every rank's (e.g. ``JAX_PLATFORMS``, ``XLA_FLAGS``).
    """

    kind = "keras"

    def __init__(
        self,
        spark: SparkSession,
        num_proc: int,
        slots_timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        self.spark = spark
        self.num_proc = num_proc
        self.slots_timeout_s = slots_timeout_s
        self.env = dict(env or {})

    def wait_for_slots(self, elastic: bool = False, min_num_proc: int = 1) -> None:
        """Wait (bounded) until the executors offer a task slot per rank, else fail in one line.

        A barrier stage needs every task running at once; with fewer slots Spark fails it
        at once (or waits, with dynamic allocation), so the count is checked first.

        Raises:
            UserError: Elastic mode asked for, or too few slots after ``slots_timeout_s``.
        """
        from pipelines.spark import task_slots

        _refuse_elastic(elastic)
        slots = task_slots(self.spark, self.num_proc, self.slots_timeout_s)
        if slots < self.num_proc:
            raise UserError(
                f"train.num_proc={self.num_proc} needs {self.num_proc} concurrent Spark task "
                f"slots, but the executors offer {slots} after {self.slots_timeout_s:g} s "
                "(train.slots_timeout_s); lower train.num_proc, or add executors or cores"
            )

    def run(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        *,
        elastic: bool = False,
        min_num_proc: int = 1,
        rank_timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order.

        Args:
            fn: The rank function; it builds a
                :class:`~pipelines.train.jax_distribution.JaxDistribution` first.
            args: Its arguments (pickled with cloudpickle).
            elastic: Must be False (no elastic mode here).
            min_num_proc: Unused (elastic only).
            rank_timeout_s: How long ranks wait for each other to join, and for a silent
                peer's heartbeat; None: JAX's defaults (300 s to join, 100 s of silence).
            env: Added to every rank's environment, after the launcher's own ``env``.

        Raises:
            RankLostError: A rank exited abnormally (killed, crashed, raised).
            UserError: A rank raised one (re-raised here), or elastic mode was asked for.
        """
        import cloudpickle

        from pipelines.train import rank_entry

        self.wait_for_slots(elastic, min_num_proc)
        # Each rank sees only installed packages: the entry point travels by value and first
        # puts the shipped --py-files on its path (as for Horovod's ranks).
        cloudpickle.register_pickle_by_value(rank_entry)
        payload = cloudpickle.dumps((returning_user_errors, (fn, *args)))
        includes = list(getattr(self.spark.sparkContext, "_python_includes", None) or [])
        entry = cloudpickle.dumps((rank_entry.run_shipped, (payload, includes)))
        job = uuid.uuid4().hex[:12]
        log.info("train: starting %d Keras/JAX ranks as barrier tasks (%s)", self.num_proc, job)
        task = partial(_rank_task, entry, {**self.env, **(env or {})}, rank_timeout_s, job)
        ranks = self.spark.sparkContext.parallelize(range(self.num_proc), self.num_proc)
        try:
            pickled = ranks.barrier().mapPartitions(task).collect()
        except Exception as exc:
            lost = _LOST_PATTERN.search(str(exc))
            if lost is None:
                raise
            rank, status, detail = int(lost.group(1)), int(lost.group(2)), lost.group(3)
            raise RankLostError(rank, status, detail) from exc
        results = [cloudpickle.loads(data) for data in pickled]
        if len(results) != self.num_proc:
            raise RuntimeError(f"{len(results)} results from {self.num_proc} ranks")
        for result in results:
            if isinstance(result, RankUserError):
                raise result.error
        return results


def _refuse_elastic(elastic: bool) -> None:
    if elastic:
        raise UserError(
            "train.elastic: the keras launcher has no elastic mode (set train.elastic=false; "
            "a failed job resumes from its last checkpoint with --resume)"
        )


# --- in the Spark task -----------------------------------------------------------------------


def _rank_task(
    entry: bytes, env: Mapping[str, str], timeout_s: float | None, job: str, _: Iterator[int]
) -> Iterator[bytes]:
    """One barrier task: agree on the coordinator, run this rank's process, return its result."""
    from pyspark import BarrierTaskContext

    from pipelines.train.jax_distribution import RankSpec

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    hosts = [info.address.rsplit(":", 1)[0] for info in context.getTaskInfos()]
    port = _free_port(hosts[0]) if rank == 0 else 0
    # Spark: every task gets every task's string; rank 0's port is the coordinator's.
    coordinator_port = int(context.allGather(str(port))[0])
    spec = RankSpec(
        coordinator=f"{_url_host(hosts[0])}:{coordinator_port}",
        num_processes=len(hosts),
        process_id=rank,
        local_rank=hosts[:rank].count(hosts[rank]),
        local_size=hosts.count(hosts[rank]),
        timeout_s=timeout_s,
    )
    folder = tempfile.mkdtemp(prefix=f"dlpipe-rank{rank}-")
    try:
        with open(os.path.join(folder, "entry.pkl"), "wb") as handle:
            handle.write(entry)
        environment = {**os.environ, **env, **spec.environment(), "KERAS_BACKEND": "jax"}
        # As TorchDistributor: a task given GPUs by Spark (spark.task.resource.gpu.amount)
        # shows its rank only those, so ranks sharing a host never share a GPU.
        gpus = context.resources().get("gpu")
        if gpus is not None and gpus.addresses:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
        status, tail = _run_rank(folder, environment, f"{RANK_MARKER}={job}:{rank}", rank)
        if status == 0:
            with open(os.path.join(folder, "result.pkl"), "rb") as handle:
                yield handle.read()
            return
        if status != -signal.SIGKILL:
            # Give a peer killed at the same moment the time to be the one reported.
            time.sleep(PEER_GRACE_S)
        detail = _error_line(folder, tail) if status > 0 else _signal_name(-status)
        raise RuntimeError(_LOST.format(rank=rank, status=status, detail=detail))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_rank(folder: str, env: dict[str, str], marker: str, rank: int) -> tuple[int, list[str]]:
    """Run the rank's process to its end; its exit status and the last lines of its output.

    Its output goes to this task's stderr (the executor's log), each line prefixed with the
    rank. Started from the task's own thread, which lives until the task ends: the parent
    death signal follows that thread.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", _BOOT, str(os.getpid()), folder, marker],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        tail.append(line)
        sys.stderr.write(f"[rank {rank}] {line}\n")
    return process.wait(), list(tail)


def _error_line(folder: str, tail: list[str]) -> str:
    """One line saying why a rank failed: its exception's first line, else its last output."""
    path = os.path.join(folder, "error.txt")
    lines = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()][:1]
    lines = lines or [line for line in tail if line.strip()][-1:]
    return (lines[0] if lines else "no output")[:500]


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _free_port(host: str) -> int:
    """A port free on ``host`` now (JAX's coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _url_host(host: str) -> str:
    """``host`` as the host part of ``host:port`` (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
