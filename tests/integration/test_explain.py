"""``explain``: one image file through a logged, registered model, into one offline page.

A tiny convnet learns "bright square or plain noise" on 16x16 grey images, is logged with
:func:`pipelines.image_model.log_image_model` into a private sqlite MLflow store and registered
with the champion alias, as training does. The page's numbers are checked against the
pyfunc model's own ``predict`` on the same file bytes, and the page is opened in headless
Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import cli
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.explain import ExplainResult, explain_image
from pipelines.image_model import log_image_model, to_pixels
from pipelines.images import encode_png, normalise
from pipelines.models import build_model
from pipelines.registry import register_and_promote
from pipelines.report.attribution import grad_cam, peak, saliency
from pipelines.report.probe import activation_layers, layer_outputs
from pipelines.tasks import CLASSIFICATION
from tests.integration.chromium import needs_chromium, screenshot
from tests.integration.conftest import TrackingStore

SIZE = 16
NAMES = ["plain noise", "a bright square patch"]
MODEL = "explain-patches"
SCREENSHOT = Path("/tmp/explain_screenshot.png")
_SRC_HREF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?!data:)[a-z][a-z0-9+.-]*:""", re.I)
_IMG_SRC = re.compile(r'<img src="([^"]+)"')


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 90, size=(n, SIZE, SIZE, 1))
    for i in np.flatnonzero(labels):
        r, c = rng.integers(1, SIZE - 3, size=2)
        images[i, r : r + 3, c : c + 3, 0] = 230
    return images.astype(np.uint8), labels


@dataclass(frozen=True)
class Registered:
    store: TrackingStore
    model_uri: str  # models:/<name>/<version>
    run_id: str


@pytest.fixture(scope="module")
def registered(store: TrackingStore) -> Registered:
    images, labels = _patches(400, 1)
    cfg = TrainConfig(model="mnist_cnn", activation="relu", epochs=3, learning_rate=0.002, seed=2)
    model = build_model(cfg, (SIZE, SIZE, 1), len(NAMES))
    model.fit(normalise(images), labels, epochs=cfg.epochs, batch_size=32, verbose=0)
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        mlflow.log_metric("test_accuracy", 0.99)
        info = log_image_model(
            model,
            label_names=NAMES,
            image_shape=(SIZE, SIZE, 1),
            task=CLASSIFICATION,
            input_example_png=encode_png(images[0]),
        )
    registration = register_and_promote(
        info.model_uri,
        run.info.run_id,
        model_name=MODEL,
        alias="champion",
        metric="test_accuracy",
        higher_is_better=True,
        tracking_uri=store.uri,
    )
    return Registered(store, registration.model_uri, run.info.run_id)


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x40 RGB PNG with a bright square: the pyfunc converts it to 16x16 grey."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 90, size=(40, 40, 3)).astype(np.uint8)
    pixels[22:30, 5:13] = (240, 230, 220)
    path = tmp_path_factory.mktemp("images") / "patch sample.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def explained(registered: Registered, patch_file: Path, tmp_path_factory) -> ExplainResult:
    return explain_image(
        patch_file,
        f"models:/{MODEL}@champion",
        out_dir=tmp_path_factory.mktemp("reports"),
        tracking_uri=registered.store.uri,
    )


def test_the_numbers_are_the_pyfunc_models_own(
    registered: Registered, patch_file: Path, explained: ExplainResult
) -> None:
    data = patch_file.read_bytes()
    pyfunc = mlflow.pyfunc.load_model(registered.model_uri)
    row = pyfunc.predict(pd.DataFrame({"image": [data]})).iloc[0]
    numbers = json.loads(json.dumps(explained.to_dict()))  # what --json prints
    assert numbers["model_uri"] == registered.model_uri == f"models:/{MODEL}/1"
    assert numbers["model_name"] == MODEL and numbers["model_version"] == "1"
    assert list(numbers["probabilities"]) == numbers["label_names"] == NAMES
    assert list(numbers["probabilities"].values()) == pytest.approx(row["probabilities"], abs=1e-7)
    assert numbers["predicted_label"] == row["predicted_label"] == NAMES[1]
    assert numbers["probability"] == pytest.approx(row["probability"], abs=1e-7)

    # The maps and activations come from the same pixels as predict's.
    keras_model = pyfunc.unwrap_python_model().model
    x = normalise(to_pixels(data, SIZE, 1)[np.newaxis])
    assert numbers["saliency_peak"] == list(peak(saliency(keras_model, x, 1)[0]))
    assert numbers["grad_cam_layer"] == "conv2"
    assert numbers["grad_cam_peak"] == list(peak(grad_cam(keras_model, x, 1)[0]))
    # The square covers rows 22-29, columns 5-12 of 40: rows 8-12, columns 1-5 of 16.
    row_, col = numbers["grad_cam_peak"]
    assert 7 <= row_ <= 13 and 0 <= col <= 6
    layers = activation_layers(keras_model)
    maps = layer_outputs(keras_model, [layer.name for layer in layers], x)
    assert [a["name"] for a in numbers["activations"]] == ["conv1", "conv2", "pool1"]
    for entry, values in zip(numbers["activations"], maps, strict=True):
        assert entry["output_shape"] == list(values.shape[1:])
        assert entry["min"] == pytest.approx(float(values.min()), abs=1e-6)
        assert entry["max"] == pytest.approx(float(values.max()), rel=1e-5)
        assert entry["mean"] == pytest.approx(float(values.mean()), rel=1e-5)


