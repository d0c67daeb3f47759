"""A lost host, for real: a whole standalone worker SIGKILLed in the middle of each job.

One master and two one-core workers on 127.0.0.1, started once for the module; each test
kills one worker whole (its JVM, its executor, every Python process and Horovod rank under
it: :meth:`~tests.cluster.standalone.Cluster.kill_worker`) while a job runs, and the next
test starts it again. Jobs are submitted as a user submits them (``spark-submit`` of
``jobs/*.py``) with task retries (``spark.task.maxFailures``), so Spark reruns what the
dead worker ran on the worker left.

A kill lands mid-job by construction, not by timing. Ingest and scoring read a source that
holds a named pipe with an image name (a :class:`Gate`): the task that reaches it blocks
until the test opens the pipe for writing; the test then knows which worker runs that task,
kills that worker, and feeds the gate a real PNG when the retried task opens it again.
Training is killed once rank 0 has committed its first epoch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pipelines.demo import write_demo_digits
from tests.cluster.standalone import (
    REPO,
    Cluster,
    build_project_zip,
    driver_env,
    spark_submit,
    stack_without_project,
    standalone_cluster,
)

RANK_MODULE = "horovod.spark.task.gloo_exec_fn"
#: Small and quick training: about a second an epoch on the two one-core workers.
TRAINING = (
    "train.model=mlp", "train.hidden_units=32", "train.batch_size=32",
    "train.early_stopping_patience=0", "train.num_proc=2", "train.nics=[lo]",
    "train.augment_shift=0.0", "train.augment_rotation_deg=0.0",
)  # fmt: skip
#: How long a rank waits for a silent peer, and elastic training for enough ranks.
RANK_TIMEOUT_S = 20


@dataclass(frozen=True)
class Job:
    """A running ``spark-submit``, its output going to ``log``."""

    process: subprocess.Popen
    log: Path

    def running(self) -> bool:
        """Whether the submit has not ended yet."""
        return self.process.poll() is None

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the submit (killed if it overruns): its exit code and output."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.running():
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        return self.process.returncode, self.log.read_text(errors="replace")


@dataclass(frozen=True)
class Site:
    """The module's cluster, what it submits, and the shared folder its jobs use."""

    cluster: Cluster
    python: Path
    package: Path
    shared: Path
    logs: Path

    def submit(self, job: str, *args: str, sets: tuple[str, ...] = ()) -> Job:
        """Start ``spark-submit jobs/JOB ARGS``, with task retries, after reviving workers."""
        self.cluster.revive()
        log = self.logs / f"{job}-{len(list(self.logs.glob(f'{job}-*')))}.log"
        flags = [arg for item in sets for arg in ("--set", item)]
        # spark-submit's own options go before the job's path; after it they are the job's.
        *submit, script = spark_submit(self.cluster.master_url, self.package, self.python, job)
        with log.open("w") as out:
            process = subprocess.Popen(
                [*submit, "--conf", "spark.task.maxFailures=4", script,
                 "--config", str(REPO / "conf" / "cluster.yaml"),
                 "--set", f"work_dir={self.shared / 'work'}", "--json", *args, *flags],
                env=driver_env(), cwd=self.logs, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return Job(process, log)


class Gate:
    """A named pipe with an image name: whoever reads it waits until the test feeds it.

    Args:
        path: Where to make it (in a source folder).
        content: The image bytes it gives a reader the test lets through.
    """

    def __init__(self, path: Path, content: bytes) -> None:
        os.mkfifo(path)
        self.path = path
        self.content = content

    def wait_for_reader(self, job: Job, timeout: float = 240) -> int:
        """Block until a task opens the gate; the test's open write end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job.running():
            try:
                return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                    raise
            time.sleep(0.05)
        pytest.fail(f"no task opened {self.path} (job running: {job.running()})")

    def readers(self) -> list[psutil.Process]:
        """The processes (other than this one) that have the gate open."""
        found = []
        for pid in psutil.pids():
            if pid == os.getpid():
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(self.path) for fd in fds):
                    found.append(psutil.Process(pid))
            except (OSError, psutil.Error):
                continue
        return found

    def feed(self, job: Job, end: int, timeout: float = 240) -> None:
        """Once a new reader has the gate open, give it the image through ``end`` and close.

        The write end stays open from the first reader on: a retried task that opens the
        gate meanwhile must wait for the image, not read an early end of file.
        """
        deadline = time.monotonic() + timeout
        while not self.readers():
            if time.monotonic() > deadline or not job.running():
                pytest.fail(f"no task opened {self.path} again (job running: {job.running()})")
            time.sleep(0.05)
        os.set_blocking(end, True)
        os.write(end, self.content)
        os.close(end)


def kill_the_reader(cluster: Cluster, gate: Gate, job: Job) -> tuple[int, int]:
    """Kill the worker whose task is reading ``gate``: its index, and the gate's write end."""
    end = gate.wait_for_reader(job)
    (reader,) = gate.readers()
    index = cluster.worker_of(reader)
    assert reader.pid in cluster.kill_worker(index)
    return index, end


def rank_process(cluster: Cluster, rank: int) -> psutil.Process:
    """Horovod's process of ``rank`` (HOROVOD_RANK of its environment) on ``cluster``."""
    for process in psutil.process_iter():
        try:
            if (
                RANK_MODULE in process.cmdline()
                and process.environ().get("HOROVOD_RANK") == str(rank)
                and Path(process.cwd()).resolve().is_relative_to(cluster.root.resolve())
            ):
                return process
        except psutil.Error:
            continue
    pytest.fail(f"no process of rank {rank}")


def wait_for_epoch(out: Path, epoch: int, job: Job, timeout: float = 240) -> None:
    """Wait until rank 0 has committed ``epoch`` in the last run's folder under ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.running():
        try:
            run_id = json.loads((out / "run.json").read_text())["run_id"]  # the last run
            if json.loads((out / run_id / "checkpoint.json").read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of epoch {epoch} in {out}:\n{job.log.read_text()[-3000:]}")


def paths_in(files: list[Path]) -> list[str]:
    """The ``path`` column of Parquet files, every row."""
    import pyarrow.parquet as pq

    return [
        path for file in files for path in pq.read_table(file, columns=["path"])["path"].to_pylist()
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The environment without the project, the project's zip, and the running cluster."""
    root = tmp_path_factory.mktemp("lost-host")
    python = stack_without_project(root / "stack-env")
    package = build_project_zip(root / "dist")
    logs = root / "driver-logs"
    logs.mkdir()
    with standalone_cluster(root / "cluster", python, workers=2, cores=1) as cluster:
        yield Site(cluster, python, package, root / "shared", logs)


@dataclass(frozen=True)
class Outcome:
    """What a job that lost a worker did."""

    code: int
    output: str
    killed: int  # the worker killed
    result: dict


def _outcome(job: Job, killed: int, timeout: float = 300) -> Outcome:
    code, output = job.finish(timeout)
    lines = output.strip().splitlines()
    result = json.loads(lines[-1]) if code == 0 and lines else {}
    return Outcome(code, output, killed, result)


@pytest.fixture(scope="module")
def ingested(site: Site) -> tuple[Outcome, Path, Path]:
    """The digits and a gate ingested while the worker decoding the gate was killed."""
    digits = write_demo_digits(site.shared / "digits").path
    gate = Gate(digits / "0" / "gate.png", next((digits / "0").glob("*.png")).read_bytes())
    prepared = site.shared / "prepared"
    job = site.submit(
        "ingest.py", "--source", str(digits), "--output", str(prepared), "--image-size", "16"
    )
    killed, end = kill_the_reader(site.cluster, gate, job)
    gate.feed(job, end)
    return _outcome(job, killed), prepared, gate.path


@pytest.fixture(scope="module")
def elastic(site: Site, ingested: tuple[Outcome, Path, Path]) -> Outcome:
    """Elastic training of two ranks whose rank 1's worker was killed after epoch 1."""
    _, prepared, _ = ingested
    job = site.submit(
        "train.py", "--dataset", str(prepared),
        sets=(*TRAINING, "train.epochs=5", "train.elastic=true", "train.min_num_proc=1",
              f"train.rank_timeout_s={RANK_TIMEOUT_S}"),
    )  # fmt: skip
    wait_for_epoch(site.shared / "work" / "training" / "digits-classifier", 1, job)
    killed = site.cluster.worker_of(rank_process(site.cluster, 1))
    site.cluster.kill_worker(killed)
    return _outcome(job, killed, timeout=400)


def test_ingest_that_loses_a_worker_writes_every_image_once(site, ingested):
    outcome, prepared, gate = ingested
    assert outcome.code == 0, outcome.output[-4000:]
    assert "Lost executor" in outcome.output  # the gate's task died with its worker
    images = 1797 + 1
    assert outcome.result["files_seen"] == outcome.result["ingested"] == images
    assert outcome.result["quarantined"] == 0
    paths = paths_in(sorted(prepared.glob("split=*/*.parquet")))
    assert len(paths) == len(set(paths)) == images
    assert paths.count(str(gate)) == 1


def test_elastic_training_that_loses_a_worker_finishes_on_the_other(site, elastic):
    from mlflow import MlflowClient

    assert elastic.code == 0, elastic.output[-4000:]
    assert elastic.result["epochs"] == 5 and elastic.result["model_version"] == "1"
    client = MlflowClient(tracking_uri=elastic.result["tracking_uri"])
    run = client.get_run(elastic.result["run_id"])
    assert run.info.status == "FINISHED"
    changes = json.loads(run.data.tags["world_size_changes"])
    assert changes and changes[0]["size"] == 1 and changes[0]["epoch"] >= 1, changes
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert steps == list(range(5))


def test_scoring_that_loses_a_worker_scores_every_image_once(site, ingested, elastic):
    assert elastic.code == 0, "needs the model the elastic training registered"
    _, _, first_gate = ingested
    batch = site.shared / "incoming"
    batch.mkdir()
    for png in sorted((first_gate.parent.parent / "7").glob("*.png"))[:60]:
        shutil.copy(png, batch)
    gate = Gate(batch / "gate.png", (batch / sorted(os.listdir(batch))[0]).read_bytes())
    job = site.submit("score.py", "--source", str(batch))
    killed, end = kill_the_reader(site.cluster, gate, job)
    gate.feed(job, end)
    outcome = _outcome(job, killed)
    assert outcome.code == 0, outcome.output[-4000:]
    assert "Lost executor" in outcome.output
    assert outcome.result["rows"] == outcome.result["scored"] == 61
    table = Path(outcome.result["table"]) / f"batch_id={outcome.result['batch_id']}"
    paths = paths_in(sorted(table.glob("*.parquet")))
    assert len(paths) == len(set(paths)) == 61 and str(gate.path) in paths


def test_training_that_loses_a_worker_fails_in_bounded_time_with_one_line(site, ingested):
    _, prepared, _ = ingested
    job = site.submit(
        "train.py", "--dataset", str(prepared),
        sets=(*TRAINING, "train.epochs=40", f"train.rank_timeout_s={RANK_TIMEOUT_S}",
              "mlflow.model_name=digits-static"),  # checkpoints of its own
    )  # fmt: skip
    wait_for_epoch(site.shared / "work" / "training" / "digits-static", 1, job)
    rank = rank_process(site.cluster, 1)
    site.cluster.kill_worker(site.cluster.worker_of(rank))
    killed_at = time.monotonic()
    code, output = job.finish(timeout=300)
    took = time.monotonic() - killed_at
    errors = [line for line in output.splitlines() if line.startswith("dlpipe train:")]
    assert code == 1, output[-4000:]
    # Horovod blames rank 1 (no exit code: its task went with the worker) or rank 0, which
    # failed when its peer vanished; either way the line names the rank that was killed.
    assert len(errors) == 1, output[-4000:]
    assert f"error: rank 1 (pid {rank.pid} on host " in errors[0], errors[0]
    assert "`dlpipe train --resume`" in errors[0] and "train.elastic=true" in errors[0]
    assert 'pipelines/cli.py", line' not in output  # no traceback of the driver's
    assert "Py4JJavaError" not in output  # nor of Horovod's Spark thread
    assert took < RANK_TIMEOUT_S + 60, f"{took:.0f} s after the kill"
