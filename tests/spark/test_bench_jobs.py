"""The fixed cost of Spark jobs, read from a real session's status store (UI off)."""

from __future__ import annotations

import time

import pytest

from pipelines.bench.jobs import JobMark, median_timeline


def _slow_task(rows):
    time.sleep(0.2)
    yield sum(1 for _ in rows)


def test_the_timeline_splits_driver_time_before_and_after_the_tasks(spark):
    mark = JobMark(spark)
    time.sleep(0.3)  # the driver "plans"
    counted = spark.sparkContext.parallelize(range(40), 4).mapPartitions(_slow_task).collect()
    time.sleep(0.2)  # the driver "commits"
    timeline = mark.timeline()

    assert sum(counted) == 40
    assert timeline is not None
    assert (timeline.jobs, timeline.tasks) == (1, 4)
    assert timeline.to_first_task_s >= 0.3
    assert timeline.after_last_stage_s >= 0.2
    assert timeline.running_s >= 0.2  # two waves of 0.2 s tasks on 2 slots: >= 0.4 really
    parts = timeline.to_first_task_s + timeline.running_s + timeline.after_last_stage_s
    assert parts == pytest.approx(timeline.seconds, abs=0.05)
    assert timeline.fixed_s == pytest.approx(timeline.to_first_task_s + timeline.after_last_stage_s)


def test_only_the_jobs_after_the_mark_count_and_none_is_no_timeline(spark):
    spark.sparkContext.parallelize(range(4), 2).count()
    assert JobMark(spark).timeline() is None  # no job since the mark
    mark = JobMark(spark)
    spark.sparkContext.parallelize(range(4), 2).count()
    spark.sparkContext.parallelize(range(6), 3).count()
    timeline = mark.timeline()
    assert timeline is not None
    assert (timeline.jobs, timeline.tasks) == (2, 5)


def test_medians_of_several_timelines(spark):
    timelines = []
    for _ in range(3):
        mark = JobMark(spark)
        spark.sparkContext.parallelize(range(4), 2).count()
        timelines.append(mark.timeline())
    summary = median_timeline(timelines)
    assert summary is not None
    assert summary["jobs"] == 1 and summary["tasks"] == 2
    assert 0 <= summary["fixed_share"] <= 1
    assert median_timeline([]) is None
