"""Model zoo and the Keras import seam: real TensorFlow, tiny models and data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from pipelines.config import TrainConfig
from pipelines.keras_api import _check_keras_version, keras, keras_version
from pipelines.models import (
    MODEL_NAMES,
    build_model,
    make_optimizer,
    model_summary,
)
from pipelines.tasks import CLASSIFICATION, RECONSTRUCTION, task_for_model

CLASSIFIERS = tuple(name for name in MODEL_NAMES if name != "autoencoder")
SHAPES = ((28, 28, 1), (32, 32, 3))
NUM_CLASSES = 10


def cfg_for(model: str, **changes: object) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), model=model, **changes)


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    keras().backend.clear_session()


def kernel_layers(model):
    k = keras()
    kinds = (k.layers.Conv2D, k.layers.Dense)  # Conv2DTranspose is a Conv2D
    return [layer for layer in model.layers if isinstance(layer, kinds)]


# --- keras_api ----------------------------------------------------------------------------


def test_keras_is_keras_2_and_cached():
    k = keras()
    assert keras_version(k).startswith("2.")
    assert k is keras()
    assert hasattr(k.optimizers, "legacy")


@pytest.mark.parametrize("version", ["3.1.0", "3.0.0rc1", "1.2.2", "unknown", ""])
def test_keras_version_check_rejects_anything_but_keras_2(version):
    with pytest.raises(RuntimeError, match="needs Keras 2"):
        _check_keras_version(version)


@pytest.mark.parametrize("version", ["2.15.0", "2.16.1", "2.15.0-tf"])
def test_keras_version_check_accepts_keras_2(version):
    _check_keras_version(version)


def test_importing_models_does_not_import_tensorflow():
    code = "import sys, pipelines.models; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- shapes and training --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_and_loss_goes_down(name, shape):
    rng = np.random.RandomState(0)
    cfg = cfg_for(name, learning_rate=0.003)
    model = build_model(cfg, shape, NUM_CLASSES)
    if not task_for_model(name).uses_labels:
        assert model.output_shape == (None, *shape)
        prototypes = (rng.rand(4, *shape) > 0.5).astype("float32")
        x = prototypes[np.arange(32) % 4]
        y = x
    else:
        assert model.output_shape == (None, NUM_CLASSES)
        x = rng.rand(32, *shape).astype("float32")
        y = np.arange(32) % NUM_CLASSES
    history = model.fit(x, y, batch_size=32, epochs=25, verbose=0).history
    losses = history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    metric = task_for_model(name).metric
    assert set(history) == {"loss", metric}


def test_classifier_outputs_are_probabilities():
    model = build_model(cfg_for("mlp"), (28, 28, 1), NUM_CLASSES)
    probs = model.predict(np.random.RandomState(1).rand(4, 28, 28, 1), verbose=0)
    assert probs.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_autoencoder_metrics_and_validation_keys():
    model = build_model(cfg_for("autoencoder"), (28, 28, 1), NUM_CLASSES)
    x = np.random.RandomState(2).rand(8, 28, 28, 1).astype("float32")
    history = model.fit(x, x, validation_data=(x, x), epochs=1, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "reconstruction_error", "val_loss", "val_reconstruction_error"}
    out = model.predict(x, verbose=0)
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0  # sigmoid
    assert set(model.evaluate(x, x, verbose=0, return_dict=True)) == {
        "loss",
        "reconstruction_error",
    }


@pytest.mark.parametrize(
    ("shape", "variant_layer"), [((28, 28, 1), "conv1"), ((10, 10, 1), "encoder1")]
)
def test_autoencoder_latent_layer(shape, variant_layer):
    model = build_model(cfg_for("autoencoder", latent_dim=7), shape, NUM_CLASSES)
    assert model.get_layer("latent").output_shape == (None, 7)
    model.get_layer(variant_layer)  # convolutional when H, W divide by 4, dense otherwise
    assert model.output_shape == (None, *shape)


# --- what a report relies on ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_have_an_embedding_layer(name):
    k = keras()
    cfg = cfg_for(name, hidden_units=24)
    model = build_model(cfg, (28, 28, 1), NUM_CLASSES)
    embed = k.Model(model.input, model.get_layer("embedding").output)
    out = embed.predict(np.zeros((2, 28, 28, 1), "float32"), verbose=0)
    assert out.ndim == 2 and out.shape[0] == 2
    assert model.layers[-1].name == "predictions"
    if name == "mlp":
        assert out.shape[1] == 24


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lenet5", ["conv1", "pool1", "conv2", "pool2"]),
        ("mnist_cnn", ["conv1", "conv2", "pool1"]),
        ("resnet_small", ["conv1", "stage1_block1_conv1", "stage3_block1_conv2"]),
        ("autoencoder", ["conv1", "pool1", "conv2", "pool2", "latent", "reconstruction"]),
    ],
)
def test_layer_names_for_activation_views(name, expected):
    model = build_model(cfg_for(name), (28, 28, 1), NUM_CLASSES)
    names = [layer.name for layer in model.layers]
    assert [n for n in names if n in expected] == expected


@pytest.mark.parametrize("name", ["resnet_small", "autoencoder"])
def test_saved_model_reloads_without_custom_objects(name, tmp_path):
    model = build_model(cfg_for(name, weight_decay=1e-4), (28, 28, 1), NUM_CLASSES)
    x = np.random.RandomState(3).rand(2, 28, 28, 1).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    again = keras().models.load_model(path)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0))


def test_input_shape_accepts_numpy_ints():
    shape = tuple(np.array([28, 28, 1]))
    assert build_model(cfg_for("mlp"), shape, NUM_CLASSES).input_shape == (None, 28, 28, 1)


def test_model_summary_is_text():
    model = build_model(cfg_for("lenet5"), (28, 28, 1), NUM_CLASSES)
    text = model_summary(model)
    assert 'Model: "lenet5"' in text
    assert "embedding" in text and "Total params" in text


# --- config reaches the model ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_activation_from_config(activation):
    k = keras()
    fn = k.activations.get(activation)
    mlp = build_model(cfg_for("mlp", activation=activation), (28, 28, 1), NUM_CLASSES)
    assert mlp.get_layer("dense1").activation is fn
    assert mlp.get_layer("embedding").activation is fn
    assert mlp.get_layer("predictions").activation is k.activations.softmax
    lenet = build_model(cfg_for("lenet5", activation=activation), (28, 28, 1), NUM_CLASSES)
    assert lenet.get_layer("conv1").activation is fn
    resnet = build_model(cfg_for("resnet_small", activation=activation), (28, 28, 1), 10)
    assert resnet.get_layer("act1").activation is fn
    assert resnet.get_layer("stage2_block1_out").activation is fn


@pytest.mark.parametrize(("dropout", "second"), [(0.1, 0.2), (0.25, 0.5), (0.4, 0.5)])
def test_dropout_from_config(dropout, second):
    mlp = build_model(cfg_for("mlp", dropout=dropout), (28, 28, 1), NUM_CLASSES)
    assert mlp.get_layer("dropout1").rate == pytest.approx(dropout)
    cnn = build_model(cfg_for("mnist_cnn", dropout=dropout), (28, 28, 1), NUM_CLASSES)
    assert cnn.get_layer("dropout1").rate == pytest.approx(dropout)
    assert cnn.get_layer("dropout2").rate == pytest.approx(second)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weight_decay_on_every_kernel(name):
    model = build_model(cfg_for(name, weight_decay=5e-4), (28, 28, 1), NUM_CLASSES)
    layers = kernel_layers(model)
    assert layers
    for layer in layers:
        assert layer.kernel_regularizer is not None, layer.name
        assert float(layer.kernel_regularizer.l2) == pytest.approx(5e-4), layer.name
    assert len(model.losses) == len(layers)

    plain = build_model(cfg_for(name, weight_decay=0.0), (28, 28, 1), NUM_CLASSES)
    assert all(layer.kernel_regularizer is None for layer in kernel_layers(plain))
    assert plain.losses == []


@pytest.mark.parametrize(
    ("optimizer", "cls", "momentum"),
    [("sgd", "SGD", 0.0), ("momentum", "SGD", 0.9), ("adam", "Adam", None)],
)
def test_optimizer_from_config(optimizer, cls, momentum):
    legacy = keras().optimizers.legacy
    cfg = cfg_for("mlp", optimizer=optimizer, learning_rate=0.02)
    model = build_model(cfg, (28, 28, 1), NUM_CLASSES)
    opt = model.optimizer
    assert isinstance(opt, legacy.Optimizer)  # the only kind Horovod 0.28.1 wraps
    assert isinstance(opt, getattr(legacy, cls))
    config = opt.get_config()
    assert config["learning_rate"] == pytest.approx(0.02)
    if momentum is not None:
        assert config["momentum"] == pytest.approx(momentum)


def test_learning_rate_override_wins():
    cfg = cfg_for("mlp", learning_rate=0.001)
    model = build_model(cfg, (28, 28, 1), NUM_CLASSES, learning_rate=0.004)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.004)


def test_optimizer_wrapper_is_applied_before_compile():
    seen = []

    def wrap(opt):
        # What hvd.DistributedOptimizer does: a same-named subclass rebuilt from the config.
        seen.append(opt)
        cls = type(opt.__class__.__name__, (opt.__class__,), {"wrapped": True})
        return cls.from_config(opt.get_config())

    model = build_model(
        cfg_for("mlp", optimizer="momentum"),
        (28, 28, 1),
        NUM_CLASSES,
        optimizer_wrapper=wrap,
        learning_rate=0.05,
    )
    assert len(seen) == 1
    assert getattr(model.optimizer, "wrapped", False)
    assert model.optimizer.get_config()["momentum"] == pytest.approx(0.9)
    assert model.optimizer.get_config()["learning_rate"] == pytest.approx(0.05)


def test_make_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="train.optimizer"):
        make_optimizer("rmsprop", 0.1)


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights(name):
    first = build_model(cfg_for(name, seed=7), (28, 28, 1), NUM_CLASSES).get_weights()
    keras().backend.clear_session()
    np.random.seed(123)  # global state must not matter
    second = build_model(cfg_for(name, seed=7), (28, 28, 1), NUM_CLASSES).get_weights()
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    other = build_model(cfg_for(name, seed=8), (28, 28, 1), NUM_CLASSES).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


# --- bad input ------------------------------------------------------------------------------


def test_the_autoencoder_alone_reconstructs():
    assert task_for_model("autoencoder") is RECONSTRUCTION
    assert all(task_for_model(name) is CLASSIFICATION for name in CLASSIFIERS)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "match"),
    [
        ("lenet5", (8, 8, 1), 10, "at least 12x12"),
        ("resnet_small", (6, 28, 3), 10, "at least 8x8"),
        ("mlp", (28, 28), 10, r"\(height, width, channels\)"),
        ("mlp", (28, 0, 1), 10, r"\(height, width, channels\)"),
        ("mnist_cnn", (28, 28, 1), 1, "at least 2 classes"),
        ("vgg16", (28, 28, 1), 10, "'vgg16' is not one of"),
    ],
)
def test_bad_input_fails_clearly(name, shape, classes, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg_for(name), shape, classes)


def test_autoencoder_ignores_num_classes():
    model = build_model(cfg_for("autoencoder"), (12, 12, 3), 1)
    assert model.output_shape == (None, 12, 12, 3)


def test_nonpositive_learning_rate_override_fails():
    with pytest.raises(ValueError, match="learning rate"):
        build_model(cfg_for("mlp"), (28, 28, 1), NUM_CLASSES, learning_rate=0.0)
