"""The executor preflight on a real local Spark: every Python worker's stack, before a stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from pipelines import preflight


def test_every_executor_python_worker_reports_the_pinned_stack(spark):
    environments = preflight.executor_environments(spark)

    assert 1 <= len(environments) <= spark.sparkContext.defaultParallelism
    assert all(env.pid != os.getpid() for env in environments)  # the workers, not the driver
    assert preflight.executor_problems(environments) == []
    for env in environments:
        assert all(finding.ok for finding in preflight.check(env))
        assert env.horovod.probe == "files"  # no TensorFlow import in the workers


def test_the_executor_check_runs_once_per_session(spark, monkeypatch):
    monkeypatch.setattr(preflight, "_sessions_checked", set())
    jobs = spark.sparkContext.statusTracker()

    before = len(jobs.getJobIdsForGroup(None))
    preflight.check_executors(spark)
    after_first = len(jobs.getJobIdsForGroup(None))
    preflight.check_executors(spark)

    assert after_first == before + 1  # one tiny job
    assert len(jobs.getJobIdsForGroup(None)) == after_first


def test_ingest_stops_before_its_first_job_when_the_executors_have_keras_3(tmp_path, dlpipe_env):
    # Only the executors' Python workers see a keras-3.3.3 distribution ahead of the real one.
    site = tmp_path / "executor-site"
    info = site / "keras-3.3.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: keras\nVersion: 3.3.3\n")
    source = tmp_path / "images" / "seven"
    source.mkdir(parents=True)
    Image.new("L", (8, 8), 7).save(source / "a.png")
    output = tmp_path / "prepared"
    spark_conf = {"spark.ui.enabled": "false", "spark.executorEnv.PYTHONPATH": str(site)}

    done = subprocess.run(
        [
            sys.executable, "-m", "pipelines.cli", "ingest",
            "--source", str(source.parent), "--output", str(output),
            "--set", f"work_dir={tmp_path / 'work'}",
            "--set", f"spark.conf={json.dumps(spark_conf)}",
        ],
        env=dlpipe_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dlpipe ingest: error: executor ")
    assert f"({sys.executable}): keras: found 3.3.3, need >=2.15,<3: " in last
    assert not output.exists()
