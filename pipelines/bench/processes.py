"""Peak memory and CPU of a process tree, by kind of process, sampled in the background.

In: this process and its descendants (a local Spark's JVM, its Python daemon and workers,
Horovod ranks started beside the workers). Out: per kind of process, the peak resident
memory (RSS) of its largest process and of all of them together, and the CPU seconds they
used while sampled (:class:`ProcessUsage`), from :class:`ProcessSampler`, a context
manager. psutil is imported when sampling starts.

Kinds (:data:`KINDS`): ``driver`` (this process), ``jvm`` (a ``java`` descendant),
``horovod_rank`` (a Python process started by Horovod, ``horovod.spark.task...``),
``python_worker`` (PySpark's ``pyspark.daemon`` and the workers it forks, and any other
Python below the JVM) and ``other`` (anything else below this process).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

#: The kinds of process a sample is split into, in report order.
KINDS = ("driver", "jvm", "python_worker", "horovod_rank", "other")
#: Seconds between samples.
SAMPLE_INTERVAL_S = 0.1


@dataclass(frozen=True)
class KindUsage:
    """What the processes of one kind used while sampled.

    Attributes:
        processes: Distinct processes of this kind seen.
        peak_rss_bytes: Largest RSS of any one of them at any sample.
        peak_total_rss_bytes: Largest sum of their RSS at one sample.
        cpu_seconds: User + system CPU seconds they used between the first and the last
            sample (a process that ended counts up to its last sample; for the PySpark
            daemon, the workers it forked and reaped in between are included).
    """

    processes: int
    peak_rss_bytes: int
    peak_total_rss_bytes: int
    cpu_seconds: float


@dataclass(frozen=True)
class ProcessUsage:
    """Per-kind usage of a process tree over a sampled stretch of time.

    Attributes:
        seconds: Wall seconds sampled.
        samples: Samples taken.
        kinds: Kind (see :data:`KINDS`) -> its usage; only kinds seen.
    """

    seconds: float
    samples: int
    kinds: dict[str, KindUsage] = field(default_factory=dict)

    def peak_rss_mib(self, kind: str) -> float:
        """Peak RSS of the largest process of ``kind`` in MiB (0 when none was seen)."""
        usage = self.kinds.get(kind)
        return round(usage.peak_rss_bytes / 2**20, 1) if usage else 0.0

    def describe(self) -> dict[str, Any]:
        """JSON-ready figures for a measurement's details: MiB and rounded seconds."""
        return {
            "sampled_seconds": round(self.seconds, 3),
            "samples": self.samples,
            **{
                kind: {
                    "processes": u.processes,
                    "peak_rss_mib": round(u.peak_rss_bytes / 2**20, 1),
                    "peak_total_rss_mib": round(u.peak_total_rss_bytes / 2**20, 1),
                    "cpu_seconds": round(u.cpu_seconds, 3),
                }
                for kind, u in self.kinds.items()
            },
        }

    def as_dict(self) -> dict[str, Any]:
        """The raw figures (bytes, seconds)."""
        return asdict(self)


@dataclass
class _Seen:
    """One process as last sampled (keyed by pid and start time: pids are reused)."""

    kind: str
    parent: int | None
    cpu_start: float
    cpu_last: float
    reaped_start: float = 0.0
    reaped_last: float = 0.0
    peak_rss: int = 0
    alive: bool = True


