"""The session builder's local defaults and the driver-table helper, on a real local Spark."""

from __future__ import annotations

import signal

import pandas as pd
import pytest

from pipelines.errors import UserError
from pipelines.spark import driver_table, session_of, start_in_background

ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"


def test_a_local_master_runs_the_jvm_with_the_c1_compiler_only(spark):
    runtime = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    assert "-XX:TieredStopAtLevel=1" in list(runtime.getInputArguments())


@pytest.mark.parametrize(("rows", "tasks"), [(10, 1), (10, 2), (5000, 2), (9, 3), (10, 4)])
def test_driver_table_spreads_rows_evenly_whatever_the_job_batch_size(spark, rows, tasks):
    spark.conf.set(ARROW_BATCH, "10000")  # one batch would leave a task slot idle
    frame = driver_table(spark, pd.DataFrame({"n": range(rows)}), "n long", tasks)
    sizes = frame.rdd.glom().map(len).collect()

    assert len(sizes) == tasks and sum(sizes) == rows
    assert max(sizes) - min(sizes) <= (1 if tasks <= 2 else rows // 2)
    assert sorted(row.n for row in frame.collect()) == list(range(rows))
    assert spark.conf.get(ARROW_BATCH) == "10000"  # the job's own batches are untouched


def test_a_session_started_in_the_background_is_the_session_and_ctrl_c_cancels_its_jobs(spark):
    started = start_in_background(lambda: spark)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert session_of(started) is spark
        handler = signal.getsignal(signal.SIGINT)
        assert handler is not signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # what Ctrl-C calls: cancel the jobs, then stop
        assert session_of(spark) is spark  # a session passes through as it is
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_background_start_that_failed_raises_where_the_session_is_needed():
    def fail() -> None:
        raise UserError("spark.master=nowhere is no master URL")

    started = start_in_background(fail)
    with pytest.raises(UserError, match="no master URL"):
        session_of(started)
