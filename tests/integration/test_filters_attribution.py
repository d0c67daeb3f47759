"""Filter top-k crops and attribution maps on real tiny Keras models.

The known-answer set: 16x16 grey noise, and in the ``patch`` class one bright 3x3 square at
a random place (``plain`` has none). A small convnet (the zoo's ``mnist_cnn``) learns it in a
few epochs; a tenth of the test labels are flipped so that there are mistakes to show. The
numbers are checked against the model's own layer outputs and gradients, and the maps against
where the patch really is.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.images import normalise
from pipelines.keras_api import keras
from pipelines.models import build_model
from pipelines.report.attribution import (
    grad_cam,
    peak,
    pick_examples,
    saliency,
    score_kind,
    write_attribution,
)
from pipelines.report.filters import (
    CSV_HEADER,
    crop,
    filter_topk,
    receptive_fields,
    write_filter_topk,
)
from pipelines.report.numeric import most_confident_errors
from pipelines.report.probe import layer_outputs
from tests.unit.test_plot_text_fits import assert_text_fits

SIZE = 16
PATCH = 3
NAMES = ["plain", "patch"]
#: Where the figures are copied for a person to look at.
LOOK = Path("/tmp")


@dataclass(frozen=True)
class Patches:
    images: np.ndarray  # uint8 (N, 16, 16, 1)
    labels: np.ndarray  # true classes (1 = a patch), possibly flipped
    truth: np.ndarray  # the classes as drawn (before any flip)
    corners: np.ndarray  # (N, 2) top-left of the patch (meaningful where truth == 1)


def make_patches(n: int, seed: int, flip: float = 0.0) -> Patches:
    """Noise; every other image gets a bright square at a random place (its class)."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, SIZE, SIZE, 1))
    corners = rng.integers(1, SIZE - PATCH, size=(n, 2))
    for i in np.flatnonzero(truth == 1):
        r, c = corners[i]
        images[i, r : r + PATCH, c : c + PATCH, 0] = 230
    flipped = rng.random(n) < flip
    labels = np.where(flipped, 1 - truth, truth)
    return Patches(images.astype(np.uint8), labels.astype(np.int64), truth, corners)


@dataclass(frozen=True)
class Trained:
    model: object
    test: Patches
    x: np.ndarray
    probabilities: np.ndarray


@pytest.fixture(scope="module")
def convnet() -> Trained:
    train = make_patches(600, 1)
    cfg = TrainConfig(model="mnist_cnn", activation="relu", epochs=4, learning_rate=0.002, seed=5)
    model = build_model(cfg, (SIZE, SIZE, 1), len(NAMES))
    model.fit(normalise(train.images), train.labels, epochs=cfg.epochs, batch_size=32, verbose=0)
    test = make_patches(80, 2, flip=0.1)
    x = normalise(test.images)
    return Trained(model, test, x, model.predict(x, verbose=0))


@pytest.fixture(scope="module")
def mlp() -> Trained:
    train = make_patches(200, 3)
    cfg = TrainConfig(model="mlp", hidden_units=16, epochs=1, learning_rate=0.002, seed=5)
    model = build_model(cfg, (SIZE, SIZE, 1), len(NAMES))
    model.fit(normalise(train.images), train.labels, epochs=1, batch_size=32, verbose=0)
    test = make_patches(30, 4, flip=0.2)
    x = normalise(test.images)
    return Trained(model, test, x, model.predict(x, verbose=0))


def _distance(point: tuple[int, int] | None, corner: np.ndarray) -> int:
    """Chebyshev distance in pixels from ``point`` to the patch (0 inside it)."""
    assert point is not None
    (r, c), (top, left) = point, corner
    rows = max(top - r, 0, r - (top + PATCH - 1))
    cols = max(left - c, 0, c - (left + PATCH - 1))
    return max(rows, cols)


