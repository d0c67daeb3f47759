"""Training you can watch: real Horovod ranks logging to a real MLflow store as epochs end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mlflow import MlflowClient

from pipelines.train.runs import EpochLog


def test_a_running_trainings_epochs_are_in_mlflow_before_it_ends(
    digits, tmp_path, dlpipe_env, small_config
):
    epochs = 8
    sets = small_config.sets(f"train.epochs={epochs}", "train.num_proc=2")
    flags = [arg for item in sets for arg in ("--set", item)]
    stderr = tmp_path / "train.log"
    out = tmp_path / "work" / "training" / "digits-classifier"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    # The environment has no MLFLOW_TRACKING_URI: the ranks learn it from the launch.
    assert "MLFLOW_TRACKING_URI" not in dlpipe_env
    job = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--json", "--dataset", str(digits),
         *flags],
        env=dlpipe_env, stdout=subprocess.PIPE, stderr=stderr.open("w"), text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        seen = None
        deadline = time.monotonic() + 400
        while seen is None and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                run_id = json.loads((out / "run.json").read_text())["run_id"]
                run = client.get_run(run_id)
                steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
            except Exception:  # noqa: BLE001 - not started yet, or the store is busy
                continue
            layers = [k for k in run.data.metrics if k.startswith("layer/")]
            if 0 < len(steps) < epochs and run.info.status == "RUNNING":
                seen = (steps, layers, job.poll() is None)
        stdout, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
    log = stderr.read_text()
    assert job.returncode == 0, log[-3000:]
    assert seen is not None, "no epoch reached MLflow while the training ran"
    steps, layers, running = seen
    assert running and steps == list(range(len(steps)))  # epochs in order, from rank 0
    assert layers, "rank 0's layer statistics were not logged as the epochs ended"

    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["epochs"] == epochs
    metrics = client.get_run(result["run_id"]).data.metrics
    for name in ("loss", "val_loss", "accuracy", layers[0]):
        logged = sorted(m.step for m in client.get_metric_history(result["run_id"], name))
        assert logged == list(range(epochs)), name  # every epoch once, nothing twice
    assert "test_accuracy" in metrics
    # The driver's progress line per epoch, in order, each once.
    lines = [line for line in log.splitlines() if f"/{epochs}: loss " in line]
    assert [line.split("train: epoch ")[1].split("/")[0] for line in lines] == [
        str(n) for n in range(1, epochs + 1)
    ]
    assert "val_accuracy" in lines[-1] and "s/epoch)" in lines[-1]


def test_epoch_log_logs_each_epoch_once_across_instances(store, tmp_path):
    """What rank 0 and the driver (and a resumed rank 0) share: the run decides what is new."""
    import mlflow

    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        run_id = run.info.run_id
    client = MlflowClient(store.uri)
    rank = EpochLog(run_id, client)
    assert rank.log({"loss": [0.9]}) == 1
    assert rank.log({"loss": [0.9, 0.7], "layer/dense/weight_norm": [1.0, 1.1]}) == 3
    # Another process (the driver at the end, a resumed rank 0) with the whole history.
    history = {"loss": [0.9, 0.7, 0.5], "layer/dense/weight_norm": [1.0, 1.1, 1.2]}
    assert EpochLog(run_id, client).log(history) == 2
    assert EpochLog(run_id, client).log(history) == 0
    steps = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [(0, 0.9), (1, 0.7), (2, 0.5)]


def test_a_rank_that_cannot_reach_mlflow_warns_once_and_trains_on(monkeypatch, caplog):
    """The tracking server out of reach of the rank: the epoch ends, the driver logs later."""
    from pipelines.keras_api import keras
    from pipelines.train.watch import live_metrics_callback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    history: dict[str, list[float]] = {"loss": [0.5]}
    callback = live_metrics_callback(keras(), "0" * 32, history, {})
    with caplog.at_level("WARNING", logger="pipelines.train.watch"):
        callback.on_epoch_end(0)
        history["loss"].append(0.4)
        callback.on_epoch_end(1)
    warnings = [r for r in caplog.records if "cannot log epochs to MLflow" in r.message]
    assert len(warnings) == 1  # once, not every epoch
