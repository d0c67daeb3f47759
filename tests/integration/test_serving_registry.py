"""The pyfunc image model and the registry against a real MLflow sqlite store and real Keras.

One tiny MLP learns three classes of 8x8 grey images (dark, mid, bright) in about a second;
it is logged once per module and shared. Every test runs against a store in a temporary
directory, with MLFLOW_TRACKING_URI and the working directory pointed there, so nothing
touches the repository's work/ or mlruns/.
"""

from __future__ import annotations

import base64
import getpass
import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc.scoring_server import invocations
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.cli import main
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.image_model import OUTPUT_COLUMNS, log_image_model, model_signature, pip_requirements
from pipelines.images import encode_png
from pipelines.keras_api import keras
from pipelines.models import build_model
from pipelines.promote import PromotionError, promote
from pipelines.registry import (
    DECISION_TAG,
    ChampionScore,
    MissingMetricError,
    ModelNotFoundError,
    register_and_promote,
    resolve_model_uri,
)
from pipelines.tasks import CLASSIFICATION, RECONSTRUCTION, Task
from tests.integration.conftest import TrackingStore
from tests.integration.rest import free_port, post_images, stop, strict_json, wait_until_serving

LABELS = ["dark", "mid", "bright"]
SIZE = 8


@dataclass(frozen=True)
class Logged:
    model: object
    model_uri: str
    run_id: str


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Grey SIZExSIZE uint8 images: class k has pixels around 30 + 100 k, plus noise."""
    rng = np.random.default_rng(seed)
    base = 30 + 100 * labels[:, None, None, None]
    noise = rng.integers(-25, 26, size=(len(labels), SIZE, SIZE, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier(store: TrackingStore) -> Logged:
    labels = np.arange(300) % 3
    x = _images(labels, seed=1)
    cfg = TrainConfig(model="mlp", hidden_units=16, epochs=1, dropout=0.0, learning_rate=0.01)
    keras().utils.set_random_seed(1)  # an unlucky initialisation once left a class unlearnt
    model = build_model(cfg, (SIZE, SIZE, 1), len(LABELS))
    model.fit(x.astype(np.float32) / 255.0, labels, epochs=8, batch_size=32, verbose=0)
    logged = _log(store, model, metric={"test_accuracy": 0.9})
    return Logged(model=model, model_uri=logged.model_uri, run_id=logged.run_id)


@pytest.fixture(scope="module")
def scorer(classifier: Logged) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(classifier.model_uri)


def _log(
    store: TrackingStore, model, metric: dict[str, float], task: Task = CLASSIFICATION
) -> Logged:
    example = encode_png(_images(np.array([0]), seed=0)[0])
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        info = log_image_model(
            model,
            label_names=LABELS,
            image_shape=(SIZE, SIZE, 1),
            task=task,
            input_example_png=example,
        )
        if metric:
            mlflow.log_metrics(metric)
    return Logged(model=model, model_uri=info.model_uri, run_id=run.info.run_id)


def _test_set() -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([0, 1, 2, 2, 1, 0])
    return _images(labels, seed=7), labels


# --- the pyfunc model ---------------------------------------------------------------------


def test_predicts_classes_from_png_jpeg_base64_and_arrays(scorer) -> None:
    x, labels = _test_set()
    expected = [LABELS[k] for k in labels]
    inputs = {
        "png": [encode_png(img) for img in x],
        "jpeg": [_jpeg(img) for img in x],
        "base64": [base64.b64encode(encode_png(img)).decode("ascii") for img in x],
        "array": [img for img in x],
        "2d array": [img[:, :, 0] for img in x],
    }
    for kind, cells in inputs.items():
        out = scorer.predict(pd.DataFrame({"image": cells}))
        assert list(out.columns) == list(OUTPUT_COLUMNS), kind
        assert out["predicted_label"].tolist() == expected, kind
        assert out["error"].isna().all(), kind


def test_bad_rows_get_an_error_and_the_rest_is_scored(scorer) -> None:
    x, labels = _test_set()
    good = encode_png(x[0])
    cells = [good, b"this is not an image", good[: len(good) // 2], None, b"", encode_png(x[2])]
    out = scorer.predict(pd.DataFrame({"image": cells}))

    assert len(out) == len(cells)
    assert out.loc[[0, 5], "predicted_label"].tolist() == [LABELS[labels[0]], LABELS[labels[2]]]
    assert out.loc[[0, 5], "error"].isna().all()
    for row in (1, 2, 3, 4):
        error = out.loc[row, "error"]
        assert isinstance(error, str) and error and "\n" not in error
        assert out.loc[row, "predicted_label"] is None
        assert out.loc[row, "probability"] is pd.NA  # null, not NaN: JSON and Spark say null
        assert out.loc[row, "probabilities"] is None
    assert out.loc[1, "error"].startswith("not an image")
    assert out.loc[3, "error"].startswith("missing image")


def test_bad_base64_is_a_row_error(scorer) -> None:
    out = scorer.predict(pd.DataFrame({"image": ["@@@ not base64 @@@"]}))
    assert out.loc[0, "error"].startswith("not base64")


def test_probabilities_sum_to_one_in_label_order(scorer, classifier: Logged) -> None:
    x, _ = _test_set()
    out = scorer.predict(pd.DataFrame({"image": [encode_png(img) for img in x]}))
    direct = classifier.model.predict(x.astype(np.float32) / 255.0, verbose=0)

    assert out["probability"].dtype == "Float64"  # nullable: an unknown one is null
    for row, probs in enumerate(out["probabilities"]):
        assert isinstance(probs, list) and len(probs) == len(LABELS)
        assert all(isinstance(p, float) for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == pytest.approx(direct[row].tolist(), abs=1e-6)
        best = int(np.argmax(probs))
        assert out.loc[row, "predicted_label"] == LABELS[best]
        assert out.loc[row, "probability"] == max(probs)


def test_keeps_the_input_index_and_takes_empty_input(scorer) -> None:
    x, _ = _test_set()
    frame = pd.DataFrame({"image": [encode_png(img) for img in x[:3]]}, index=[10, 20, 30])
    assert scorer.predict(frame).index.tolist() == [10, 20, 30]
    empty = scorer.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))
    assert empty.empty and list(empty.columns) == list(OUTPUT_COLUMNS)


def test_log_image_model_needs_an_active_run(classifier: Logged) -> None:
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_image_model(
            classifier.model,
            label_names=LABELS,
            image_shape=(SIZE, SIZE, 1),
            task=CLASSIFICATION,
            input_example_png=encode_png(_test_set()[0][0]),
        )


def test_logged_model_signature_requirements_and_code(scorer, classifier: Logged) -> None:
    signature = scorer.metadata.signature
    assert signature == model_signature(len(LABELS))
    assert signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert [spec["name"] for spec in signature.outputs.to_dict()] == list(OUTPUT_COLUMNS)

    local = Path(mlflow.artifacts.download_artifacts(classifier.model_uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert "tensorflow-cpu==2.15.1" in requirements
    assert not any(req.startswith("spark-dl-pipelines") for req in requirements)
    assert (local / "code" / "pipelines" / "image_model.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    meta = json.loads((local / "artifacts" / "labels.json").read_text())
    assert meta == {
        "label_names": LABELS,
        "image_shape": [SIZE, SIZE, 1],
        "task": "classification",
        "dlpipe.stack": "default",  # which stack trained it: the other one refuses it
    }


def test_a_model_logged_before_the_rename_still_loads_and_predicts(
    store: TrackingStore, classifier: Logged
) -> None:
    """Models logged by earlier versions pickle ``pipelines.serving.ImageModel``."""
    import pipelines.image_model as image_model
    import pipelines.serving  # noqa: F401  (cloudpickle pickles by reference what it can import)

    image_model.ImageModel.__module__ = "pipelines.serving"  # how older versions pickled it
    try:
        old = _log(store, classifier.model, metric={})
    finally:
        image_model.ImageModel.__module__ = "pipelines.image_model"
    local = Path(mlflow.artifacts.download_artifacts(old.model_uri))
    pickled = (local / "python_model.pkl").read_bytes()
    assert b"pipelines.serving" in pickled and b"load_context" not in pickled  # by reference
    png = base64.b64encode(encode_png(_test_set()[0][0])).decode()
    script = (
        "import base64, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(pd.DataFrame({'image': [base64.b64decode(sys.argv[2])]}))\n"
        "print(out['predicted_label'][0], type(model.unwrap_python_model()).__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(local), png],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    label, module = done.stdout.split()
    assert label in LABELS and module == "pipelines.image_model"


def test_scoring_server_accepts_base64_json(scorer) -> None:
    x, labels = _test_set()
    request = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(encode_png(img)).decode("ascii")] for img in x[:3]]
            + [[base64.b64encode(b"not an image").decode("ascii")]],
        }
    }
    response = invocations(
        json.dumps(request), "application/json", scorer, scorer.metadata.get_input_schema()
    )
    assert response.status == 200, response.response
    predictions = strict_json(response.response)["predictions"]  # no NaN: strict parsers
    assert [p["predicted_label"] for p in predictions[:3]] == [LABELS[k] for k in labels[:3]]
    assert predictions[3]["predicted_label"] is None
    assert predictions[3]["probability"] is None and predictions[3]["probabilities"] is None
    assert predictions[3]["error"].startswith("not an image")


# --- autoencoder --------------------------------------------------------------------------


def test_autoencoder_reports_reconstruction_error(store: TrackingStore) -> None:
    cfg = TrainConfig(model="autoencoder", hidden_units=16, latent_dim=4, learning_rate=0.01)
    model = build_model(cfg, (SIZE, SIZE, 1), 0)
    x, _ = _test_set()
    logged = _log(store, model, metric={}, task=RECONSTRUCTION)
    out = mlflow.pyfunc.load_model(logged.model_uri).predict(
        pd.DataFrame({"image": [encode_png(img) for img in x[:2]] + [b"junk"]})
    )
    batch = x[:2].astype(np.float32) / 255.0
    expected = np.abs(model.predict(batch, verbose=0) - batch).reshape(2, -1).mean(axis=1)

    assert list(out.columns) == [*OUTPUT_COLUMNS, "reconstruction_error"]
    assert out["reconstruction_error"].iloc[:2].tolist() == pytest.approx(expected, abs=1e-6)
    assert out["predicted_label"].isna().all() and out["probability"].isna().all()
    assert out.loc[2, "reconstruction_error"] is pd.NA and out.loc[2, "error"]


# --- registry -----------------------------------------------------------------------------


def _register(store: TrackingStore, logged: Logged, name: str, metric: str = "test_accuracy", **kw):
    return register_and_promote(
        logged.model_uri,
        logged.run_id,
        model_name=name,
        alias="champion",
        metric=metric,
        higher_is_better=kw.pop("higher_is_better", True),
        tracking_uri=store.uri,
        **kw,
    )


def test_the_champion_is_judged_on_the_new_split_by_the_challenge(
    store: TrackingStore, classifier: Logged
) -> None:
    name = "digits-challenge"
    client = MlflowClient(store.uri)
    _register(store, classifier, name)  # v1, test_accuracy 0.9 on its own split
    challenged = []

    def challenge(score):
        def evaluate(champion):
            challenged.append(str(champion.version))
            return score

        return evaluate

    # On the new split the champion scores 0.7: the new version's 0.8 wins, although the
    # champion's own run logged 0.9 on the split it was trained with.
    newer = _log(store, classifier.model, {"test_accuracy": 0.8})
    evidence = {"promotion_split_sha256": "ab" * 32, "promotion_split": "test"}
    second = _register(
        store, newer, name, challenge=challenge(ChampionScore(0.7)), evidence=evidence
    )
    assert challenged == ["1"] and second.promoted
    assert second.decision == "promoted: test_accuracy 0.8 > champion v1 0.7"
    assert (second.score, second.champion_score, second.previous_champion) == (0.8, 0.7, "1")
    tags = client.get_model_version(name, "2").tags
    assert tags[DECISION_TAG] == second.decision
    assert (tags["promotion_metric"], tags["promotion_score"]) == ("test_accuracy", "0.8")
    assert (tags["promotion_champion_version"], tags["promotion_champion_score"]) == ("1", "0.7")
    assert tags["promotion_comparable"] == "true" and tags["previous_champion"] == "1"
    assert tags["promotion_split_sha256"] == "ab" * 32 and tags["promotion_split"] == "test"
    assert tags["promoted_by"] == f"dlpipe train (run {newer.run_id})" and tags["promoted_at"]

    # Not better by the least improvement asked: kept.
    close = _register(
        store, _log(store, classifier.model, {"test_accuracy": 0.82}), name,
        challenge=challenge(ChampionScore(0.8)), min_improvement=0.05,
    )  # fmt: skip
    assert not close.promoted and "min_improvement 0.05" in close.decision
    assert "previous_champion" not in client.get_model_version(name, "3").tags

    # A champion that cannot be evaluated on the split: the configured rule decides.
    why = "input 28x28x1, this dataset 8x8x1"
    kept = _register(
        store, _log(store, classifier.model, {"test_accuracy": 0.5}), name,
        challenge=challenge(ChampionScore(None, why)), incomparable="keep",
    )  # fmt: skip
    assert not kept.promoted and kept.champion_version == "2"
    assert kept.decision == f"kept champion v2: not comparable ({why}); registry.incomparable=keep"
    assert client.get_model_version(name, "4").tags["promotion_comparable"] == "false"
    replaced = _register(
        store, _log(store, classifier.model, {"test_accuracy": 0.5}), name,
        challenge=challenge(ChampionScore(None, why)),
    )  # fmt: skip
    assert replaced.promoted and "is not comparable" in replaced.decision
    assert str(client.get_model_version_by_alias(name, "champion").version) == "5"


def test_promote_by_hand_and_roll_back_are_tagged_with_who_and_why(
    store: TrackingStore, classifier: Logged, capsys
) -> None:
    name = "digits-by-hand"
    client = MlflowClient(store.uri)
    for accuracy in (0.8, 0.85, 0.7):  # v1 and v2 promoted in turn, v3 kept
        _register(store, _log(store, classifier.model, {"test_accuracy": accuracy}), name)
    who = f"{getpass.getuser()}@{socket.gethostname()}"

    done = promote(
        model_name=name, alias="champion", tracking_uri=store.uri, version="3", reason="hotfix"
    )
    assert (done.previous, done.champion, done.by) == ("2", "3", who)
    assert done.decision == f"promoted by hand over v2 by {who}: hotfix"
    tags = client.get_model_version(name, "3").tags
    assert (tags["promoted_by"], tags["promotion_reason"]) == (who, "hotfix")
    assert tags["previous_champion"] == "2" and tags[DECISION_TAG] == done.decision

    # Roll back walks back the champions: v3 -> v2 (before v3) -> v1 (before v2).
    back = promote(model_name=name, alias="champion", tracking_uri=store.uri, rollback=True)
    assert (back.previous, back.champion) == ("3", "2")
    assert back.decision == f"rolled back from v3 by {who}: no reason given"
    assert client.get_model_version(name, "2").tags["rolled_back_from"] == "3"
    code = main(
        [
            "promote", "--rollback", "--reason", "v2 mislabels cats",
            "--set", f"mlflow.tracking_uri={store.uri}", "--set", f"mlflow.model_name={name}",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[:3] == [f"{name}@champion: v2 -> v1", "previous: v2", "champion: v1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    with pytest.raises(PromotionError, match="records no previous champion") as caught:
        promote(model_name=name, alias="champion", tracking_uri=store.uri, rollback=True)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    with pytest.raises(ModelNotFoundError, match="has no version 99"):
        promote(model_name=name, alias="champion", tracking_uri=store.uri, version="99")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_alias_moves_only_on_strict_improvement(store: TrackingStore, classifier: Logged) -> None:
    name = "digits-promotion"
    client = MlflowClient(store.uri)

    first = _register(store, classifier, name)  # test_accuracy 0.9
    assert (first.version, first.promoted, first.champion_version) == ("1", True, "1")
    assert first.decision == "promoted: no champion yet"
    assert first.model_uri == f"models:/{name}/1"

    better = _register(store, _log(store, classifier.model, {"test_accuracy": 0.95}), name)
    assert better.promoted and better.champion_version == "2"
    assert better.decision == "promoted: test_accuracy 0.95 > champion v1 0.9"

    worse = _register(store, _log(store, classifier.model, {"test_accuracy": 0.93}), name)
    assert not worse.promoted and worse.champion_version == "2" and worse.version == "3"
    assert worse.decision == "kept champion v2: test_accuracy 0.93 <= 0.95"

    equal = _register(store, _log(store, classifier.model, {"test_accuracy": 0.95}), name)
    assert not equal.promoted and equal.champion_version == "2"

    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "3").tags[DECISION_TAG] == worse.decision
    run_tags = client.get_run(client.get_model_version(name, "3").run_id).data.tags
    assert run_tags["registry.decision"] == worse.decision
    assert run_tags["registry.version"] == "3"
    assert run_tags["registry.promoted"] == "false"
    assert client.get_model_version(name, "2").tags[DECISION_TAG] == better.decision


def test_lower_is_better_metric_promotes_on_a_lower_value(store: TrackingStore, classifier: Logged):
    name = "digits-autoencoder"
    metric = "test_reconstruction_error"
    kw = {"metric": metric, "higher_is_better": False}
    first = _register(store, _log(store, classifier.model, {metric: 0.05}), name, **kw)
    lower = _register(store, _log(store, classifier.model, {metric: 0.03}), name, **kw)
    higher = _register(store, _log(store, classifier.model, {metric: 0.04}), name, **kw)

    assert first.promoted and lower.promoted and not higher.promoted
    assert lower.decision == f"promoted: {metric} 0.03 < champion v1 0.05"
    assert higher.decision == f"kept champion v2: {metric} 0.04 >= 0.03"
    assert higher.champion_version == "2"


def test_missing_metric_fails_before_registering(store: TrackingStore, classifier: Logged) -> None:
    name = "digits-no-metric"
    with pytest.raises(MissingMetricError, match="test_accuracy") as caught:
        _register(store, classifier, name, metric="val_f1")
    assert isinstance(caught.value, UserError)
    assert "val_f1" in str(caught.value) and "\n" not in str(caught.value)
    assert MlflowClient(store.uri).search_registered_models(f"name = '{name}'") == []


def test_register_uses_the_given_tracking_uri_and_restores_the_global_one(
    store: TrackingStore, classifier: Logged, tmp_path: Path
) -> None:
    elsewhere = f"sqlite:///{tmp_path}/other.db"
    mlflow.set_tracking_uri(elsewhere)
    try:
        done = _register(store, classifier, "digits-elsewhere")
        assert mlflow.get_tracking_uri() == elsewhere
        assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    finally:
        mlflow.set_tracking_uri(store.uri)
    assert done.promoted
    assert MlflowClient(store.uri).get_model_version("digits-elsewhere", "1").run_id == (
        classifier.run_id
    )


def test_resolve_pins_alias_and_version(store: TrackingStore, classifier: Logged) -> None:
    name = "digits-resolve"
    _register(store, classifier, name)
    _register(store, _log(store, classifier.model, {"test_accuracy": 0.5}), name)

    default = resolve_model_uri(None, model_name=name, alias="champion", tracking_uri=store.uri)
    assert (default.uri, default.name, default.version) == (f"models:/{name}/1", name, "1")
    latest = resolve_model_uri(
        f"models:/{name}/latest", model_name="x", alias="y", tracking_uri=store.uri
    )
    assert latest.version == "2"
    explicit = resolve_model_uri(
        f"models:/{name}/2", model_name="x", alias="y", tracking_uri=store.uri
    )
    assert explicit.uri == f"models:/{name}/2"
    out = mlflow.pyfunc.load_model(default.uri).predict(
        pd.DataFrame({"image": [encode_png(_test_set()[0][2])]})
    )
    assert out.loc[0, "predicted_label"] == "bright"

    for passthrough in (f"runs:/{classifier.run_id}/model", "file:///tmp/model", "/tmp/model"):
        resolved = resolve_model_uri(passthrough, model_name=name, alias="c", tracking_uri="x")
        assert (resolved.uri, resolved.name, resolved.version) == (passthrough, None, None)
    logged = resolve_model_uri(classifier.model_uri, model_name=name, alias="c", tracking_uri="x")
    assert logged.uri == classifier.model_uri and logged.version is None


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        (None, "registered model no-such-model not found"),
        ("models:/no-such-model@champion", "registered model no-such-model not found"),
        ("models:/digits-missing@staging", "no model version with alias staging"),
        ("models:/digits-missing/9", "registered model digits-missing has no version 9"),
        ("models:/digits-missing/Production", "neither a version number nor an alias"),
    ],
)
def test_resolve_missing_model_alias_or_version(
    store: TrackingStore, classifier, uri, needle
) -> None:
    client = MlflowClient(store.uri)
    if not client.search_registered_models("name = 'digits-missing'"):
        _register(store, classifier, "digits-missing")
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_uri(uri, model_name="no-such-model", alias="champion", tracking_uri=store.uri)
    message = str(caught.value)
    assert needle in message and "\n" not in message
    assert isinstance(caught.value, UserError)


# --- the real REST server -----------------------------------------------------------------


def test_mlflow_models_serve_scores_base64_images(
    store: TrackingStore, classifier: Logged, tmp_path: Path
) -> None:
    model_dir = mlflow.artifacts.download_artifacts(classifier.model_uri)
    port = free_port()
    # The server execs `uvicorn` by name: the venv's bin must be on PATH (an activated venv).
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store.uri,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    log = (tmp_path / "serve.log").open("w+b")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_dir, "--env-manager",
         "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, server, lambda: (tmp_path / "serve.log").read_text())
        x, labels = _test_set()
        # MLflow's own server (as Databricks Model Serving runs it) writes strict JSON too.
        cells = [encode_png(img) for img in x] + [b"not an image"]
        *predictions, bad = post_images(base, cells, timeout=30)
        assert [p["predicted_label"] for p in predictions] == [LABELS[k] for k in labels]
        assert all(p["error"] is None for p in predictions)
        assert bad["probability"] is None and bad["error"].startswith("not an image")

        broken = urllib.request.Request(
            f"{base}/invocations", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(broken, timeout=30)
        assert caught.value.code == 400
    finally:
        stop(server, 20)
        log.close()
