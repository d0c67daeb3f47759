"""Transfer learning: Keras Applications backbones, pretrained weights files, freezing, users'
models. Real TensorFlow, tiny backbones (MobileNetV2 alpha 0.35 at 32 px), no downloads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipelines.backbones import (
    BACKBONE_LAYER,
    CustomModelError,
    PretrainedWeightsError,
    unfreeze,
)
from pipelines.config import FineTuneConfig, TrainConfig
from pipelines.keras_api import keras
from pipelines.model_layers import leaf_layers, moving_statistics
from pipelines.models import build_model
from pipelines.warm_start import WarmStartError, warm_start

SIZE = 32
CLASSES = 4


def cfg_for(model: str = "mobilenet_v2", frozen: int = 0, **changes: object) -> TrainConfig:
    changes = {"backbone_alpha": 0.35, **changes}
    fine_tune = FineTuneConfig(frozen_epochs=frozen, unfreeze_top=0)
    return dataclasses.replace(TrainConfig(), model=model, fine_tune=fine_tune, **changes)


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB images whose class is the orientation of their stripes (colour and phase random)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    directions = [(1, 0), (0, 1), (0.7, 0.7), (0.7, -0.7)]
    images = []
    for label in labels:
        dy, dx = directions[int(label)]
        wave = np.sin(rng.uniform(0.5, 0.9) * (dy * yy + dx * xx) + rng.uniform(0, 6.3))
        image = (0.5 + 0.5 * wave)[..., None] * rng.uniform(0.2, 1, 3)
        images.append(np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1))
    return np.asarray(images, np.float32), labels


@pytest.fixture(scope="module")
def task() -> dict[str, np.ndarray]:
    x, y = stripes(512, 0)
    x_test, y_test = stripes(256, 1)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="module")
def weights_file(task, tmp_path_factory) -> Path:
    """Backbone weights pretrained here on the stripes, saved as a weights file."""
    k = keras()
    source = build_model(cfg_for(learning_rate=0.002), (SIZE, SIZE, 3), CLASSES)
    source.fit(task["x"], task["y"], epochs=4, batch_size=32, verbose=0)
    backbone = source.get_layer(BACKBONE_LAYER)
    # MobileNetV2's batch norm moves its statistics by 0.1 % a step: set them from one
    # large batch, as a long pretraining would have.
    for _, layer in leaf_layers(backbone):
        if isinstance(layer, k.layers.BatchNormalization):
            layer.momentum = 0.0
    backbone(source.get_layer("preprocess")(task["x"]), training=True)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35_stripes.h5"
    backbone.save_weights(str(path))
    return path


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    keras().backend.clear_session()


@pytest.mark.parametrize(
    ("name", "preprocess"),
    [
        ("mobilenet_v2", "mobilenet_v2"),
        ("efficientnet_b0", "efficientnet"),
        ("resnet50", "resnet50"),
    ],
)
def test_each_backbone_takes_images_in_0_1_and_preprocesses_them_itself(name, preprocess):
    k = keras()
    model = build_model(cfg_for(name), (SIZE, SIZE, 3), CLASSES)
    names = [layer.name for layer in model.layers]
    assert names == ["image", "preprocess", BACKBONE_LAYER, "embedding", "dropout", "predictions"]
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    assert model.predict(x, verbose=0).shape == (2, CLASSES)
    # The first layer maps [0, 1] pixels to what Keras' own preprocess_input makes of 0-255.
    expected = getattr(k.applications, preprocess).preprocess_input(x * 255.0)
    mine = model.get_layer("preprocess")(x).numpy()
    np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-3)


def test_grey_images_are_repeated_into_three_channels():
    model = build_model(cfg_for(), (SIZE, SIZE, 1), CLASSES)
    x = np.random.default_rng(0).random((1, SIZE, SIZE, 1), dtype=np.float32)
    out = model.get_layer("preprocess")(x).numpy()
    np.testing.assert_allclose(out, np.repeat(x * 2 - 1, 3, axis=-1), atol=1e-6)


def test_too_small_images_fail_clearly():
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model(cfg_for(), (28, 28, 3), CLASSES)


def test_a_weights_file_is_loaded_and_raises_the_starting_accuracy(task, weights_file):
    """One epoch of the head on the frozen backbone: pretrained features beat random ones."""
    accuracy = {}
    for pretrained in ("none", str(weights_file)):
        model = build_model(
            cfg_for(frozen=1, pretrained=pretrained, learning_rate=0.01), (SIZE, SIZE, 3), 4
        )
        model.fit(task["x"], task["y"], epochs=1, batch_size=32, verbose=0)
        accuracy[pretrained] = model.evaluate(task["x_test"], task["y_test"], verbose=0)[1]
        keras().backend.clear_session()
    model = build_model(cfg_for(pretrained=str(weights_file)), (SIZE, SIZE, 3), CLASSES)
    saved = keras().models.clone_model(model.get_layer(BACKBONE_LAYER))
    saved.load_weights(str(weights_file))
    for mine, theirs in zip(model.get_layer(BACKBONE_LAYER).weights, saved.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert accuracy[str(weights_file)] > accuracy["none"] + 0.1, accuracy


def test_frozen_backbone_and_its_batch_norm_do_not_move(task, weights_file):
    model = build_model(cfg_for(frozen=1, pretrained=str(weights_file)), (SIZE, SIZE, 3), 4)
    backbone = model.get_layer(BACKBONE_LAYER)
    before = [np.asarray(w).copy() for w in backbone.weights]  # moving statistics included
    head = model.get_layer("predictions").get_weights()[0].copy()
    model.fit(task["x"][:64], task["y"][:64], epochs=1, batch_size=32, verbose=0)
    for old, new in zip(before, backbone.weights, strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))
    assert not np.array_equal(head, model.get_layer("predictions").get_weights()[0])
    assert moving_statistics(model) == []  # frozen: nothing for the ranks to average


def test_unfreezing_the_top_layers_trains_only_them(task, weights_file):
    from pipelines.models import compile_model

    cfg = cfg_for(frozen=1, pretrained=str(weights_file))
    model = build_model(cfg, (SIZE, SIZE, 3), CLASSES)
    backbone = model.get_layer(BACKBONE_LAYER)
    assert unfreeze(model, 10) == 10
    compile_model(model, cfg, None, 0.01)
    layers = backbone.layers
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in layers}
    model.fit(task["x"][:64], task["y"][:64], epochs=1, batch_size=32, verbose=0)
    moved = {
        layer.name
        for layer in layers
        if any(
            not np.array_equal(a, b)
            for a, b in zip(before[layer.name], layer.get_weights(), strict=True)
        )
    }
    top = {layer.name for layer in layers[-10:]}
    assert moved and moved <= top
    # Batch norm stays in inference mode once unfrozen: its statistics do not move.
    norm = keras().layers.BatchNormalization
    for layer in layers[-10:]:
        if isinstance(layer, norm):
            for old, new in zip(before[layer.name][2:], layer.get_weights()[2:], strict=True):
                np.testing.assert_array_equal(old, new)  # moving mean and variance


def test_a_missing_or_wrong_weights_file_is_one_line(tmp_path, weights_file):
    with pytest.raises(PretrainedWeightsError, match="no weights file") as info:
        build_model(cfg_for(pretrained=str(tmp_path / "nope.h5")), (SIZE, SIZE, 3), CLASSES)
    assert "\n" not in str(info.value)
    wider = cfg_for(pretrained=str(weights_file), backbone_alpha=0.5)
    with pytest.raises(PretrainedWeightsError, match="does not fit mobilenet_v2"):
        build_model(wider, (SIZE, SIZE, 3), CLASSES)


def test_imagenet_without_internet_or_cache_says_how_to_pre_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty Keras cache
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # refused at once
    with pytest.raises(PretrainedWeightsError, match=r"~/.keras/models") as info:
        build_model(cfg_for(pretrained="imagenet"), (SIZE, SIZE, 3), CLASSES)
    assert "\n" not in str(info.value)


def test_a_users_function_is_the_model():
    model = build_model(cfg_for("tests.models.custom_nets:tiny"), (SIZE, SIZE, 3), CLASSES)
    assert model.name == "tiny"
    assert model.loss == "sparse_categorical_crossentropy"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tests.models.no_such_module:tiny", "cannot import it"),
        ("tests.models.custom_nets:nothing", "cannot import it"),
        ("tests.models.custom_nets:wrong_classes", r"give \(None, 4\)"),
        ("tests.models.custom_nets:not_a_model", "not a Keras model"),
    ],
)
def test_a_broken_users_function_is_one_line(name, match):
    with pytest.raises(CustomModelError, match=match) as info:
        build_model(cfg_for(name), (SIZE, SIZE, 3), CLASSES)
    assert "\n" not in str(info.value)


def test_warm_start_copies_matching_layers_and_keeps_a_new_head(tmp_path):
    old = build_model(cfg_for(seed=1), (SIZE, SIZE, 3), CLASSES)
    path = tmp_path / "old.h5"
    old.save(str(path), save_format="h5")
    new = build_model(cfg_for(seed=2), (SIZE, SIZE, 3), CLASSES + 1)
    copied, kept = warm_start(new, str(path), "models:/old@champion")
    assert kept == ["predictions"]
    assert f"{BACKBONE_LAYER}/Conv1" in copied
    np.testing.assert_array_equal(
        old.get_layer(BACKBONE_LAYER).get_weights()[0],
        new.get_layer(BACKBONE_LAYER).get_weights()[0],
    )
    other = build_model(dataclasses.replace(TrainConfig(), model="mlp"), (8, 8, 1), 3)
    with pytest.raises(WarmStartError, match="no layer"):
        warm_start(other, str(path), "models:/old@champion")


def test_the_photos_preset_builds_and_fine_tunes_its_backbone():
    from pipelines.config import load_config

    cfg = dataclasses.replace(load_config("photos").train, pretrained="none")  # no download
    model = build_model(cfg, (224, 224, 3), 5)
    backbone = model.get_layer(BACKBONE_LAYER)
    assert not backbone.trainable  # the frozen first phase
    assert unfreeze(model, cfg.fine_tune.unfreeze_top) == cfg.fine_tune.unfreeze_top
    assert len(backbone.layers) - cfg.fine_tune.unfreeze_top == 100  # Keras' guide's cut


def test_a_fine_tuned_mixed_precision_backbone_saves_as_its_float32_twin():
    """The twin is built frozen; the trained model is unfrozen: weights still go layer to layer."""
    from pipelines.models import as_float32, compile_model

    k = keras()
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        cfg = cfg_for(frozen=1, use_gpu="auto", mixed_precision=True)
        model = build_model(cfg, (SIZE, SIZE, 3), CLASSES)
        unfreeze(model, 10)
        compile_model(model, cfg, None, 0.01)
        x, y = stripes(16, 2)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        twin = as_float32(model, cfg, (SIZE, SIZE, 3), CLASSES)
    finally:
        k.mixed_precision.set_global_policy("float32")
    assert twin.dtype_policy.name == "float32"
    theirs = dict(leaf_layers(twin))
    for path, mine in leaf_layers(model):
        if not mine.weights:
            continue
        for a, b in zip(mine.get_weights(), theirs[path].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=path)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=2e-2)
