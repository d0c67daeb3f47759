"""Elastic training that cannot hang: real ranks SIGKILLed, on the default local master.

``dlpipe train`` runs as a real process with ``train.elastic=true`` on the base config's
``local[2]`` (dlpipe gives elastic training the task retries it needs); a real rank
process (found with psutil by Horovod's rank module and ``HOROVOD_RANK``) gets SIGKILL: a
non-zero rank with a CPU hog busy beside it, rank 0, and a replacement rank while it joins
the reset world. Each must end in a FINISHED run with every epoch (or a one-line failure)
within ``train.rank_timeout_s`` plus :data:`MARGIN_S`, the run never left RUNNING, and
no rank process left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

from tests.integration.test_train_faults import (
    RANK_MODULE,
    _cli_args,
    _left,
    _rank_processes,
    _wait_for_epoch,
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

EPOCHS = 10
RANK_TIMEOUT_S = 20
#: What a lost rank may add to the run beyond train.rank_timeout_s: the reset, a new
#: rank's start (TensorFlow's import) and the epochs run again, on this 2-core box.
MARGIN_S = 150
#: Epochs long enough (a small CNN, small batches: about 1 s each) that the lost rank's
#: Spark task is retried and its new rank joins the world before training ends.
SETS = (
    f"train.epochs={EPOCHS}",
    "train.model=mnist_cnn",
    "train.batch_size=16",
    "train.elastic=true",
    f"train.rank_timeout_s={RANK_TIMEOUT_S}",
)


@dataclass
class Outcome:
    """How a killed training ended."""

    code: int
    result: dict[str, Any] | None
    stderr: str
    seconds_after_kill: float
    ranks_seen: list[int]


@pytest.fixture()
def cpu_hog() -> Iterator[subprocess.Popen]:
    """A process spinning one core for the whole test (contention), killed at the end."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=10)


def _start(digits: Path, dlpipe_env: dict, small_config: Any, log: Path) -> subprocess.Popen:
    sets = small_config.sets(*SETS)  # spark.master stays the base config's local[2]
    return subprocess.Popen(
        _cli_args(digits, sets),
        env=dlpipe_env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,  # its own process group, killed whole if the test fails
    )


def _end(job: subprocess.Popen, killed_at: float, log: Path, seen: list[int]) -> Outcome:
    try:
        stdout, _ = job.communicate(timeout=RANK_TIMEOUT_S + MARGIN_S + EPOCHS * 20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"training hung after the kill:\n{log.read_text()[-3000:]}")
    lines = stdout.strip().splitlines()
    result = json.loads(lines[-1]) if job.returncode == 0 and lines else None
    return Outcome(job.returncode, result, log.read_text(), time.monotonic() - killed_at, seen)


def _kill_rank(job: subprocess.Popen, rank: int) -> tuple[int, list[int]]:
    """SIGKILL rank ``rank``'s process; (its pid, every rank pid seen)."""
    ranks = _rank_processes(job.pid)
    assert rank in ranks, f"no rank {rank} among {sorted(ranks)}"
    os.kill(ranks[rank].pid, signal.SIGKILL)
    return ranks[rank].pid, [p.pid for p in ranks.values()]


