"""ingest -> train -> score on a real Spark standalone cluster, submitted as a user submits.

Two workers with one core each on 127.0.0.1, so the two Horovod ranks must land on two
executors; the executors (and the driver) run a Python environment that has the stack but
not the project, in folders away from the checkout, so they import the project only from
the archive ``spark-submit --py-files`` ships (built by ``make wheel``). Tracking goes
through a real ``mlflow server`` whose artifact root is under the shared folder. Every
process is stopped when the test ends, pass or fail (see :mod:`tests.cluster.standalone`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from pipelines.demo import write_demo_digits
from tests.cluster.standalone import (
    mlflow_server,
    spark_home,
    stack_without_project,
    standalone_cluster,
)

REPO = Path(__file__).resolve().parents[2]


def _build_zip(dist: Path) -> Path:
    subprocess.run(
        # -o: a venv older than pyproject.toml is not rebuilt from inside a test.
        ["make", "-s", "-o", ".venv/.ready", "wheel", f"DIST={dist}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (archive,) = dist.glob("spark_dl_pipelines-*.zip")
    return archive


def test_pipeline_on_a_standalone_cluster(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    shared = tmp_path / "shared"  # what a shared mount is on a real cluster
    shared.mkdir()
    python = stack_without_project(tmp_path / "stack-env")
    probe = subprocess.run(
        [str(python), "-c", "import pipelines"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "No module named 'pipelines'" in probe.stderr, "the executors' env has the project"
    package = _build_zip(tmp_path / "dist")
    digits = write_demo_digits(shared / "digits").path
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()

    with (
        mlflow_server(_folder(tmp_path / "mlflow"), shared / "mlartifacts") as tracking,
        standalone_cluster(_folder(tmp_path / "cluster"), python, workers=2, cores=1) as cluster,
    ):
        env = {**_driver_env(), "MLFLOW_TRACKING_URI": tracking}

        def submit(job: str, *args: str) -> dict:
            argv = [
                *_spark_submit(cluster.master_url, package, python, job),
                "--conf", str(REPO / "conf" / "cluster.yaml"),
                "--set", f"work_dir={shared / 'work'}",
                "--set", "train.nics=[lo]",
                "--json", *args,
            ]  # fmt: skip
            done = subprocess.run(
                argv, env=env, cwd=driver_dir, capture_output=True, text=True, timeout=600
            )
            # spark-submit passes the Python driver's stderr on through its stdout.
            assert done.returncode == 0, f"{job} failed:\n{done.stdout[-4000:]}"
            return json.loads(done.stdout.strip().splitlines()[-1])

        prepared = shared / "prepared"
        ingested = submit(
            "ingest.py", "--source", str(digits), "--output", str(prepared),
            "--image-size", "16",
        )  # fmt: skip
        assert ingested["files_seen"] == ingested["ingested"] == 1797
        assert ingested["quarantined"] == ingested["skipped"] == 0
        assert sum(ingested["splits"].values()) == 1797
        manifest = json.loads((prepared / "_manifest.json").read_text())
        assert manifest["image_shape"] == [16, 16, 1]

        trained = submit(
            "train.py", "--dataset", str(prepared),
            "--set", "train.model=mlp", "--set", "train.hidden_units=32",
            "--set", "train.epochs=2", "--set", "train.early_stopping_patience=0",
        )  # fmt: skip
        assert trained["world_size"] == 2 and trained["epochs"] == 2
        assert trained["tracking_uri"] == tracking
        assert trained["model_version"] == "1" and trained["promoted"]

        client = MlflowClient(tracking_uri=tracking)
        run = client.get_run(trained["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["world_size"] == "2"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
        # The ranks ran on two executors, each of its own worker, and ended level.
        placement = json.loads(run.data.tags["rank_placement"])
        executors = {Path(p["executor_dir"]).resolve() for p in placement.values()}
        assert len(placement) == 2 and len(executors) == 2, placement
        workers = {d.relative_to(tmp_path / "cluster").parts[0] for d in executors}
        assert workers == {"worker-0", "worker-1"}, placement
        digests = json.loads(run.data.tags["rank_weights_sha256"])
        assert len(digests) == 2 and len(set(digests.values())) == 1
        # What the driver logged went through the server into the shared artifact root.
        version = client.get_model_version(trained["model_name"], "1")
        assert version.run_id == run.info.run_id
        assert any((shared / "mlartifacts").rglob("MLmodel"))
        assert "model_summary.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}

        batch = digits / "3"
        scored = submit("score.py", "--source", str(batch))
        images = len(list(batch.glob("*.png")))
        assert scored["rows"] == scored["scored"] == images and scored["errors"] == 0
        # The batch is the run's UTC date-time: a night of its own.
        assert scored["model_version"] == "1" and re.fullmatch(r"\d{8}T\d{6}Z", scored["batch_id"])
        table = Path(scored["table"])
        partition = table / f"batch_id={scored['batch_id']}"
        assert table.is_relative_to(shared) and partition.is_dir()
        import pyarrow.parquet as pq

        rows = pq.read_table(partition)
        assert rows.num_rows == images
        assert set(rows.column("predicted_label").to_pylist()) <= set(manifest["label_names"])


def _driver_env() -> dict[str, str]:
    """The submitting shell's environment: Spark's home, loopback only, no tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYSPARK"))}
    env.pop("PYTHONPATH", None)
    return {**env, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1"}


def _spark_submit(master: str, package: Path, python: Path, job: str) -> list[str]:
    """spark-submit of ``jobs/JOB`` shipping the project zip, driver bound to loopback."""
    return [
        str(spark_home() / "bin" / "spark-submit"),
        "--master", master,
        "--py-files", str(package),
        "--conf", f"spark.pyspark.python={python}",
        "--conf", "spark.driver.host=127.0.0.1",
        "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
        str(REPO / "jobs" / job),
    ]  # fmt: skip


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_more_ranks_than_cluster_slots_fails_in_bounded_time(tmp_path: Path) -> None:
    # One 1-core worker, two ranks: Horovod alone would wait for the second task until its
    # start timeout (10 minutes); the slot check ends it after train.slots_timeout_s.
    python = stack_without_project(tmp_path / "stack-env")
    package = _build_zip(tmp_path / "dist")
    with standalone_cluster(_folder(tmp_path / "cluster"), python, workers=1) as cluster:
        done = subprocess.run(
            [*_spark_submit(cluster.master_url, package, python, "train.py"),
             "--conf", "cluster", "--set", f"work_dir={tmp_path / 'work'}",
             "--set", "train.num_proc=2", "--set", "train.slots_timeout_s=5"],
            env=_driver_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    # spark-submit passes the Python driver's stderr on through its stdout.
    output = (done.stdout + done.stderr).splitlines()
    errors = [line for line in output if line.startswith("dlpipe train:")]
    assert done.returncode == 1 and errors == [
        "dlpipe train: error: train.num_proc=2 needs 2 concurrent Spark task slots, but the "
        "executors offer 1 after 5 s (train.slots_timeout_s); lower train.num_proc, or add "
        "executors or cores"
    ], done.stdout[-3000:]
