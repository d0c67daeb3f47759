"""ingest -> train -> score on a real Spark standalone cluster, submitted as a user submits.

Two workers with one core each on 127.0.0.1, so the two Horovod ranks must land on two
executors; the executors (and the driver) run a Python environment that has the stack but
not the project, in folders away from the checkout, so they import the project only from
the archive ``spark-submit --py-files`` ships (built by ``make wheel``). Tracking goes
through a real ``mlflow server`` whose artifact root is under the shared folder. Every
process is stopped when the test ends, pass or fail (see :mod:`tests.cluster.standalone`).

The cluster is secured as the README's "Security" section says: ``spark.authenticate`` with
a secret given to the master, the workers and the submit (each in an owner-only properties
file), RPC and I/O encryption; the MLflow server runs its basic-auth app and the jobs reach
it with credentials from the environment only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.demo import write_demo_digits
from tests.cluster.standalone import (
    REPO,
    SECURED,
    build_project_zip,
    driver_env,
    mlflow_server,
    spark_properties,
    spark_submit,
    stack_without_project,
    standalone_cluster,
)


def test_pipeline_on_a_secured_standalone_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    spark_secret = secrets.token_hex(16)
    user, password = "dlpipe-admin", secrets.token_urlsafe(18)
    secured = {**SECURED, "spark.authenticate.secret": spark_secret}
    shared = tmp_path / "shared"  # what a shared mount is on a real cluster
    shared.mkdir()
    python = stack_without_project(tmp_path / "stack-env")
    probe = subprocess.run(
        [str(python), "-c", "import pipelines"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "No module named 'pipelines'" in probe.stderr, "the executors' env has the project"
    package = build_project_zip(tmp_path / "dist")
    digits = write_demo_digits(shared / "digits").path
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()

    with (
        mlflow_server(
            _folder(tmp_path / "mlflow"), shared / "mlartifacts", admin=(user, password)
        ) as tracking,
        standalone_cluster(
            _folder(tmp_path / "cluster"), python, workers=2, cores=1, properties=secured
        ) as cluster,
    ):
        # Credentials only in the environment: never in the config, a URI or a command line.
        credentials = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)  # this test's own MlflowClient
        env = {**driver_env(), "MLFLOW_TRACKING_URI": tracking, **credentials}
        submit_conf = spark_properties(tmp_path / "submit" / "spark.conf", secured)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1")

        # Without the secret the master refuses the application: Spark's client gives up
        # after its three 20 s registration attempts. Runs meanwhile, beside the real jobs.
        intruder_log = tmp_path / "driver-logs" / "intruder.log"
        intruder_log.parent.mkdir()
        with intruder_log.open("w") as log:
            intruder = subprocess.Popen(
                [*spark_submit(cluster.master_url, package, python, "ingest.py"),
                 "--config", str(REPO / "conf" / "cluster.yaml"),
                 "--set", f"work_dir={shared / 'work'}",
                 "--source", str(digits), "--output", str(shared / "intruded")],
                env=driver_env(), cwd=driver_dir, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

        def submit(job: str, *args: str) -> dict:
            argv = [
                *spark_submit(cluster.master_url, package, python, job, submit_conf),
                "--config", str(REPO / "conf" / "cluster.yaml"),
                "--set", f"work_dir={shared / 'work'}",
                "--set", "train.nics=[lo]",
                "--json", *args,
            ]  # fmt: skip
            done = subprocess.run(
                argv, env=env, cwd=driver_dir, capture_output=True, text=True, timeout=600
            )
            (tmp_path / "driver-logs" / f"{job}.log").write_text(done.stdout + done.stderr)
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

        try:
            intruder.wait(timeout=150)
        finally:
            if intruder.poll() is None:
                os.killpg(intruder.pid, signal.SIGKILL)
        refused = intruder_log.read_text()
        assert intruder.returncode != 0, refused[-3000:]
        assert "All masters are unresponsive! Giving up." in refused, refused[-3000:]
        assert "Expected SaslMessage" in cluster.processes.log("master")  # the master said why
        assert not (shared / "intruded").exists()
        final = client.get_run(run.info.run_id)
        params_and_tags = json.dumps([final.data.params, final.data.tags])

    # Nothing the test produced holds the MLflow password: no log (driver, intruder,
    # master, workers, executors, MLflow server), store, table, artifact or params and tags;
    # the Spark secret is only in the two owner-only properties files that carry it.
    assert password not in params_and_tags
    assert _files_holding(tmp_path, password) == []
    assert _files_holding(tmp_path, spark_secret) == sorted(
        [str(tmp_path / "cluster" / "conf" / "spark-defaults.conf"), str(submit_conf)]
    )
    assert list((tmp_path / "cluster").glob("worker-*/app-*/*/stderr")), "no executor logs"


def _files_holding(root: Path, text: str) -> list[str]:
    """Every regular file under ``root`` whose bytes contain ``text`` (links not followed)."""
    needle = text.encode()
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle in path.read_bytes():
                found.append(str(path))
    return sorted(found)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_more_ranks_than_cluster_slots_fails_in_bounded_time(tmp_path: Path) -> None:
    # One 1-core worker, two ranks: Horovod alone would wait for the second task until its
    # start timeout (10 minutes); the slot check ends it after train.slots_timeout_s.
    python = stack_without_project(tmp_path / "stack-env")
    package = build_project_zip(tmp_path / "dist")
    with standalone_cluster(_folder(tmp_path / "cluster"), python, workers=1) as cluster:
        done = subprocess.run(
            [*spark_submit(cluster.master_url, package, python, "train.py"),
             "--config", "cluster", "--set", f"work_dir={tmp_path / 'work'}",
             "--set", "train.num_proc=2", "--set", "train.slots_timeout_s=5"],
            env=driver_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    # spark-submit passes the Python driver's stderr on through its stdout.
    output = (done.stdout + done.stderr).splitlines()
    errors = [line for line in output if line.startswith("dlpipe train:")]
    assert done.returncode == 1 and errors == [
        "dlpipe train: error: train.num_proc=2 needs 2 concurrent Spark task slots, but the "
        "executors offer 1 after 5 s (train.slots_timeout_s); lower train.num_proc, or add "
        "executors or cores"
    ], done.stdout[-3000:]