def _ranks_of(tmp_path: Path) -> list[int]:
    """Live Horovod rank processes of this test's run anywhere on the host (orphans too).

    A rank's environment names the run's MLflow store, which lies under ``tmp_path``.
    """
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if RANK_MODULE in (process.info["cmdline"] or []) and any(
                str(tmp_path) in value for value in process.environ().values()
            ):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _assert_bounded_and_clean(outcome: Outcome, tmp_path: Path, job: subprocess.Popen) -> None:
    """A FINISHED run with every epoch, or one line; bounded; never RUNNING; no rank left."""
    assert outcome.seconds_after_kill < RANK_TIMEOUT_S + MARGIN_S + EPOCHS * 20
    assert _left(outcome.ranks_seen, timeout=30) == [], "rank processes were left behind"
    assert _ranks_of(tmp_path) == [], "rank processes of this run are still running"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status != "RUNNING"
    if outcome.code != 0:
        last = outcome.stderr.strip().splitlines()[-1]
        assert "dlpipe train: error:" in last, outcome.stderr[-3000:]
        assert run.info.status == "FAILED"
        return
    assert outcome.result is not None and outcome.result["epochs"] == EPOCHS
    assert run.info.status == "FINISHED"
    for metric in ("loss", "val_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == list(range(EPOCHS)), metric  # every epoch, once
    assert outcome.result["model_version"] == "1"


def _runs(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")


def _world_changes(tmp_path: Path, outcome: Outcome) -> list[dict[str, Any]]:
    tags = _runs(tmp_path).get_run(outcome.result["run_id"]).data.tags
    return json.loads(tags["world_size_changes"])


def test_a_lost_rank_under_cpu_contention_rejoins_and_every_epoch_is_run(
    digits, tmp_path, dlpipe_env, started, small_config, cpu_hog
):
    out = tmp_path / "work" / "training" / "digits-classifier"
    log = tmp_path / "train.log"
    job = _start(digits, dlpipe_env, small_config, log)
    started.append(job)
    _wait_for_epoch(out, 2, alive=lambda: job.poll() is None)
    _, seen = _kill_rank(job, 1)
    outcome = _end(job, time.monotonic(), log, seen)
    assert outcome.code == 0, outcome.stderr[-3000:]
    _assert_bounded_and_clean(outcome, tmp_path, job)
    changes = _world_changes(tmp_path, outcome)
    # The world shrank to one rank at the reset, with the rate rescaled to it; the lost
    # rank's Spark task was retried and its new rank joined the running world.
    assert changes[0]["size"] == 1 and changes[0]["epoch"] >= 2, changes
    assert changes[0]["learning_rate"] == pytest.approx(small_config().train.learning_rate)
    assert changes[-1]["size"] == 2, f"no rank joined again: {changes}"


def test_a_lost_rank_0_leaves_a_finished_run_or_one_line_in_bounded_time(
    digits, tmp_path, dlpipe_env, started, small_config
):
    out = tmp_path / "work" / "training" / "digits-classifier"
    log = tmp_path / "train.log"
    job = _start(digits, dlpipe_env, small_config, log)
    started.append(job)
    _wait_for_epoch(out, 2, alive=lambda: job.poll() is None)
    _, seen = _kill_rank(job, 0)
    outcome = _end(job, time.monotonic(), log, seen)
    _assert_bounded_and_clean(outcome, tmp_path, job)
    assert outcome.code == 0, outcome.stderr[-3000:]  # the other rank carried on as rank 0
    assert _world_changes(tmp_path, outcome)[0]["size"] == 1


def test_a_rank_lost_while_joining_the_reset_world_ends_bounded_and_clean(
    digits, tmp_path, dlpipe_env, started, small_config
):
    out = tmp_path / "work" / "training" / "digits-classifier"
    log = tmp_path / "train.log"
    job = _start(digits, dlpipe_env, small_config, log)
    started.append(job)
    _wait_for_epoch(out, 2, alive=lambda: job.poll() is None)
    first, seen = _kill_rank(job, 1)
    killed_at = time.monotonic()
    # The lost rank's Spark task is retried: kill its new rank as soon as it starts, while
    # it is joining (TensorFlow's start, Horovod's rendezvous, the state's sync).
    deadline = killed_at + 120
    second = None
    while second is None and job.poll() is None and time.monotonic() < deadline:
        joining = _rank_processes(job.pid).get(1)
        if joining is not None and joining.pid != first:
            second = joining.pid
            os.kill(second, signal.SIGKILL)
        time.sleep(0.05)
    assert second is not None, "no rank joined again after the first kill"
    outcome = _end(job, killed_at, log, [*seen, second])
    # Either way is bounded: the world goes on (the rank was lost before the reset's
    # rendezvous), or, lost inside it, Gloo aborts the others after train.rank_timeout_s.
    _assert_bounded_and_clean(outcome, tmp_path, job)
