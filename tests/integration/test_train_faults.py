"""Training faults with real processes and real signals (issue 12, items 6-8).

Real Horovod ranks over Gloo on local Spark, a real MLflow sqlite store, SIGKILL sent to the
real rank process or to the real ``dlpipe train`` process group. Epochs are short, so every
kill waits for the checkpoint rank 0 writes after an epoch instead of sleeping blindly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipelines.store import Store
from pipelines.train.driver import RankDiedError, train
from pipelines.train.horovod_launcher import HorovodSparkLauncher

RANK_MODULE = "horovod.spark.task.gloo_exec_fn"


def _cli_args(dataset: Path, sets: list[str], *extra: str) -> list[str]:
    flags = [arg for item in sets for arg in ("--set", item)]
    command = [sys.executable, "-m", "pipelines.cli", "train", "--json"]
    return [*command, "--dataset", str(dataset), *flags, *extra]


def _epoch(out: Path) -> int:
    """The epoch rank 0 last checkpointed in the model's last run (``out``: its runs)."""
    try:
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        return json.loads((out / run_id / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_epoch(out: Path, epoch: int, alive: Any = None, timeout: float = 240) -> int:
    """Wait until rank 0 has checkpointed ``epoch``; fail early if ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _epoch(out)
        if done >= epoch:
            return done
        if alive is not None and not alive():
            pytest.fail(f"training ended before epoch {epoch} was checkpointed")
        time.sleep(0.02)
    pytest.fail(f"no checkpoint of epoch {epoch} in {out} after {timeout} s")


def _rank_processes(root: int) -> dict[int, psutil.Process]:
    """Horovod's rank processes under ``root``, by rank (HOROVOD_RANK of their environment)."""
    ranks = {}
    for process in psutil.Process(root).children(recursive=True):
        try:
            if RANK_MODULE in process.cmdline() and "HOROVOD_RANK" in process.environ():
                ranks[int(process.environ()["HOROVOD_RANK"])] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def _left(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after waiting up to ``timeout`` for them to go."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _mlflow(tmp_path: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")


def test_killed_job_resumes_the_same_run_to_the_configured_epochs(
    digits, tmp_path, dlpipe_env, started, small_config
):
    epochs = 8
    sets = small_config.sets(f"train.epochs={epochs}")
    out = tmp_path / "work" / "training" / "digits-classifier"
    log = (tmp_path / "killed.log").open("w")
    job = subprocess.Popen(
        _cli_args(digits, sets),
        env=dlpipe_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    started.append(job)
    _wait_for_epoch(out, 2, alive=lambda: job.poll() is None)
    family = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
    assert _rank_processes(job.pid), "no Horovod rank was running"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: driver, JVM, Python workers, ranks
    job.wait(timeout=30)
    assert _left(family, timeout=60) == [], "processes of the killed job were left behind"
    killed_at = _epoch(out)
    assert 2 <= killed_at < epochs

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    client = _mlflow(tmp_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could end it
    # Rank 0 logged the epochs as they ended (the last one maybe not: killed in between).
    live = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert live == list(range(len(live))) and killed_at - 1 <= len(live) <= killed_at

    resumed = subprocess.run(
        _cli_args(digits, sets, "--resume"),
        env=dlpipe_env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["epochs"] == epochs

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in ("loss", "val_loss", "accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert steps == list(range(epochs)), metric  # every epoch once
    # The dead run was first marked FAILED (with the reason), then reopened from its epoch.
    (resume,) = json.loads(run.data.tags["resumes"])
    assert resume["epoch"] == killed_at and resume["status"] == "FAILED"
    assert resume["error"].startswith("stale: its process (pid ")
    assert "error" not in run.data.tags
    assert result["model_version"] == "1"


def test_a_dead_running_run_is_marked_failed_by_the_next_train(
    digits, tmp_path, monkeypatch, dlpipe_env, started, small_config
):
    """A ``dlpipe train`` SIGKILLed mid-training: the next ``train`` marks its run FAILED."""
    sets = small_config.sets("train.launcher=local", "train.epochs=200")
    out = tmp_path / "work" / "training" / "digits-classifier"
    job = subprocess.Popen(
        _cli_args(digits, sets),
        env=dlpipe_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started.append(job)
    _wait_for_epoch(out, 1, alive=lambda: job.poll() is None)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    dead = json.loads((out / "run.json").read_text())["run_id"]
    client = _mlflow(tmp_path)
    assert client.get_run(dead).info.status == "RUNNING"

    config = small_config("train.launcher=local", "train.epochs=1")
    result = train(config, _local(), digits)
    stale = client.get_run(dead)
    assert stale.info.status == "FAILED"
    assert f"pid {job.pid} on host" in stale.data.tags["error"]
    assert client.get_run(result.run_id).info.status == "FINISHED"


def _local() -> Any:
    from pipelines.train.launchers import LocalLauncher

    return LocalLauncher()


# Horovod's thread collecting the Spark job re-raises the job's cancellation, by design.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_rank_ends_the_job_with_a_one_line_error(
    spark, digits, tmp_path, monkeypatch, small_config
):
    timeout_s = 20
    config = small_config("train.epochs=40", f"train.rank_timeout_s={timeout_s}")
    out = Store.of(config).training(config.mlflow.model_name)
    seen: dict[str, Any] = {}

    def kill_rank_1() -> None:
        _wait_for_epoch(out, 1)
        ranks = _rank_processes(os.getpid())
        seen["ranks"] = [p.pid for p in ranks.values()]
        seen["killed"] = ranks[1].pid
        seen["at"] = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    with pytest.raises(RankDiedError) as caught:
        train(config, HorovodSparkLauncher(spark, 2), digits)
    ended = time.monotonic()
    killer.join(timeout=5)
    assert "killed" in seen, "the rank was not killed"
    assert ended - seen["at"] < timeout_s + 30  # bounded, not a hang

    message = str(caught.value)
    assert "\n" not in message
    assert f"rank 1 (pid {seen['killed']} on host " in message
    assert "`dlpipe train --resume`" in message and "train.elastic=true" in message

    import mlflow

    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=[config.mlflow.experiment], output_format="list")
    assert run.info.status == "FAILED" and "rank 1 (pid" in run.data.tags["error"]
    assert _left(seen["ranks"], timeout=30) == [], "rank processes were left behind"
    assert _rank_processes(os.getpid()) == {}


def test_the_checkpoint_state_only_ever_names_a_complete_model_of_its_epoch(
    digits, tmp_path, monkeypatch, small_config
):
    from pipelines.train.checkpoint import read_checkpoint

    config = small_config("train.launcher=local", "train.epochs=2")
    train(config, _local(), digits)
    run_dir = Store.of(config).last_run_dir(config.mlflow.model_name)
    out = run_dir.path
    state = read_checkpoint(run_dir)
    assert state.epoch == 2 and state.model == "checkpoint-0002.h5"
    assert sorted(p.name for p in out.glob("checkpoint*.h5")) == ["checkpoint-0002.h5"]
    # Killed while the next epoch's model was being written, before the state moved on:
    # the committed epoch and its own model are still what --resume reads.
    (out / "checkpoint-0003.h5").write_bytes(b"half a model")
    assert read_checkpoint(run_dir).epoch == 2
    # A model that is not the one the state recorded is no checkpoint, never a wrong one.
    with (out / "checkpoint-0002.h5").open("r+b") as model:
        model.seek(2048)
        model.write(b"\0" * 16)
    assert read_checkpoint(run_dir) is None
