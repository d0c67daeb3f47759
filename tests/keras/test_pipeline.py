"""``dlpipe`` end to end on the Keras stack, as a user runs it: real subprocesses, Spark 4,
Keras 3/JAX ranks as barrier tasks, a real MLflow 3 store, a REST server, real PNG files.

One ``dlpipe run`` (demo data, ingest, train with the keras launcher, evaluate, register,
score, report) feeds the checks of the stages after it (explain, serve) and of the stack
record; a copy of the registered model that claims the other stack is refused, in one line,
by scoring, serving and the pyfunc itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.rest import free_port, post_images, wait_until_serving

pytestmark = pytest.mark.slow  # Spark, ranks, MLflow, a server: minutes

#: Small enough for a 2-core CI: 16x16 digits, 2 epochs of mnist_cnn (it has the
#: convolutions the report's Grad-CAM and filter sections need).
SMALL = [
    "ingest.image_size=16",
    "train.model=mnist_cnn",
    "train.epochs=2",
    "train.early_stopping_patience=0",
    "train.augment_shift=0.0",
    "train.augment_rotation_deg=0.0",
]


def _dlpipe(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``dlpipe run --json`` on the bundled digits; its result, env and settings."""
    work = tmp_path_factory.mktemp("keras-run") / "work"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [arg for item in [f"work_dir={work}", *SMALL] for arg in ("--set", item)]
    done = _dlpipe(env, "run", "--json", *sets)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "section" not in done.stderr or " failed" not in done.stderr, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"result": result, "env": env, "sets": sets, "work": work, "stderr": done.stderr}


def test_run_does_every_stage_on_the_keras_stack(ran):
    import mlflow

    result = ran["result"]
    assert result["ingest"]["ingested"] == 1797
    train = result["train"]
    assert train["world_size"] == 2 and train["epochs"] == 2
    assert train["test_metrics"]["test_accuracy"] > 0.6
    assert result["score"]["scored"] == 1797 and result["score"]["errors"] == 0
    assert Path(result["report"]).is_file()
    # The ranks were the keras launcher's (horovod, the default, means keras on this stack).
    assert "Keras/JAX ranks as barrier tasks" in ran["stderr"]

    client = mlflow.MlflowClient(f"sqlite:///{ran['work'] / 'mlflow.db'}")
    run = client.get_run(train["run_id"])
    assert run.data.tags["dlpipe.stack"] == "keras"
    assert run.data.tags["launcher"] == "keras"
    digests = json.loads(run.data.tags["rank_weights_sha256"])
    assert len(digests) == 2 and len(set(digests.values())) == 1
    version = client.get_model_version(train["model_name"], train["model_version"])
    assert version.tags["dlpipe.stack"] == "keras"
    # Rank 0's layer statistics, computed with jax.grad, were logged per epoch.
    grads = [key for key in run.data.metrics if key.endswith("grad_norm")]
    assert grads and all(run.data.metrics[key] > 0 for key in grads)
    # Every report section was written; only the TensorBoard files are left out, saying so.
    summary = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=train["run_id"],
                artifact_path="report/summary.json",
                tracking_uri=f"sqlite:///{ran['work'] / 'mlflow.db'}",
            )
        ).read_text()
    )
    assert summary["errors"] == {}
    assert "TensorBoard" in summary["notes"]["tensorboard"]
    assert summary["attribution"] and summary["filters_topk"] and summary["layer_stats"]["layers"]


def test_explain_and_serve_the_keras_model(ran):
    image = sorted((ran["work"] / "demo-digits" / "3").glob("*.png"))[0]
    done = _dlpipe(ran["env"], "explain", str(image), "--json", *ran["sets"])
    assert done.returncode == 0, done.stderr[-3000:]
    explained = json.loads(done.stdout.strip().splitlines()[-1])
    assert explained["predicted_label"] in {str(d) for d in range(10)}
    assert explained["saliency_peak"] is not None and explained["grad_cam_peak"] is not None
    assert explained["grad_cam_layer"] and Path(explained["page"]).is_file()

    port = free_port()
    log = ran["work"] / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), *ran["sets"]],
            env=ran["env"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, server, log.read_text, seconds=180)
        pngs = [p.read_bytes() for p in sorted((ran["work"] / "demo-digits" / "7").glob("*"))[:4]]
        rows = post_images(base, [*pngs, b"not an image"], timeout=60)
        assert [row["error"] is None for row in rows] == [True] * 4 + [False]
        assert all(len(row["probabilities"]) == 10 for row in rows[:4])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_a_model_of_the_other_stack_is_refused_in_one_line(ran, tmp_path):
    """A copy of the registered model whose metadata says the default stack trained it."""
    from mlflow.artifacts import download_artifacts

    train = ran["result"]["train"]
    uri = f"models:/{train['model_name']}/{train['model_version']}"
    tracking = f"sqlite:///{ran['work'] / 'mlflow.db'}"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow

    mlflow.set_tracking_uri(tracking)
    original = Path(download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl")))
    other = tmp_path / "other-stack-model"
    shutil.copytree(original, other)
    labels = other / "artifacts" / "labels.json"
    meta = json.loads(labels.read_text())
    assert meta["dlpipe.stack"] == "keras"
    labels.write_text(json.dumps({**meta, "dlpipe.stack": "default"}))

    expected = "was trained on the default stack and cannot run on the keras stack"
    done = _dlpipe(ran["env"], "score", "--model", str(other), *ran["sets"])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("dlpipe score: error: ")
    assert expected in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr

    done = _dlpipe(ran["env"], "serve", "--model", str(other), "--port", str(free_port()))
    assert done.returncode == 1
    assert expected in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]

    with pytest.raises(Exception, match="trained on the default stack"):
        mlflow.pyfunc.load_model(str(other))
