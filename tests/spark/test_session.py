"""The session builder's local defaults and the driver-table helper, on a real local Spark."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.spark import driver_table

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
