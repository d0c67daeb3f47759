"""Run reports against a real MLflow sqlite store, real tiny Keras models and headless Chromium.

A LeNet-5 (ReLU, and once more with sigmoid for the comparison) learns three classes of
16x16 grey images (a horizontal bar, a vertical bar, a diagonal) for a few epochs, and a small
convolutional autoencoder learns to rebuild them; each is logged once per module the way the
training driver logs a run. A tenth of the test labels are flipped so that there are always
mistakes to show. Every number in the report is checked against the model's own outputs.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.images import normalise
from pipelines.keras_api import keras
from pipelines.models import build_model
from pipelines.report import (
    log_training_report,
    render_comparison,
    render_run_report,
    write_training_report,
)
from pipelines.report.layers import LayerRecords
from pipelines.tasks import CLASSIFICATION, RECONSTRUCTION, Task
from pipelines.train.feed import SplitArrays
from pipelines.train.layer_stats import layer_stats_callback
from tests.integration.chromium import needs_chromium, screenshot
from tests.integration.conftest import TrackingStore

LABELS = ["horizontal", "vertical", "diagonal"]
SIZE = 16
CLASSIFIER_ARTIFACTS = {
    "learning_curves.png",
    "learning_curves.csv",
    "confusion_matrix.png",
    "confusion_matrix.csv",
    "classification_report.json",
    "misclassified.png",
    "misclassified.csv",
    "filters_layer1.png",
    "filters_layer1.json",
    "activations.png",
    "activations.json",
    "embeddings.png",
    "embeddings.csv",
    "embeddings_sprite.png",
    "embeddings_sprite.json",
    "summary.json",
}
MANIFEST = {
    "label_names": LABELS,
    "image_shape": [SIZE, SIZE, 1],
    "splits": {"train": 300, "val": 45, "test": 60},
    "source": "synthetic bars",
}


# --- data and runs ----------------------------------------------------------------------------


def make_split(n: int, seed: int, flip: float = 0.0) -> SplitArrays:
    """Bars in three orientations at random offsets, with noise; ``flip`` mislabels a share."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(LABELS)
    images = rng.integers(0, 60, size=(n, SIZE, SIZE, 1)).astype(np.int32)
    for i, label in enumerate(labels):
        at = rng.integers(3, SIZE - 3)
        if label == 0:
            images[i, at - 1 : at + 2, 2:-2, 0] += 180
        elif label == 1:
            images[i, 2:-2, at - 1 : at + 2, 0] += 180
        else:
            for d in range(-1, 2):
                idx = np.arange(max(0, -d), min(SIZE, SIZE - d))
                images[i, idx, idx + d, 0] += 180
    flipped = rng.random(n) < flip
    labels = np.where(flipped, (labels + 1) % len(LABELS), labels).astype(np.int32)
    paths = [f"/data/bars/{LABELS[k]}/{i:04d}.png" for i, k in enumerate(labels)]
    order = np.argsort(paths)
    return SplitArrays(
        images=np.clip(images, 0, 255).astype(np.uint8)[order],
        labels=labels[order],
        paths=[paths[i] for i in order],
        label_names=list(LABELS),
    )


@dataclass(frozen=True)
class Logged:
    run_id: str
    model: object
    arrays: SplitArrays
    outputs: np.ndarray
    history: dict[str, list[float]]
    summary: dict
    files: Path  # the run's downloaded report/ directory


