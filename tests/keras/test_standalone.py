"""ingest -> train -> score on a real Spark 4 standalone cluster with the Keras stack.

The Keras-stack twin of ``tests/cluster/test_standalone.py`` (whose cluster helpers it uses):
a master and two one-core workers on 127.0.0.1, jobs submitted with ``spark-submit
--py-files`` of the project zip, executors whose Python has the stack but not the project.
Training runs the keras launcher (``train.launcher: horovod``, the shipped default, means
``keras`` on this stack): two Keras 3/JAX ranks as barrier tasks, which must land on the two
executors and finish with identical weights.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines.demo import write_demo_digits
from tests.cluster.standalone import (
    REPO,
    build_project_zip,
    driver_env,
    spark_submit,
    stack_without_project,
    standalone_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a standalone cluster


def test_keras_pipeline_on_a_standalone_cluster(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    shared = tmp_path / "shared"  # what a shared mount is on a real cluster
    shared.mkdir()
    python = stack_without_project(tmp_path / "stack-env")
    probe = subprocess.run(
        [str(python), "-c", "import pipelines"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "No module named 'pipelines'" in probe.stderr, "the executors' env has the project"
    package = build_project_zip(tmp_path / "dist", stack="keras")
    digits = write_demo_digits(shared / "digits").path
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    tracking = f"sqlite:///{shared / 'mlflow.db'}"
    env = {**driver_env(), "MLFLOW_TRACKING_URI": tracking, "KERAS_BACKEND": "jax"}

    (tmp_path / "cluster").mkdir()
    with standalone_cluster(tmp_path / "cluster", python, workers=2, cores=1) as cluster:

        def submit(job: str, *args: str) -> dict:
            argv = [
                *spark_submit(cluster.master_url, package, python, job),
                "--config", str(REPO / "conf" / "cluster.yaml"),
                "--set", f"work_dir={shared / 'work'}",
                "--json", *args,
            ]  # fmt: skip
            done = subprocess.run(
                argv, env=env, cwd=driver_dir, capture_output=True, text=True, timeout=600
            )
            (tmp_path / f"{job}.log").write_text(done.stdout + done.stderr)
            # spark-submit passes the Python driver's stderr on through its stdout.
            assert done.returncode == 0, f"{job} failed:\n{done.stdout[-4000:]}"
            return json.loads(done.stdout.strip().splitlines()[-1])

        prepared = shared / "prepared"
        ingested = submit(
            "ingest.py", "--source", str(digits), "--output", str(prepared),
            "--image-size", "16",
        )  # fmt: skip
        assert ingested["ingested"] == 1797 and ingested["quarantined"] == 0

        trained = submit(
            "train.py", "--dataset", str(prepared),
            "--set", "train.model=mlp", "--set", "train.hidden_units=32",
            "--set", "train.epochs=2", "--set", "train.early_stopping_patience=0",
        )  # fmt: skip
        assert trained["world_size"] == 2 and trained["epochs"] == 2
        assert trained["model_version"] == "1" and trained["promoted"]

        batch = digits / "3"
        scored = submit("score.py", "--source", str(batch))
        assert scored["scored"] == len(list(batch.glob("*.png"))) and scored["errors"] == 0

    run = MlflowClient(tracking_uri=tracking).get_run(trained["run_id"])
    assert run.data.tags["launcher"] == "keras" and run.data.tags["dlpipe.stack"] == "keras"
    # The ranks ran on two executors, each of its own worker, and ended level.
    placement = json.loads(run.data.tags["rank_placement"])
    executors = {Path(p["executor_dir"]).resolve() for p in placement.values()}
    assert len(placement) == 2 and len(executors) == 2, placement
    workers = {d.relative_to(tmp_path / "cluster").parts[0] for d in executors}
    assert workers == {"worker-0", "worker-1"}, placement
    digests = json.loads(run.data.tags["rank_weights_sha256"])
    assert len(digests) == 2 and len(set(digests.values())) == 1