def test_the_page_is_one_self_contained_file(explained: ExplainResult) -> None:
    assert explained.page.name == "explain-patch-sample.html"
    page = explained.page.read_text()
    assert "http://" not in page and "https://" not in page
    assert not _SRC_HREF.search(page) and "<script" not in page.lower()
    sources = _IMG_SRC.findall(page)
    assert len(sources) == 4  # input, probabilities, attribution, activations
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG"
    for text in (
        "a bright square patch",
        "Class probabilities",
        "Why this label",
        "Grad-CAM",
        "Activations per layer",
        f"models:/{MODEL}/1",
    ):
        assert text in page, text


def test_dlpipe_explain_uses_the_champion_and_the_work_dir(
    registered: Registered, patch_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    settings = [
        "--set",
        f"work_dir={tmp_path}",
        "--set",
        f"mlflow.tracking_uri={registered.store.uri}",
        "--set",
        f"mlflow.model_name={MODEL}",
    ]
    assert cli.main(["explain", str(patch_file), *settings]) == 0
    human = capsys.readouterr().out
    assert "predicted: a bright square patch" in human and "conv2" in human
    assert cli.main(["explain", str(patch_file), *settings, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model_uri"] == f"models:/{MODEL}/1"
    assert Path(result["page"]) == tmp_path / "reports" / "explain-patch-sample.html"
    assert result["predicted_label"] == NAMES[1]


def test_bad_inputs_are_one_line_user_errors(
    registered: Registered, patch_file: Path, tmp_path: Path
) -> None:
    uri = registered.store.uri
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG file")
    cases = [
        (tmp_path / "missing.png", f"models:/{MODEL}@champion", "no image file"),
        (bad, f"models:/{MODEL}@champion", "cannot read image .*broken.png: not an image"),
        (patch_file, "models:/no-such-model@champion", "registered model no-such-model"),
        (patch_file, f"models:/{MODEL}@nobody", "no model version with alias nobody"),
        (patch_file, "runs:/0123456789abcdef/model", "cannot load model runs:/0123"),
        (patch_file, str(tmp_path / "no-model-here"), "cannot load model"),
    ]
    for image, model, message in cases:
        with pytest.raises(UserError, match=message) as info:
            explain_image(image, model, out_dir=tmp_path, tracking_uri=uri)
        assert "\n" not in str(info.value), str(info.value)
    assert not list(tmp_path.glob("explain-*.html"))


def test_a_model_without_convolution_gets_saliency_only(
    store: TrackingStore, patch_file: Path, tmp_path: Path
) -> None:
    images, labels = _patches(100, 3)
    cfg = TrainConfig(model="mlp", hidden_units=16, epochs=1, learning_rate=0.002, seed=2)
    model = build_model(cfg, (SIZE, SIZE, 1), len(NAMES))
    model.fit(normalise(images), labels, epochs=1, batch_size=32, verbose=0)
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        log_image_model(
            model,
            label_names=NAMES,
            image_shape=(SIZE, SIZE, 1),
            task=CLASSIFICATION,
            input_example_png=encode_png(images[0]),
        )
    uri = f"runs:/{run.info.run_id}/model"  # not registered: a run's model works too
    result = explain_image(patch_file, uri, out_dir=tmp_path, tracking_uri=store.uri)
    assert result.model_uri == uri and result.model_version is None
    assert result.grad_cam_layer is None and result.grad_cam_peak is None
    assert result.saliency_peak is not None and result.activations == []
    page = result.page.read_text()
    assert "saliency only, no Grad-CAM" in page and "no convolution or pooling layers" in page
    assert len(_IMG_SRC.findall(page)) == 3  # input, probabilities, saliency


@needs_chromium
def test_the_page_renders_in_headless_chromium(explained: ExplainResult, tmp_path: Path) -> None:
    shot, console = screenshot(explained.page, tmp_path, window=(1200, 2000))
    assert console == []
    assert shot.is_file()
    shutil.copyfile(shot, SCREENSHOT)
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank page