def _train(
    store: TrackingStore,
    cfg: TrainConfig,
    *,
    task: Task = CLASSIFICATION,
    report: bool = True,
    tsne: bool = False,
    vanish_below: float = 1.0e-7,
) -> Logged:
    """Fit ``cfg``'s model briefly and log a run as the training driver does.

    Rank 0's per-layer statistics are recorded with the training callback on the first val
    images; ``vanish_below`` is the report's threshold for a vanishing gradient.
    """
    train, val, test = make_split(300, 1), make_split(45, 2), make_split(60, 3, flip=0.1)
    model = build_model(cfg, (SIZE, SIZE, 1), len(LABELS))
    x, xv = normalise(train.images), normalise(val.images)
    y, yv = (train.labels, val.labels) if task.uses_labels else (x, xv)
    stats: dict[str, list[float]] = {}
    histograms: dict[str, list] = {}
    recorder = layer_stats_callback(keras(), (xv[:32], yv[:32]), stats, histograms)
    fit = model.fit(
        x,
        y,
        validation_data=(xv, yv),
        epochs=cfg.epochs,
        batch_size=16,
        verbose=0,
        callbacks=[recorder],
    )
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    history["lr"] = [cfg.learning_rate] * cfg.epochs
    xt = normalise(test.images)
    outputs = model.predict(xt, verbose=0)
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        mlflow.log_params(
            {
                "train.model": cfg.model,
                "train.activation": cfg.activation,
                "train.epochs": cfg.epochs,
            }
        )
        mlflow.log_text(json.dumps(MANIFEST, indent=2), "dataset/_manifest.json")
        for name, values in history.items():
            for epoch, value in enumerate(values):
                mlflow.log_metric(name, value, step=epoch)
        if not task.uses_labels:
            metrics = {"test_reconstruction_error": float(np.mean(np.abs(outputs - xt)))}
        else:
            metrics = {
                "test_accuracy": float(np.mean(outputs.argmax(axis=1) == test.labels)),
                "test_rows": float(len(test)),
            }
        mlflow.log_metrics({**metrics, "epochs_run": cfg.epochs})
        mlflow.set_tags({"registry.version": "7", "registry.model_name": "bars-classifier"})
        summary = {}
        if report:
            summary = log_training_report(
                model,
                history=history,
                evaluation=task.evaluate(test, outputs),
                task=task,
                tsne=tsne,
                samples=3,
                layers=LayerRecords(stats, histograms, vanish_below, explode_above=1000.0),
            )
    files = store.root / "downloads" / run.info.run_id
    if report:
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="report", dst_path=str(files)
        )
    return Logged(run.info.run_id, model, test, outputs, history, summary, files / "report")


@pytest.fixture(scope="module")
def classifier(store: TrackingStore) -> Logged:
    cfg = TrainConfig(model="lenet5", activation="relu", epochs=4, learning_rate=0.001, seed=3)
    return _train(store, cfg, tsne=True)


@pytest.fixture(scope="module")
def sigmoid_run(store: TrackingStore) -> Logged:
    cfg = TrainConfig(model="lenet5", activation="sigmoid", epochs=4, learning_rate=0.001, seed=3)
    return _train(store, cfg, report=False)


@pytest.fixture(scope="module")
def autoencoder(store: TrackingStore) -> Logged:
    cfg = TrainConfig(model="autoencoder", latent_dim=8, epochs=2, learning_rate=0.005, seed=3)
    return _train(store, cfg, task=RECONSTRUCTION)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _predicted(logged: Logged) -> np.ndarray:
    """The model's own predictions on the test split, computed again here."""
    return logged.model.predict(normalise(logged.arrays.images), verbose=0).argmax(axis=1)


# --- the logged artifacts ---------------------------------------------------------------------


def test_classifier_run_has_every_artifact(classifier: Logged) -> None:
    names = {p.name for p in classifier.files.iterdir()}
    assert CLASSIFIER_ARTIFACTS <= names
    assert "tensorboard" in names
    assert "reconstructions.png" not in names
    assert classifier.summary["errors"] == {}
    assert set(classifier.summary["artifacts"]) >= CLASSIFIER_ARTIFACTS | {"tensorboard/"}
    for name in names:
        if name.endswith(".png"):
            with Image.open(classifier.files / name) as image:
                assert image.format == "PNG" and min(image.size) > 100, name