class ProcessSampler:
    """Sample this process and its descendants every ``interval`` seconds on a thread.

    Use as ``with ProcessSampler() as sampler: ...``; :attr:`usage` is set on exit. The
    first sample is taken on entry and the last on exit, so processes alive throughout
    are counted exactly; a process that starts and ends between two samples is missed
    (except a daemon's reaped workers), so CPU seconds are a lower bound. Sampling costs
    a few milliseconds of this process's CPU per sample.

    Args:
        interval: Seconds between samples.
        root: The process whose tree is sampled (default: this one); it is ``driver``.
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL_S, root: int | None = None) -> None:
        self.interval = interval
        self.root = os.getpid() if root is None else root
        self.usage: ProcessUsage | None = None
        self._seen: dict[tuple[int, float], _Seen] = {}
        self._peak_totals: dict[str, int] = {}
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> ProcessSampler:
        import psutil

        self._root = psutil.Process(self.root)
        self._started = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.usage = self._summary(time.perf_counter() - self._started)

    def figures(self, pid: int) -> tuple[str, int, float] | None:
        """``(kind, peak RSS bytes, CPU seconds)`` of process ``pid`` as sampled, or None."""
        for (seen_pid, _), s in self._seen.items():
            if seen_pid == pid:
                return s.kind, s.peak_rss, s.cpu_last - s.cpu_start
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take one sample of the whole tree (called by the thread; public for tests)."""
        import psutil

        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            procs = []
        totals: dict[str, int] = {}
        alive: set[tuple[int, float]] = set()
        for proc in procs:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    seen = self._seen.get(key) or self._first_sight(proc, key, times)
            except psutil.Error:  # ended while being read
                continue
            alive.add(key)
            seen.cpu_last = times.user + times.system
            seen.reaped_last = times.children_user + times.children_system
            seen.peak_rss = max(seen.peak_rss, rss)
            totals[seen.kind] = totals.get(seen.kind, 0) + rss
        for key, seen in self._seen.items():
            seen.alive = key in alive
        for kind, total in totals.items():
            self._peak_totals[kind] = max(self._peak_totals.get(kind, 0), total)
        self._samples += 1

    def _first_sight(self, proc: Any, key: tuple[int, float], times: Any) -> _Seen:
        parent = proc.ppid()
        parent_kind = next((s.kind for (pid, _), s in self._seen.items() if pid == parent), None)
        kind = self._classify(proc, parent_kind)
        # Alive at the first sample: only what it uses from now on counts.
        first = self._samples == 0
        own = times.user + times.system if first else 0.0
        reaped = times.children_user + times.children_system if first else 0.0
        seen = _Seen(kind, parent, own, own, reaped, reaped)
        self._seen[key] = seen
        return seen

    def _classify(self, proc: Any, parent_kind: str | None) -> str:
        if proc.pid == self.root:
            return "driver"
        name = proc.name().lower()
        try:
            cmdline = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - some processes hide it; the name is enough
            cmdline = name
        if name == "java" or cmdline.split(" ")[0].endswith("/java"):
            return "jvm"
        if "python" not in name and "python" not in cmdline:
            return "other"
        if "horovod" in cmdline:
            return "horovod_rank"
        if "pyspark" in cmdline or parent_kind in ("jvm", "python_worker"):
            return "python_worker"
        return "other"

    def _summary(self, seconds: float) -> ProcessUsage:
        kinds: dict[str, KindUsage] = {}
        for kind in KINDS:
            members = [(key, s) for key, s in self._seen.items() if s.kind == kind]
            if not members:
                continue
            cpu = sum(s.cpu_last - s.cpu_start for _, s in members)
            cpu += sum(self._reaped(key, s) for key, s in members)
            kinds[kind] = KindUsage(
                processes=len(members),
                peak_rss_bytes=max(s.peak_rss for _, s in members),
                peak_total_rss_bytes=self._peak_totals.get(kind, 0),
                cpu_seconds=cpu,
            )
        return ProcessUsage(seconds=seconds, samples=self._samples, kinds=kinds)

    def _reaped(self, key: tuple[int, float], seen: _Seen) -> float:
        """CPU of the PySpark daemon's reaped workers not already counted on their own.

        Only the daemon (a ``python_worker`` whose parent is the JVM) counts its reaped
        children: its workers are forked and may end between samples. Workers it forked
        that were sampled and have ended are in that figure and in their own; their own
        is taken off.
        """
        parent_kind = next(
            (s.kind for (pid, _), s in self._seen.items() if pid == seen.parent), None
        )
        if seen.kind != "python_worker" or parent_kind != "jvm":
            return 0.0
        counted = sum(
            s.cpu_last - s.cpu_start
            for s in self._seen.values()
            if s.parent == key[0] and not s.alive
        )
        return max(0.0, seen.reaped_last - seen.reaped_start - counted)
