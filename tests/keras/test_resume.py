"""Training faults on the Keras stack: a real ``dlpipe train`` SIGKILLed after a checkpointed
epoch, then resumed from rank 0's checkpoint by ``dlpipe train --resume``; a rank SIGKILLed
mid-training, which ends the job with the one-line error in bounded time.

Real keras-launcher ranks (Keras 3/JAX) as Spark 4 barrier tasks, a real MLflow store, a
real SIGKILL to the whole ``dlpipe train`` process group.
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
from pipelines.train.keras_launcher import PEER_GRACE_S, RANK_MARKER, KerasSparkLauncher
from tests.integration.conftest import digits, small_config, started  # noqa: F401 (fixtures)
from tests.integration.test_train_faults import _epoch, _left, _mlflow, _wait_for_epoch

pytestmark = pytest.mark.slow  # Spark, two ranks, MLflow, two jobs


def _cli_args(dataset: Path, sets: list[str], *extra: str) -> list[str]:
    flags = [arg for item in sets for arg in ("--set", item)]
    command = [sys.executable, "-m", "pipelines.cli", "train", "--json"]
    return [*command, "--dataset", str(dataset), *flags, *extra]


def _ranks_under(root: int) -> list[psutil.Process]:
    """The keras launcher's rank processes started under ``root``."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if any(RANK_MARKER in part for part in process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_killed_keras_job_resumes_from_its_checkpoint_in_the_same_run(
    digits,  # noqa: F811
    tmp_path,
    dlpipe_env,
    started,  # noqa: F811
    small_config,  # noqa: F811
):
    epochs = 4
    sets = small_config.sets("train.launcher=keras", f"train.epochs={epochs}")
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
    _wait_for_epoch(out, 1, alive=lambda: job.poll() is None, timeout=180)
    family = [job.pid, *(p.pid for p in psutil.Process(job.pid).children(recursive=True))]
    assert len(_ranks_under(job.pid)) == 2, "the keras launcher's ranks were not running"
    os.killpg(job.pid, signal.SIGKILL)  # the whole job: driver, JVM, Python workers, ranks
    job.wait(timeout=30)
    assert _left(family, timeout=60) == [], "processes of the killed job were left behind"
    killed_at = _epoch(out)
    assert 1 <= killed_at < epochs
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    # Rank 0's checkpoint (in the run's own folder) is a Keras 3 file of its epoch,
    # optimizer state included.
    state = json.loads((out / run_id / "checkpoint.json").read_text())
    assert state["model"].endswith(".keras") and (out / run_id / state["model"]).is_file()

    client = _mlflow(tmp_path)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could end it

    resumed = subprocess.run(
        _cli_args(digits, sets, "--resume"),
        env=dlpipe_env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == run_id and result["epochs"] == epochs
    assert result["initial_epoch"] == killed_at > 0

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["launcher"] == "keras" and run.data.tags["dlpipe.stack"] == "keras"
    for metric in ("loss", "val_loss", "accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert steps == list(range(epochs)), metric  # every epoch once, none repeated
    (resume,) = json.loads(run.data.tags["resumes"])
    assert resume["epoch"] == killed_at and resume["status"] == "FAILED"
    # The resumed ranks started from identical weights (the digest check of fit's start).
    digests = json.loads(run.data.tags["rank_weights_sha256"])
    assert len(digests) == 2 and len(set(digests.values())) == 1
    # One MLflow run in the experiment: the resume reopened it rather than starting another.
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_killed_keras_rank_ends_the_job_with_the_one_line_error(
    spark,
    digits,  # noqa: F811
    small_config,  # noqa: F811
):
    """``train`` with the keras launcher; rank 1's process SIGKILLed after epoch 1."""
    timeout_s = 20
    config = small_config(
        "train.launcher=keras", "train.epochs=40", f"train.rank_timeout_s={timeout_s}"
    )
    out = Store.of(config).training(config.mlflow.model_name)
    seen: dict[str, Any] = {}

    def kill_rank_1() -> None:
        _wait_for_epoch(out, 1, timeout=180)
        ranks = _ranks_under(os.getpid())
        seen["ranks"] = [p.pid for p in ranks]
        (victim,) = [p for p in ranks if any(a.endswith(":1") for a in p.cmdline())]
        seen["killed"], seen["at"] = victim.pid, time.monotonic()
        victim.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    with pytest.raises(RankDiedError) as caught:
        train(config, KerasSparkLauncher(spark, 2, slots_timeout_s=30), digits)
    ended = time.monotonic()
    killer.join(timeout=5)
    assert "killed" in seen, "the rank was not killed"
    print(f"\nkilled rank 1 -> RankDiedError from train: {ended - seen['at']:.2f} s")
    assert ended - seen["at"] < timeout_s + PEER_GRACE_S + 30  # bounded, not a hang

    message = str(caught.value)
    assert "\n" not in message
    assert f"rank 1 (pid {seen['killed']} on host " in message, message
    assert "`dlpipe train --resume`" in message

    import mlflow

    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=[config.mlflow.experiment], output_format="list")
    assert run.info.status == "FAILED" and "rank 1 (pid" in run.data.tags["error"]
    assert _left(seen["ranks"], timeout=30) == [], "rank processes were left behind"
