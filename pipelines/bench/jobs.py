"""A Spark job's fixed cost: the time before its first task and after its last stage.

In: a SparkSession and a stretch of driver code that runs Spark jobs, between a
:class:`JobMark` and its :meth:`~JobMark.timeline`. Out: a :class:`JobTimeline`, read
from Spark's own status store (what the UI shows, kept whether the UI is on or not): how
long the driver took before the first task started (listing, planning, serialising the
job) and after the last stage finished (committing, reading back), against the time
tasks were running.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

#: How long to wait for Spark's listener bus to record the jobs' ends (it runs behind).
_SETTLE_S = 3.0


@dataclass(frozen=True)
class JobTimeline:
    """Where the wall time of a stretch of driver code went, by Spark's own record.

    Attributes:
        seconds: Wall seconds of the stretch.
        jobs: Spark jobs it ran.
        tasks: Tasks of the stages that ran (skipped stages excluded).
        to_first_task_s: From the start of the stretch to the first task launched.
        after_last_stage_s: From the last stage's completion to the end of the stretch.
        running_s: From the first task launched to the last stage completed.
    """

    seconds: float
    jobs: int
    tasks: int
    to_first_task_s: float
    after_last_stage_s: float
    running_s: float

    @property
    def fixed_s(self) -> float:
        """Seconds with no task running at either end: the job's fixed cost."""
        return self.to_first_task_s + self.after_last_stage_s

    def as_dict(self) -> dict[str, Any]:
        """Rounded figures, and the fixed cost's share of the wall time."""
        return {
            "seconds": round(self.seconds, 3),
            "jobs": self.jobs,
            "tasks": self.tasks,
            "to_first_task_s": round(self.to_first_task_s, 3),
            "after_last_stage_s": round(self.after_last_stage_s, 3),
            "running_s": round(self.running_s, 3),
            "fixed_s": round(self.fixed_s, 3),
            "fixed_share": round(self.fixed_s / self.seconds, 3) if self.seconds else None,
        }


class JobMark:
    """A point on the driver from which the Spark jobs run are timed.

    Make one just before the code to measure, call :meth:`timeline` just after it (the
    wall time ends at that call, before Spark's record is read).
    """

    def __init__(self, spark: SparkSession) -> None:
        self._store = _status_store(spark)
        self._before = _last_job_id(self._store) if self._store is not None else -1
        self.started = time.time()

    def timeline(self) -> JobTimeline | None:
        """The jobs run since the mark; None if none launched a task or none can be read.

        The status store of another Spark version may lack these internals: then None.
        """
        ended = time.time()
        if self._store is None:
            return None
        deadline = time.monotonic() + _SETTLE_S
        stages = _stages_after(self._store, self._before)
        while stages is None and time.monotonic() < deadline:
            time.sleep(0.02)
            stages = _stages_after(self._store, self._before)
        if not stages:
            return None
        first = min(launched for launched, _, _, _ in stages)
        last = max(done for _, done, _, _ in stages)
        return JobTimeline(
            seconds=ended - self.started,
            jobs=len({job for _, _, job, _ in stages}),
            tasks=sum(tasks for _, _, _, tasks in stages),
            to_first_task_s=max(0.0, first - self.started),
            after_last_stage_s=max(0.0, ended - last),
            running_s=max(0.0, last - first),
        )


def median_timeline(timelines: list[JobTimeline]) -> dict[str, Any] | None:
    """Each figure's median over several runs (see :meth:`JobTimeline.as_dict`)."""
    if not timelines:
        return None
    rows = [timeline.as_dict() for timeline in timelines]
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def _status_store(spark: SparkSession) -> Any | None:
    try:
        return spark.sparkContext._jsc.sc().statusStore()
    except Exception:  # noqa: BLE001 - an internal API: without it there is no timeline
        return None


def _last_job_id(store: Any) -> int:
    jobs = store.jobsList(None)
    return max((jobs.apply(i).jobId() for i in range(jobs.size())), default=-1)


def _jobs_after(store: Any, before: int) -> list[Any]:
    jobs = store.jobsList(None)
    return [job for job in (jobs.apply(i) for i in range(jobs.size())) if job.jobId() > before]


def _ran_stages(store: Any, job: Any) -> Iterator[Any]:
    """The stages of ``job`` that launched tasks (a skipped stage reused a shuffle)."""
    ids = job.stageIds()
    for k in range(ids.size()):
        stage = store.lastStageAttempt(ids.apply(k))
        if stage.firstTaskLaunchedTime().isDefined():
            yield stage


def _stages_after(store: Any, before: int) -> list[tuple[float, float, int, int]] | None:
    """``(first task launched, completed, job id, tasks)`` per stage run since job ``before``.

    None while a job or one of its stages is not recorded as finished yet.
    """
    stages = []
    for job in _jobs_after(store, before):
        if job.status().toString() == "RUNNING" or not job.completionTime().isDefined():
            return None
        for stage in _ran_stages(store, job):
            if not stage.completionTime().isDefined():
                return None
            stages.append(
                (
                    stage.firstTaskLaunchedTime().get().getTime() / 1000,
                    stage.completionTime().get().getTime() / 1000,
                    job.jobId(),
                    stage.numTasks(),
                )
            )
    return stages