def test_confusion_matrix_matches_the_models_predictions(classifier: Logged) -> None:
    rows = list(csv.reader((classifier.files / "confusion_matrix.csv").open()))
    assert rows[0][1:] == LABELS and [r[0] for r in rows[1:]] == LABELS
    cm = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    labels, predicted = classifier.arrays.labels, _predicted(classifier)

    assert cm.sum() == len(classifier.arrays) == 60
    for k in range(len(LABELS)):
        assert cm[k, k] == np.sum((labels == k) & (predicted == k))
        assert cm[k].sum() == np.sum(labels == k)
        assert cm[:, k].sum() == np.sum(predicted == k)
    assert np.trace(cm) == np.sum(labels == predicted)
    assert classifier.summary["confusion_matrix"] == cm.tolist()
    assert classifier.summary["accuracy"] == pytest.approx(np.mean(labels == predicted))


def test_classification_report_agrees_with_sklearn(classifier: Logged) -> None:
    from sklearn.metrics import precision_recall_fscore_support

    report = json.loads((classifier.files / "classification_report.json").read_text())
    labels, predicted = classifier.arrays.labels, _predicted(classifier)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(LABELS)), zero_division=0
    )
    assert [c["label"] for c in report["per_class"]] == LABELS
    for k, row in enumerate(report["per_class"]):
        assert row["precision"] == pytest.approx(precision[k])
        assert row["recall"] == pytest.approx(recall[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == support[k]
    assert report["accuracy"] == pytest.approx(np.mean(labels == predicted))
    assert report["correct"] == np.sum(labels == predicted) and report["total"] == 60
    assert report["macro_avg"]["f1"] == pytest.approx(np.mean(f1))
    assert report["weighted_avg"]["recall"] == pytest.approx(report["accuracy"])


def test_misclassified_are_the_most_confident_errors(classifier: Logged) -> None:
    rows = _csv(classifier.files / "misclassified.csv")
    probabilities = classifier.outputs
    labels, predicted = classifier.arrays.labels, probabilities.argmax(axis=1)
    errors = np.flatnonzero(predicted != labels)
    assert len(errors) > 0, "flipped test labels guarantee mistakes"
    assert len(rows) == min(16, len(errors))
    assert classifier.summary["misclassified"] == len(errors)
    confidences = [float(r["probability"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    for row in rows:
        i = int(row["index"])
        assert row["path"] == classifier.arrays.paths[i]
        assert row["true"] == LABELS[labels[i]] and row["predicted"] == LABELS[predicted[i]]
        assert row["true"] != row["predicted"]
        assert float(row["probability"]) == pytest.approx(probabilities[i].max(), rel=1e-6)
    worst_left_out = max(
        (probabilities[i].max() for i in errors if str(i) not in {r["index"] for r in rows}),
        default=0.0,
    )
    assert worst_left_out <= min(confidences) + 1e-9


def test_learning_curves_are_the_history(classifier: Logged) -> None:
    rows = _csv(classifier.files / "learning_curves.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert [float(r[key]) for r in rows] == pytest.approx(classifier.history[key])


def test_filters_are_the_first_convolution_kernels(classifier: Logged) -> None:
    data = json.loads((classifier.files / "filters_layer1.json").read_text())
    kernel = classifier.model.get_layer("conv1").get_weights()[0]  # (5, 5, 1, 6)
    assert data["layer"] == "conv1" and data["kind"] == "conv"
    assert data["kernel_shape"] == [5, 5, 1, 6] and data["count"] == 6
    np.testing.assert_allclose(np.array(data["weights"]), np.moveaxis(kernel, -1, 0), rtol=1e-6)
    assert [f["max"] for f in data["filters"]] == pytest.approx(
        [kernel[..., i].max() for i in range(6)]
    )


def test_activations_match_the_layer_outputs(classifier: Logged) -> None:
    data = json.loads((classifier.files / "activations.json").read_text())
    indexes = [s["index"] for s in data["samples"]]
    assert len(indexes) == 3
    assert sorted({classifier.arrays.labels[i] for i in indexes}) == [0, 1, 2]
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "pool1", "conv2", "pool2"]
    k = keras()
    x = normalise(classifier.arrays.images[indexes])
    for layer in data["layers"]:
        probe = k.Model(classifier.model.input, classifier.model.get_layer(layer["name"]).output)
        values = probe.predict(x, verbose=0)
        assert layer["output_shape"] == list(values.shape[1:])
        assert layer["max"] == pytest.approx(float(values.max()), rel=1e-5, abs=1e-6)
        assert layer["min"] == pytest.approx(float(values.min()), rel=1e-5, abs=1e-6)
        for sample, value in zip(layer["per_sample"], values, strict=True):
            assert sample["max"] == pytest.approx(float(value.max()), rel=1e-5, abs=1e-6)
    assert data["layers"][0]["output_shape"] == [16, 16, 6]  # 'same' padding
    assert data["layers"][3]["output_shape"] == [2, 2, 16]


def test_embeddings_have_one_row_per_test_image(classifier: Logged) -> None:
    from sklearn.decomposition import PCA

    rows = _csv(classifier.files / "embeddings.csv")
    assert len(rows) == len(classifier.arrays)
    assert [r["label"] for r in rows] == [LABELS[k] for k in classifier.arrays.labels]
    assert [r["predicted"] for r in rows] == [LABELS[k] for k in _predicted(classifier)]
    assert {"pca_1", "pca_2", "tsne_1", "tsne_2"} <= set(rows[0])
    probe = keras().Model(classifier.model.input, classifier.model.get_layer("embedding").output)
    features = probe.predict(normalise(classifier.arrays.images), verbose=0)
    expected = PCA(n_components=2).fit_transform(features)
    got = np.array([[float(r["pca_1"]), float(r["pca_2"])] for r in rows])
    np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-3, atol=1e-3)
    assert classifier.summary["embedding"]["layer"] == "embedding"
    assert classifier.summary["embedding"]["dimensions"] == 84


def test_tensorboard_logs_hold_scalars_and_the_graph(classifier: Logged) -> None:
    import tensorflow as tf

    tags: dict[str, set[str]] = {}
    graphs = 0
    for part in ("train", "validation"):
        for events in (classifier.files / "tensorboard" / part).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                for value in event.summary.value:
                    tags.setdefault(part, set()).add(value.tag)
                    # tf.summary.trace_export stores the traced graph as run metadata
                    plugin = value.metadata.plugin_data.plugin_name
                    graphs += plugin == "graph_run_metadata_graph" and value.tag == "lenet5_graph"
    assert {"epoch_loss", "epoch_accuracy", "epoch_lr"} <= tags["train"]
    assert {"epoch_loss", "epoch_accuracy"} <= tags["validation"]
    assert graphs >= 1
    # the projector files travel with the logs (tests/integration/test_embeddings_page.py
    # checks their contents and that TensorBoard loads them)
    logdir = classifier.files / "tensorboard"
    assert (logdir / "projector_config.pbtxt").is_file()
    assert {p.name for p in (logdir / "projector").iterdir()} == {
        "vectors.tsv",
        "metadata.tsv",
        "sprite.png",
    }
    assert classifier.summary["tensorboard"]["projector"] is True


def test_autoencoder_report_has_reconstructions_and_no_confusion(autoencoder: Logged) -> None:
    names = {p.name for p in autoencoder.files.iterdir()}
    assert {"reconstructions.png", "reconstructions.csv", "learning_curves.png"} <= names
    assert {"embeddings.png", "activations.png", "filters_layer1.png", "tensorboard"} <= names
    assert not names & {"confusion_matrix.png", "confusion_matrix.csv", "misclassified.png"}
    assert autoencoder.summary["errors"] == {}
    assert autoencoder.summary["embedding"]["layer"] == "latent"
    assert autoencoder.summary["embedding"]["dimensions"] == 8
    x = normalise(autoencoder.arrays.images)
    mae = np.abs(autoencoder.outputs - x).reshape(len(x), -1).mean(axis=1)
    assert autoencoder.summary["reconstruction_error"] == pytest.approx(mae.mean(), rel=1e-5)
    for row in _csv(autoencoder.files / "reconstructions.csv"):
        assert float(row["mae"]) == pytest.approx(mae[int(row["index"])], rel=1e-5)
    curves = _csv(autoencoder.files / "learning_curves.csv")
    assert "val_reconstruction_error" in curves[0]
    assert len(_csv(autoencoder.files / "embeddings.csv")) == len(x)
    metadata = (autoencoder.files / "tensorboard" / "projector" / "metadata.tsv").read_text()
    assert metadata.splitlines()[0].split("\t") == ["index", "true", "path"]
    assert len(metadata.splitlines()) == len(x) + 1


def test_mlp_shows_dense_weights_and_says_it_has_no_convolutions(tmp_path: Path) -> None:
    test = make_split(30, 4)
    cfg = TrainConfig(model="mlp", hidden_units=16, epochs=1, dropout=0.0)
    model = build_model(cfg, (SIZE, SIZE, 1), len(LABELS))
    outputs = model.predict(normalise(test.images), verbose=0)
    summary = write_training_report(
        tmp_path,
        model,
        history={},
        evaluation=CLASSIFICATION.evaluate(test, outputs),
        task=CLASSIFICATION,
    )
    assert summary["errors"] == {}
    assert "no convolution" in summary["notes"]["filters_layer1"]
    assert "no convolution or pooling" in summary["notes"]["activations"]
    assert "no per-epoch history" in summary["notes"]["learning_curves"]
    filters = json.loads((tmp_path / "filters_layer1.json").read_text())
    assert filters["kind"] == "dense" and filters["count"] == 16
    assert np.array(filters["weights"]).shape == (16, SIZE, SIZE, 1)
    assert (tmp_path / "filters_layer1.png").is_file()
    assert not (tmp_path / "activations.png").exists()
    assert len(_csv(tmp_path / "embeddings.csv")) == 30


# --- HTML pages -------------------------------------------------------------------------------

_EXTERNAL = re.compile(
    r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//"""
)
_IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")
_SCRIPT_TAG = re.compile(r"<script\b([^>]*)>", re.IGNORECASE)
#: Ways a script could reach the network; the page's one script uses none of them.
_NETWORK_JS = ("fetch(", "XMLHttpRequest", "WebSocket", "EventSource", "sendBeacon", "import(")


def _assert_self_contained(page: str, min_images: int, scripts: int = 0) -> None:
    """No external reference; only inline scripts (the embedding plot's) that fetch nothing."""
    assert "http://" not in page and "https://" not in page
    assert not _EXTERNAL.search(page)
    tags = _SCRIPT_TAG.findall(page)
    # the embedding plot: its JSON data block and its inline code, nothing else
    assert sorted(tags) == sorted([' type="application/json" id="emb-data"', ""] * scripts), tags
    assert not any(call in page for call in _NETWORK_JS)
    sources = _IMG_SRC.findall(page)
    assert len(sources) >= min_images
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG"


def test_run_report_is_one_self_contained_page(
    store: TrackingStore, classifier: Logged, tmp_path: Path
) -> None:
    path = render_run_report(classifier.run_id, tracking_uri=store.uri, out_dir=tmp_path)
    assert path == (tmp_path / f"run-{classifier.run_id}.html").resolve()
    page = path.read_text()
    _assert_self_contained(page, min_images=6, scripts=1)
    for text in (
        "Learning curves",
        "Confusion matrix",
        "Most confident mistakes",
        "First-layer filters",
        "Activations per layer",
        "How every layer trains",
        "Why this label: saliency and Grad-CAM",
        "What each filter responds to",
        "Embeddings",
        "TensorBoard",
        "bars-classifier version 7",
        "train.activation",
        "synthetic bars",  # the dataset manifest
        "pool2",  # the activation table
        "test_accuracy",
    ):
        assert text in page, text
    logged = {a.path for a in MlflowClient().list_artifacts(classifier.run_id, "report")}
    assert "report/report.html" in logged
    assert "Warning:" not in page  # LeNet-5 with ReLU trains every layer
    assert not any(name.startswith("layer/") for name in _final_metrics(page))


def _final_metrics(page: str) -> list[str]:
    """The metric names in the page's final-metrics table."""
    section = page.split('id="metrics"', 1)[1].split("</section>", 1)[0]
    return re.findall(r"<tr><td>([^<]+)</td>", section)


def test_a_vanishing_gradient_is_a_visible_warning_on_the_page(
    store: TrackingStore, tmp_path: Path
) -> None:
    cfg = TrainConfig(model="lenet5", activation="sigmoid", epochs=2, learning_rate=0.001, seed=3)
    logged = _train(store, cfg, vanish_below=999.0)  # every real gradient norm is below it
    assert logged.summary["errors"] == {}  # an untrained sigmoid net's flat maps draw too
    warnings = logged.summary["layer_stats"]["warnings"]
    assert {w["layer"] for w in warnings} == set(logged.summary["layer_stats"]["layers"])
    page = render_run_report(logged.run_id, tracking_uri=store.uri, out_dir=tmp_path).read_text()
    for warning in warnings:
        assert f"Warning: {warning['message']}" in page


def test_autoencoder_page_shows_reconstructions(
    store: TrackingStore, autoencoder: Logged, tmp_path: Path
) -> None:
    path = render_run_report(
        autoencoder.run_id, tracking_uri=store.uri, out_dir=tmp_path, log_to_run=False
    )
    page = path.read_text()
    _assert_self_contained(page, min_images=5, scripts=1)
    assert "Reconstructions" in page and "Confusion matrix" not in page
    data = json.loads(re.search(r'id="emb-data">(.*?)</script>', page, re.S).group(1))
    assert data["classifier"] is False and data["predicted"] == []
    assert len(data["index"]) == len(autoencoder.arrays)


def test_a_failed_run_without_report_still_renders(store: TrackingStore, tmp_path: Path) -> None:
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        mlflow.log_param("train.model", "lenet5")
        mlflow.log_metric("loss", 2.0, step=0)
        mlflow.log_metric("loss", 1.5, step=1)
        mlflow.set_tag("error", "RuntimeError: rank 1 died")
        mlflow.end_run(status="FAILED")
    path = render_run_report(run.info.run_id, tracking_uri=store.uri, out_dir=tmp_path)
    page = path.read_text()
    assert "FAILED" in page and "rank 1 died" in page
    assert "has no report artifacts" in page
    assert "No dataset manifest" in page
    _assert_self_contained(page, min_images=1)  # learning curves from the metric history


def test_an_unknown_run_is_a_one_line_user_error(store: TrackingStore, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no MLflow run 'f00d'") as info:
        render_run_report("f00d", tracking_uri=store.uri, out_dir=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="at least two"):
        render_comparison(["a", "a"], tracking_uri=store.uri, out_dir=tmp_path)


def test_comparison_puts_sigmoid_and_relu_side_by_side(
    store: TrackingStore, classifier: Logged, sigmoid_run: Logged, tmp_path: Path
) -> None:
    ids = [sigmoid_run.run_id, classifier.run_id]
    path = render_comparison(ids, tracking_uri=store.uri, out_dir=tmp_path)
    assert path.name == f"compare-{ids[0][:8]}-{ids[1][:8]}.html"
    page = path.read_text()
    _assert_self_contained(page, min_images=2)  # overlaid curves + the ReLU run's matrix
    assert "train.activation=sigmoid" in page and "train.activation=relu" in page
    assert ids[0] in page and ids[1] in page
    assert "test_accuracy" in page and 'class="num best"' in page
    assert "train.model" not in page  # identical params are not listed


@needs_chromium
@pytest.mark.parametrize("page", ["run", "comparison"])
def test_pages_render_in_headless_chromium_without_console_errors(
    page: str, store: TrackingStore, classifier: Logged, sigmoid_run: Logged, tmp_path: Path
) -> None:
    if page == "run":
        html = render_run_report(
            classifier.run_id, tracking_uri=store.uri, out_dir=tmp_path, log_to_run=False
        )
    else:
        html = render_comparison(
            [classifier.run_id, sigmoid_run.run_id], tracking_uri=store.uri, out_dir=tmp_path
        )
    shot, console = screenshot(html, tmp_path)
    assert console == []
    assert shot.is_file() and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank page
