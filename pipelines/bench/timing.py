"""How benchmarks run what they measure: sizes checked, runs interleaved and timed.

In: callables to run, a number of repeats. Out: figures per run (wall seconds, CPU
seconds of the process tree, Keras epoch times). Nothing heavy is imported at import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pipelines.errors import UserError

log = logging.getLogger("pipelines.bench")


def interleaved(
    benchmark: str, runs: Mapping[str, Callable[[], float]], repeats: int
) -> dict[str, list[float]]:
    """Call every run once per repeat, in turn, and collect the figure each returns.

    Interleaving (A, B, A, B, ... rather than A, A, B, B) lets a neighbour's load on the
    machine affect a measurement and its baseline alike.

    Args:
        benchmark: Benchmark name, for the log.
        runs: Name -> a callable that runs once and returns its figure (e.g. seconds).
        repeats: Rounds.

    Returns:
        Name -> one figure per round.
    """
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            figures[name].append(float(run()))
            log.info(
                "bench %s: %s run %d/%d: %.4g", benchmark, name, i + 1, repeats, figures[name][-1]
            )
    return figures


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(wall seconds, result)`` of calling ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants.

    Covers a local Spark's JVM and Python workers; processes that ended in between are
    missed, so it is a lower bound.
    """
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def epoch_timer() -> Any:
    """A Keras callback recording each epoch's wall seconds and where the CPU went.

    Per epoch: ``.seconds`` (wall), ``.process_cpu`` (CPU seconds of the whole process,
    every thread) and ``.reader_cpu`` (of the Python threads started in the process other
    than the one running ``fit``: the feed's reader and Petastorm's reader pool; the rest
    is TensorFlow's and Horovod's threads and the ``fit`` loop).

    Put it last in the callback list: Keras calls callbacks in order, so the epoch's end
    is taken after every other callback's end-of-epoch work (e.g. Horovod's metric
    averaging), which is part of the epoch's cost.
    """
    from pipelines.keras_api import keras

    class EpochTimer(keras().callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.process_cpu: list[float] = []
            self.reader_cpu: list[float] = []
            self._start = (0.0, 0.0, 0.0)

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = (time.perf_counter(), time.process_time(), reader_threads_cpu())

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            wall, process, reader = self._start
            self.seconds.append(time.perf_counter() - wall)
            self.process_cpu.append(time.process_time() - process)
            self.reader_cpu.append(reader_threads_cpu() - reader)

    return EpochTimer()


def reader_threads_cpu() -> float:
    """CPU seconds so far of this process's Python threads other than the calling one.

    Threads Python did not start (TensorFlow's, Horovod's, even while they run Python
    callbacks) are left out; so is a thread that ended (its time is no longer listed).
    """
    import threading

    import psutil

    ids = {
        thread.native_id
        for thread in threading.enumerate()
        if not isinstance(thread, threading._DummyThread)  # noqa: SLF001 - foreign threads
    } - {threading.get_native_id()}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def check_sizes(benchmark: str, images: int, repeats: int, minimum: int = 1) -> None:
    """Refuse sizes a benchmark cannot run with.

    Raises:
        UserError: ``images`` below ``minimum`` or ``repeats`` below 1.
    """
    if images < minimum or repeats < 1:
        raise UserError(
            f"bench {benchmark}: --images must be >= {minimum} and repeats >= 1, "
            f"got {images} and {repeats}"
        )
