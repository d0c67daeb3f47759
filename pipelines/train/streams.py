"""Reading Petastorm row groups on threads that can always be stopped, also at exit.

In: a split's URL and ``make_batch_reader`` arguments. Out: :class:`RowGroupStream`, a
daemon thread filling a small queue with ``(cells, labels)`` row groups, which the
``tf.data`` generator of :mod:`pipelines.train.feed` only waits on with a timeout;
:data:`GENERATOR_WORK`, which a generator holds while it works; and
:func:`close_readers_at_exit`, the exit hook that stops every stream and lets every
``tf.data`` pipeline reach its end before the interpreter finalises.

Why this exists: a thread blocked in a Petastorm reader cannot be woken (its pool never
checks for ``stop()`` there), and a live ``tf.data`` iterator destroyed during interpreter
finalisation while one of its threads waits for the GIL in a Python generator hangs or aborts
the process ("terminate called without an active exception"). Keeping the generator's only
blocking call a queue wait with a timeout, and draining every pipeline in an ``atexit`` hook
registered after TensorFlow's, makes a rank's exit clean.
"""

from __future__ import annotations

import atexit
import functools
import queue
import threading
import time
import weakref
from typing import Any

import numpy as np

#: Seconds between checks for a stop request while waiting on a queue.
_POLL_S = 0.05

#: Row groups a stream holds ready for the tf.data generator.
_STREAM_QUEUE_ROW_GROUPS = 2

#: The longest the exit hook waits for readers to stop and tf.data threads to go quiet.
_SHUTDOWN_TIMEOUT_S = 10.0

#: How long no tf.data thread may have been inside a generator before the exit hook returns.
_QUIET_S = 0.05

#: Set by the exit hook: generators return at once, so every pipeline runs to its end.
_CLOSING = threading.Event()


def closing() -> bool:
    """Whether the exit hook has started: generators should return at once."""
    return _CLOSING.is_set()


class _Activity:
    """Counts threads inside a generator's work and remembers when the last one left."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0
        self._last = 0.0

    def __enter__(self) -> None:
        with self._cond:
            self._busy += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._busy -= 1
            self._last = time.monotonic()
            self._cond.notify_all()

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Wait until nobody is inside and nobody was for ``quiet`` seconds (or timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (now := time.monotonic()) < deadline:
                if self._busy == 0 and now - self._last >= quiet:
                    return
                self._cond.wait(min(quiet, deadline - now))


GENERATOR_WORK = _Activity()


class RowGroupStream:
    """A daemon thread that reads row groups with Petastorm into a small queue.

    Why not read Petastorm directly in the tf.data generator: a thread blocked in a Petastorm
    reader cannot be woken (its pool never checks for ``stop()`` there), and a tf.data thread
    blocked in Python when the interpreter exits hangs or aborts the process. Here the
    generator only waits on a queue, with a timeout, and can always return.
    """

    def __init__(self, url: str, reader_args: dict[str, Any]) -> None:
        self._url = url
        self._reader_args = reader_args
        self._queue: queue.Queue[Any] = queue.Queue(_STREAM_QUEUE_ROW_GROUPS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="feed-reader", daemon=True)
        _STREAMS.add(self)
        self._thread.start()

    def get(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next ``(cells, labels)`` row group; None when stopped or exiting.

        Raises:
            Exception: Whatever the reader raised.
        """
        while not (self._stop.is_set() or _CLOSING.is_set()):
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item
        return None

    def stop(self) -> None:
        """Ask the thread to stop (it finishes the row group it is reading)."""
        self._stop.set()

    def join(self, timeout: float | None) -> None:
        """Wait for the thread (and its Petastorm reader) to end."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            _STREAMS.discard(self)

    def close(self) -> None:
        """Stop and wait."""
        self.stop()
        self.join(_SHUTDOWN_TIMEOUT_S)

    def _read(self) -> None:
        from petastorm import make_batch_reader

        try:
            reader = make_batch_reader(self._url, **self._reader_args)
        except BaseException as exc:  # handed to the generator, raised on its thread
            self._put(exc)
            return
        try:
            for batch in reader:
                if not self._put((batch.image, batch.label)):
                    return
        except BaseException as exc:
            self._put(exc)
        finally:
            # stop + join, not the context manager: its exit prints "Cache cleanup complete."
            reader.stop()
            reader.join()

    def _put(self, item: Any) -> bool:
        while not (self._stop.is_set() or _CLOSING.is_set()):
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


_STREAMS: weakref.WeakSet[RowGroupStream] = weakref.WeakSet()


@functools.cache
def close_readers_at_exit() -> None:
    """Register :func:`_shutdown` (once, after TensorFlow is imported: atexit runs LIFO)."""
    atexit.register(_shutdown)


def _shutdown() -> None:
    """Stop every reader and let every tf.data pipeline reach its end before Python exits.

    A live iterator at exit would otherwise be destroyed during interpreter finalisation
    while a tf.data thread waits for the GIL inside the generator: a hang or an abort
    ("terminate called without an active exception").
    """
    _CLOSING.set()
    deadline = time.monotonic() + _SHUTDOWN_TIMEOUT_S
    streams = list(_STREAMS)
    for stream in streams:
        stream.stop()
    for stream in streams:
        stream.join(max(0.0, deadline - time.monotonic()))
    GENERATOR_WORK.wait_quiet(_QUIET_S, max(0.0, deadline - time.monotonic()))