# --- receptive fields and top-k ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet5", "mnist_cnn", "resnet_small", "autoencoder"])
def test_receptive_fields_are_exactly_the_pixels_a_unit_sees(name: str) -> None:
    """Each field's box equals the support of the unit's input gradient (tanh: never dead)."""
    import tensorflow as tf

    model = build_model(TrainConfig(model=name, activation="tanh", seed=1), (SIZE, SIZE, 1), 2)
    fields = receptive_fields(model)
    x = tf.constant(np.random.default_rng(0).random((1, SIZE, SIZE, 1), dtype=np.float32))
    checked = 0
    for layer in model.layers:
        if layer.name not in fields or len(layer.output.shape) != 4 or layer.name == "image":
            continue
        probe = keras().Model(model.inputs, layer.output)
        height, width = layer.output.shape[1:3]
        for row, col in [(0, 0), (height // 2, width // 2), (height - 1, width - 1)]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                unit = tf.reduce_sum(probe(x, training=False)[0, row, col, :])
            rows, cols = np.nonzero(tape.gradient(unit, x).numpy()[0, :, :, 0])
            seen = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
            assert fields[layer.name].box(row, col, SIZE, SIZE) == seen, (layer.name, row, col)
            checked += 1
    assert checked >= 6
    if name == "autoencoder":  # after the dense bottleneck every unit sees the whole image
        assert "reconstruction" not in fields and "conv2" in fields


def test_grad_cam_defaults_to_the_deepest_convolution() -> None:
    from pipelines.report.attribution import last_conv_layer

    resnet = build_model(TrainConfig(model="resnet_small", seed=1), (SIZE, SIZE, 1), 2)
    # The shortcut comes later in model.layers but is shallower than the block's conv2.
    names = [layer.name for layer in resnet.layers]
    assert names.index("stage3_block1_shortcut") > names.index("stage3_block1_conv2")
    assert last_conv_layer(resnet) == "stage3_block1_conv2"
    lenet = build_model(TrainConfig(model="lenet5", seed=1), (SIZE, SIZE, 1), 2)
    assert last_conv_layer(lenet) == "conv2"


def test_first_conv_crops_are_the_kernel_size(convnet: Trained) -> None:
    conv1 = convnet.model.get_layer("conv1")
    field = receptive_fields(convnet.model)["conv1"]
    assert field.size == tuple(conv1.kernel_size) == (3, 3) and field.stride == (1, 1)
    (first, *_), _ = filter_topk(convnet.model, convnet.x, k=4)
    assert first.name == "conv1"
    for f, r in np.ndindex(*first.index.shape):
        image = convnet.test.images[first.index[f, r]]
        tile = crop(image, field, int(first.row[f, r]), int(first.col[f, r]))
        top, left, bottom, right = field.box(int(first.row[f, r]), int(first.col[f, r]), 16, 16)
        assert tile.shape == (3, 3, 1) and (bottom - top, right - left) == (3, 3)
        np.testing.assert_allclose(tile, image[top:bottom, left:right] / 255.0)

    # 'same' padding: a field at the border is clipped, its tile padded back to 5x5.
    lenet = build_model(TrainConfig(model="lenet5", seed=1), (SIZE, SIZE, 1), 2)
    same = receptive_fields(lenet)["conv1"]
    assert same.size == (5, 5) and same.box(0, 0, 16, 16) == (0, 0, 3, 3)
    tile = crop(convnet.test.images[0], same, 0, 0)
    assert tile.shape == (5, 5, 1) and np.isnan(tile[:2]).all() and np.isnan(tile[:, :2]).all()
    np.testing.assert_allclose(tile[2:, 2:], convnet.test.images[0][:3, :3] / 255.0)


def test_topk_agrees_with_the_models_layer_outputs(convnet: Trained) -> None:
    k = 5
    layers, skipped = filter_topk(convnet.model, convnet.x, k=k, batch_size=32)  # 3 batches
    assert [t.name for t in layers] == ["conv1", "conv2"] and skipped == []
    maps = layer_outputs(convnet.model, [t.name for t in layers], convnet.x)
    for topk, values in zip(layers, maps, strict=True):
        assert topk.output_shape == values.shape[1:]
        peaks = values.max(axis=(1, 2))  # (N, filters)
        for f in range(values.shape[3]):
            expected = np.sort(peaks[:, f])[::-1][:k]
            np.testing.assert_allclose(topk.peak[f], expected, rtol=1e-5, atol=1e-6)
            assert np.all(np.diff(topk.peak[f]) <= 0)  # best first
            chosen = topk.index[f]
            assert len(set(chosen.tolist())) == k
            np.testing.assert_allclose(peaks[chosen, f], topk.peak[f], rtol=1e-5, atol=1e-6)
            # The location is where that image's map reaches its peak.
            at = values[chosen, topk.row[f], topk.col[f], f]
            np.testing.assert_allclose(at, topk.peak[f], rtol=1e-5, atol=1e-6)


def test_write_filter_topk_writes_grids_json_and_csv(convnet: Trained, tmp_path: Path) -> None:
    result = write_filter_topk(tmp_path, convnet.model, convnet.test.images, convnet.x, k=9)
    assert result == {"filters_topk": {"layers": ["conv1", "conv2"], "k": 9}}
    data = json.loads((tmp_path / "filters_topk.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2"]
    conv2 = data["layers"][1]
    assert conv2["receptive_field"] == {"size": [5, 5], "stride": [1, 1], "offset": [0, 0]}
    assert conv2["filters"] == 64 and conv2["drawn"] == 32 and len(conv2["topk"]) == 64
    with (tmp_path / "filters_topk.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_HEADER
    assert len(rows) == (32 + 64) * 9
    for row in rows[:20]:  # the CSV repeats the JSON
        entry = data["layers"][0]["topk"][int(row["filter"])][int(row["rank"]) - 1]
        assert int(row["index"]) == entry["index"] and float(row["peak"]) == entry["peak"]
        assert [int(row[k]) for k in ("top", "left", "bottom", "right")] == entry["box"]
    for name in ("conv1", "conv2"):
        with Image.open(tmp_path / f"filters_topk_{name}.png") as image:
            assert image.format == "PNG" and min(image.size) > 300
    shutil.copyfile(tmp_path / "filters_topk_conv2.png", LOOK / "filters_topk_conv2.png")


def test_a_model_without_convolution_gets_a_note(mlp: Trained, tmp_path: Path) -> None:
    result = write_filter_topk(tmp_path, mlp.model, mlp.test.images, mlp.x)
    assert result["filters_topk"]["layers"] == [] and "no convolution" in result["note"]
    assert json.loads((tmp_path / "filters_topk.json").read_text())["layers"] == []
    assert not list(tmp_path.glob("filters_topk_*.png"))


# --- attribution ------------------------------------------------------------------------------


def test_known_answer_saliency_and_grad_cam_peak_on_the_patch(convnet: Trained) -> None:
    test = convnet.test
    predicted = convnet.probabilities.argmax(axis=1)
    right = np.flatnonzero((test.truth == 1) & (predicted == 1))
    assert len(right) >= 30  # the model learned the task (40 patch images)
    x = convnet.x[right]
    sal, cam = saliency(convnet.model, x, 1), grad_cam(convnet.model, x, 1)
    assert sal.shape == cam.shape == (len(right), SIZE, SIZE)
    for j, i in enumerate(right):
        assert _distance(peak(sal[j]), test.corners[i]) <= 1, i
        assert _distance(peak(cam[j]), test.corners[i]) <= 2, i


def _logit_model(model: Any) -> Any:
    """The classifier up to its softmax: the same hidden layers, the head's kernel, no softmax."""
    from pipelines.keras_api import keras

    k = keras()
    head = model.layers[-1]
    z = k.layers.Dense(head.units, name="logits")(head.input)
    logits = k.Model(model.inputs, z)
    logits.get_layer("logits").set_weights(head.get_weights())
    return logits


def test_saliency_is_the_logit_gradient(convnet: Trained) -> None:
    """It equals autodiff of the pre-softmax class score and central finite differences of it."""
    import tensorflow as tf

    logits = _logit_model(convnet.model)
    x = convnet.x[:8]
    classes = convnet.probabilities[:8].argmax(axis=1)
    sal = saliency(convnet.model, x, classes)
    batch = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        z = tf.gather(logits(batch, training=False), classes, axis=1, batch_dims=1)
    plain = np.abs(tape.gradient(z, batch).numpy()).max(axis=-1)
    np.testing.assert_allclose(sal, plain, rtol=1e-4, atol=1e-6 * float(plain.max()))

    image, k = x[:1].astype(np.float64), int(classes[0])
    row, col = peak(sal[0])
    eps = 1e-2
    up, down = image.copy(), image.copy()
    up[0, row, col, 0] += eps
    down[0, row, col, 0] -= eps
    scores = logits.predict(np.concatenate([up, down]).astype(np.float32), verbose=0)
    numeric = abs(scores[0, k] - scores[1, k]) / (2 * eps)
    assert numeric == pytest.approx(float(sal[0, row, col]), rel=0.1)


def test_saliency_of_a_confident_prediction_is_not_zero(convnet: Trained) -> None:
    """Where the softmax saturates, the probability's gradient is ~0; the logit's is not."""
    import tensorflow as tf

    confident = int(np.argmax(convnet.probabilities[:, 1] * (convnet.test.truth == 1)))
    assert convnet.probabilities[confident, 1] > 0.999
    x = convnet.x[confident : confident + 1]
    sal = saliency(convnet.model, x, 1)[0]
    batch = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(batch)
        p = convnet.model(batch, training=False)[:, 1]
    of_probability = np.abs(tape.gradient(p, batch).numpy()).max()
    assert sal.max() > 100 * of_probability
    assert _distance(peak(sal), convnet.test.corners[confident]) <= 1


def test_grad_cam_is_scaled_per_image_on_the_logit(convnet: Trained) -> None:
    assert score_kind(convnet.model) == "logit"
    cam = grad_cam(convnet.model, convnet.x[:10], convnet.probabilities[:10].argmax(axis=1))
    assert cam.min() >= 0 and cam.max() <= 1 + 1e-6
    top = cam.reshape(10, -1).max(axis=1)
    assert np.all((np.abs(top - 1) < 1e-5) | (top == 0))
    first = grad_cam(convnet.model, convnet.x[:10], 1, layer_name="conv1")
    assert first.shape == (10, SIZE, SIZE)


def test_write_attribution_picks_and_summarises(convnet: Trained, tmp_path: Path) -> None:
    test, probs = convnet.test, convnet.probabilities
    result = write_attribution(
        tmp_path, convnet.model, test.images, convnet.x, test.labels, probs, NAMES, n=4
    )
    data = json.loads((tmp_path / "attribution.json").read_text())
    mistakes, correct = pick_examples(test.labels, probs, 4)
    np.testing.assert_array_equal(mistakes, most_confident_errors(test.labels, probs, 4))
    assert len(mistakes) >= 2 and len(correct) == 4
    assert [e["index"] for e in data["images"]] == [*mistakes.tolist(), *correct.tolist()]
    assert result["attribution"]["grad_cam_layer"] == data["grad_cam_layer"] == "conv2"
    assert "note" not in result
    shown_probs = [e["probability"] for e in data["images"] if e["correct"]]
    assert shown_probs == sorted(shown_probs, reverse=True)
    predicted = probs.argmax(axis=1)
    sal = saliency(convnet.model, convnet.x[mistakes], predicted[mistakes])
    cam = grad_cam(convnet.model, convnet.x[mistakes], predicted[mistakes])
    for j, entry in enumerate(data["images"][: len(mistakes)]):
        i = entry["index"]
        assert not entry["correct"] and entry["true"] == NAMES[test.labels[i]]
        assert entry["predicted"] == NAMES[predicted[i]]
        assert entry["probability"] == pytest.approx(probs[i].max())
        assert entry["saliency"]["peak"] == list(peak(sal[j]))
        assert entry["saliency"]["max"] == pytest.approx(float(sal[j].max()), rel=1e-5)
        assert entry["grad_cam"]["peak"] == list(peak(cam[j]))
    with Image.open(tmp_path / "attribution.png") as image:
        assert image.format == "PNG" and min(image.size) > 300
    shutil.copyfile(tmp_path / "attribution.png", LOOK / "attribution.png")


def test_attribution_without_convolution_is_saliency_only(mlp: Trained, tmp_path: Path) -> None:
    result = write_attribution(
        tmp_path, mlp.model, mlp.test.images, mlp.x, mlp.test.labels, mlp.probabilities, NAMES
    )
    assert "saliency only" in result["note"] and result["attribution"]["grad_cam_layer"] is None
    data = json.loads((tmp_path / "attribution.json").read_text())
    assert data["images"] and all(e["grad_cam"] is None for e in data["images"])
    assert all(e["saliency"]["max"] > 0 for e in data["images"])
    assert (tmp_path / "attribution.png").is_file()
    with pytest.raises(ValueError, match="no Conv2D"):
        grad_cam(mlp.model, mlp.x[:2], 0)


# --- every text fits its panel ----------------------------------------------------------------

LONG = "a class name far too long for any panel title"


def _entries(count: int, correct: bool, name: str) -> list[dict]:
    summary = {"peak": [3, 4], "max": 1.0, "mean": 0.1}
    return [
        {
            "index": 1000 + i,
            "true": f"{name} {i}",
            "predicted": f"{name} {i + 1}" if not correct else f"{name} {i}",
            "probability": 0.999,
            "correct": correct,
            "saliency": summary,
            "grad_cam": summary,
        }
        for i in range(count)
    ]


def _topk_figure(k: int, filters: int, name: str) -> object:
    from pipelines.report.filters import LayerTopK, ReceptiveField, plot_filter_topk

    rng = np.random.default_rng(k)
    shape = (filters, k)
    topk = LayerTopK(
        name=name,
        output_shape=(12, 12, filters),
        field=ReceptiveField((5, 5), (1, 1), (0, 0)),
        index=rng.integers(0, 10, size=shape),
        peak=np.sort(rng.random(shape))[:, ::-1] * (np.arange(filters)[:, None] % 5 > 0),
        row=rng.integers(0, 12, size=shape),
        col=rng.integers(0, 12, size=shape),
    )
    return plot_filter_topk(make_patches(10, 0).images, topk)


def _attribution_figure(mistakes: int, correct: int, cam: bool, name: str) -> object:
    from pipelines.report.attribution import plot_attribution

    entries = _entries(mistakes, False, name) + _entries(correct, True, name)
    rng = np.random.default_rng(0)
    maps = rng.random((len(entries), SIZE, SIZE))
    images = make_patches(len(entries), 0).images
    layer = "stage3_block1_conv2_with_a_long_name"
    return plot_attribution(images, entries, maps, maps if cam else None, layer, 1234)


def _explanation_figure(cam: bool, name: str) -> object:
    from pipelines.report.attribution import plot_explanation

    rng = np.random.default_rng(0)
    maps = rng.random((SIZE, SIZE))
    layer = "stage3_block1_conv2_with_a_long_name"
    return plot_explanation(
        make_patches(1, 0).images[0], maps * 1e-3, maps if cam else None, layer, name
    )


def _probabilities_figure(k: int, name: str) -> object:
    from pipelines.report.attribution import plot_probabilities

    probs = np.full(k, 0.5 / (k - 1))
    probs[k // 2] = 0.5
    return plot_probabilities([f"{name} {i}" for i in range(k)], probs.tolist(), k // 2)


def _layer_maps_figure() -> object:
    from pipelines.explain import plot_layer_maps

    rng = np.random.default_rng(0)
    shapes = [(14, 14, 32), (12, 12, 64), (6, 6, 64), (1, 1, 3)]
    infos = [
        {"name": f"block_with_a_long_name_{i}" * 2, "type": "Conv2D", "output_shape": list(s)}
        | {"min": -0.000123, "max": 123.456}
        for i, s in enumerate(shapes)
    ]
    return plot_layer_maps(infos, [rng.random(s) for s in shapes])


@pytest.mark.parametrize(
    "draw",
    [
        lambda: _topk_figure(1, 1, "conv1"),
        lambda: _topk_figure(9, 32, "stage3_block1_shortcut_with_a_long_layer_name"),
        lambda: _attribution_figure(1, 1, True, "x"),
        lambda: _attribution_figure(8, 8, True, LONG),
        lambda: _attribution_figure(0, 3, False, LONG),
        lambda: _explanation_figure(True, LONG),
        lambda: _explanation_figure(False, "0"),
        lambda: _probabilities_figure(2, "0"),
        lambda: _probabilities_figure(12, LONG),
        _layer_maps_figure,
    ],
    ids=[
        "topk-1x1",
        "topk-9x32-long",
        "attribution-1+1",
        "attribution-8+8-long",
        "attribution-mlp",
        "explanation-long",
        "explanation-mlp",
        "probabilities-2",
        "probabilities-12-long",
        "layer-maps",
    ],
)
def test_every_text_fits_its_panel(draw) -> None:
    assert_text_fits(draw())
