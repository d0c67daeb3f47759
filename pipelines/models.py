"""The model zoo: Keras 2 networks for small images, built and compiled from a TrainConfig.

In: a :class:`~pipelines.config.TrainConfig` (model name, activation, optimizer, learning rate,
dropout, weight decay, widths, seed), the image shape ``(height, width, channels)`` and the
number of classes. Out: a compiled Keras model whose input is float32 images in ``[0, 1]``.

This module knows nothing of Horovod or of data. The trainer passes
``optimizer_wrapper=hvd.DistributedOptimizer`` and the rank-scaled ``learning_rate``; nothing
here imports Horovod.

Contract callers rely on:

* Each model serves a task (:data:`MODEL_TASKS`, :mod:`pipelines.tasks`), which compiles it:
  classifiers end in ``Dense(num_classes, softmax)`` named ``"predictions"`` (loss
  ``sparse_categorical_crossentropy`` on integer labels, metric ``"accuracy"``: history keys
  ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``); the autoencoder reconstructs its
  input (sigmoid output of the same shape, layer ``"reconstruction"``; loss ``mse``, metric
  the mean absolute error ``"reconstruction_error"``: history keys ``loss``,
  ``reconstruction_error``, ``val_loss``, ``val_reconstruction_error``). Its bottleneck layer
  is named ``"latent"``.
* Every classifier has a layer named ``"embedding"``: the last hidden dense layer, or the
  global average pooling of ``resnet_small``. ``keras.Model(m.input, m.get_layer("embedding")
  .output)`` extracts embeddings.
* Convolution and pooling layers are named ``conv1``, ``pool1``, ``conv2``, ... (per residual
  block in ``resnet_small``: ``stage2_block1_conv1``, ...), so a report can show activations
  per layer. Convolutions other than ``resnet_small``'s apply the activation themselves, so
  their output is the activation map.
* Optimizers are Keras 2's *legacy* classes (``keras.optimizers.legacy.SGD`` / ``Adam``), the
  only ones Horovod 0.28.1 can wrap on Keras 2.11+: ``sgd`` is plain SGD, ``momentum`` is SGD
  with momentum 0.9, ``adam`` is Adam with Keras' defaults.
* ``weight_decay`` > 0 adds ``keras.regularizers.L2(weight_decay)`` (a penalty of
  ``weight_decay * sum(w ** 2)`` added to the loss) to every convolution and dense kernel.
* Under Keras' ``mixed_float16`` policy (``train.mixed_precision``) the layers compute in
  float16 but the output layers (``predictions``, ``reconstruction``) are float32, so the
  softmax, sigmoid and loss stay numerically sound. :func:`build_model` applies
  ``optimizer_wrapper`` to the plain optimizer and ``compile`` then wraps the result in a
  ``LossScaleOptimizer``: loss scaling outside, Horovod's allreduce of the (scaled)
  gradients inside, the only order Horovod 0.28.1 supports. :func:`as_float32` gives the
  float32 twin of a mixed-precision model for saving.
* Weights are initialised from ``cfg.seed`` alone (seeded initialisers per layer, no global
  random state is touched): two builds with the same config give identical weights.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pipelines.config import TrainConfig
from pipelines.keras_api import is_keras3, keras
from pipelines.tasks import task_for_model

if TYPE_CHECKING:
    from pipelines.keras_api import KerasModel, KerasOptimizer

    #: What ``build_model`` applies to the optimizer, e.g. ``hvd.DistributedOptimizer``.
    OptimizerWrapper = Callable[[KerasOptimizer], KerasOptimizer]

#: The names accepted as ``train.model``.
MODEL_NAMES: tuple[str, ...] = ("mlp", "lenet5", "mnist_cnn", "resnet_small", "autoencoder")

#: The task of each zoo model that is not a classifier (:mod:`pipelines.tasks`).
MODEL_TASKS: dict[str, str] = {"autoencoder": "reconstruction"}

#: Smallest image height/width each model can take (valid convolutions and pooling shrink it).
MIN_IMAGE_SIZE: dict[str, int] = {
    "mlp": 1,
    "lenet5": 12,
    "mnist_cnn": 6,
    "resnet_small": 8,
    "autoencoder": 1,
}

#: Momentum of the ``momentum`` optimizer.
MOMENTUM = 0.9

#: Filters of ``resnet_small``'s three stages (one basic residual block each: a ResNet-8).
RESNET_STAGE_FILTERS: tuple[int, ...] = (16, 32, 64)
RESNET_BLOCKS_PER_STAGE = 1


def build_model(
    cfg: TrainConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    optimizer_wrapper: OptimizerWrapper | None = None,
    learning_rate: float | None = None,
) -> KerasModel:
    """Build and compile the model that ``cfg.model`` names.

    Args:
        cfg: Training configuration: model, activation, optimizer, learning rate, dropout,
            weight decay, hidden units, latent dimension and seed are used.
        input_shape: ``(height, width, channels)`` of the float32 images in ``[0, 1]``.
        num_classes: Number of classes of the softmax output (ignored by the autoencoder).
        optimizer_wrapper: Applied to the optimizer before compiling, e.g.
            ``hvd.DistributedOptimizer``; identity when None.
        learning_rate: Overrides ``cfg.learning_rate`` (the trainer passes the rate scaled by
            the number of ranks).

    Returns:
        The compiled model, named after ``cfg.model``.

    Raises:
        ValueError: Unknown model, a malformed or too small input shape, fewer than two
            classes for a classifier, or a learning rate that is not positive.

    """
    if cfg.model not in MODEL_NAMES:
        raise ValueError(
            f"train.model: unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)}"
        )
    shape = _check_input_shape(cfg.model, input_shape)
    task = task_for_model(cfg.model)
    if task.uses_labels and num_classes < 2:
        raise ValueError(
            f"model {cfg.model} needs at least 2 classes, got {num_classes}; "
            "check the labels of the prepared dataset"
        )
    lr = cfg.learning_rate if learning_rate is None else float(learning_rate)
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")

    k = keras()
    parts = _Parts(cfg)
    builder = {
        "mlp": _mlp,
        "lenet5": _lenet5,
        "mnist_cnn": _mnist_cnn,
        "resnet_small": _resnet_small,
        "autoencoder": _autoencoder,
    }[cfg.model]
    model = builder(parts, shape, num_classes)

    optimizer = make_optimizer(cfg.optimizer, lr)
    if optimizer_wrapper is not None:
        # Horovod wraps the plain optimizer; under mixed_float16, compile() wraps that in a
        # LossScaleOptimizer (Horovod cannot wrap a LossScaleOptimizer itself).
        optimizer = optimizer_wrapper(optimizer)
    task.compile(model, optimizer, k)
    return model


def as_float32(
    model: KerasModel, cfg: TrainConfig, input_shape: tuple[int, int, int], num_classes: int
) -> KerasModel:
    """Return ``model`` if it computes in float32, else its float32 twin with its weights.

    A model built under ``mixed_float16`` keeps that policy per layer when saved, so it
    would compute in (emulated, slow) float16 wherever it is loaded. Its variables are
    float32 already, so the twin built under the float32 policy takes them unchanged.

    Args:
        model: A model :func:`build_model` built with ``cfg``.
        cfg: The configuration it was built with.
        input_shape: Its ``(height, width, channels)``.
        num_classes: Its number of classes.

    Returns:
        A float32 model with identical weights (compiled, without optimizer state).

    """
    if model.dtype_policy.name == "float32":
        return model
    policies = keras().mixed_precision
    previous = policies.global_policy()
    policies.set_global_policy("float32")
    try:
        twin = build_model(cfg, input_shape, num_classes)
    finally:
        policies.set_global_policy(previous)
    twin.set_weights(model.get_weights())
    return twin


def make_optimizer(name: str, learning_rate: float) -> KerasOptimizer:
    """Make a Keras 2 legacy optimizer, the kind Horovod 0.28.1's ``DistributedOptimizer`` wraps.

    Args:
        name: ``sgd``, ``momentum`` (SGD with momentum :data:`MOMENTUM`) or ``adam``.
        learning_rate: The learning rate.

    Returns:
        A ``keras.optimizers.legacy.SGD`` or ``keras.optimizers.legacy.Adam``.

    Raises:
        ValueError: Unknown optimizer name.

    """
    # Keras 3 (the Keras stack) has no legacy classes and needs none: no Horovod to wrap them.
    legacy = keras().optimizers if is_keras3() else keras().optimizers.legacy
    if name == "sgd":
        return legacy.SGD(learning_rate=learning_rate)
    if name == "momentum":
        return legacy.SGD(learning_rate=learning_rate, momentum=MOMENTUM)
    if name == "adam":
        return legacy.Adam(learning_rate=learning_rate)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; choose sgd, momentum or adam")


def model_summary(model: KerasModel) -> str:
    """Return the text that ``model.summary()`` prints.

    Args:
        model: A built Keras model.

    Returns:
        The summary table, lines joined by newlines.

    """
    lines: list[str] = []

    def collect(line: str, *args: Any, **kwargs: Any) -> None:
        lines.append(line)

    model.summary(print_fn=collect, line_length=100)
    return "\n".join(lines)


def _check_input_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = tuple(input_shape)
    if len(dims) != 3 or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}"
        )
    height, width, channels = (int(d) for d in dims)
    least = MIN_IMAGE_SIZE[model]
    if min(height, width) < least:
        raise ValueError(
            f"model {model} needs images of at least {least}x{least} pixels, got "
            f"{height}x{width}; raise ingest.image_size or choose another train.model"
        )
    return height, width, channels


class _Parts:
    """Layer factory bound to one config: activation, regularizer and per-layer seeds."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.k = keras()
        self.cfg = cfg
        self._seeds: Iterator[int] = itertools.count(cfg.seed * 1000)

    def _seed(self) -> int:
        return next(self._seeds) % (2**31 - 1)

    def kernel_args(self) -> dict[str, Any]:
        """Return a seeded initialiser and optional L2 penalty for a conv or dense kernel."""
        decay = self.cfg.weight_decay
        return {
            "kernel_initializer": self.k.initializers.GlorotUniform(seed=self._seed()),
            "kernel_regularizer": self.k.regularizers.L2(decay) if decay > 0 else None,
        }

    def conv(self, filters: int, size: int, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("activation", self.cfg.activation)
        return self.k.layers.Conv2D(filters, size, name=name, **self.kernel_args(), **kwargs)

    def deconv(self, filters: int, size: int, name: str) -> Any:
        return self.k.layers.Conv2DTranspose(
            filters,
            size,
            strides=2,
            padding="same",
            name=name,
            activation=self.cfg.activation,
            **self.kernel_args(),
        )

    def dense(self, units: int, name: str, **kwargs: Any) -> Any:
        kwargs.setdefault("activation", self.cfg.activation)
        return self.k.layers.Dense(units, name=name, **self.kernel_args(), **kwargs)

    def dropout(self, rate: float, name: str) -> Any:
        return self.k.layers.Dropout(rate, seed=self._seed(), name=name)

    def input(self, shape: tuple[int, int, int]) -> Any:
        return self.k.Input(shape=shape, dtype="float32", name="image")

    def classifier_head(self, x: Any, num_classes: int) -> Any:
        # float32 output even under mixed_float16: a float16 softmax under/overflows.
        return self.dense(num_classes, "predictions", activation="softmax", dtype="float32")(x)


def _mlp(p: _Parts, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Build an MLP: flatten, two dense hidden layers with dropout between, softmax."""
    inputs = p.input(shape)
    x = p.k.layers.Flatten(name="flatten")(inputs)
    x = p.dense(p.cfg.hidden_units, "dense1")(x)
    x = p.dropout(p.cfg.dropout, "dropout1")(x)
    x = p.dense(p.cfg.hidden_units, "embedding")(x)
    return p.k.Model(inputs, p.classifier_head(x, num_classes), name="mlp")


def _lenet5(p: _Parts, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Build LeNet-5 (LeCun et al. 1998) with 'same' padding in the first layer for 28x28 input."""
    layers = p.k.layers
    inputs = p.input(shape)
    x = p.conv(6, 5, "conv1", padding="same")(inputs)
    x = layers.AveragePooling2D(2, name="pool1")(x)
    x = p.conv(16, 5, "conv2", padding="valid")(x)
    x = layers.AveragePooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = p.dense(120, "dense1")(x)
    x = p.dense(84, "embedding")(x)
    return p.k.Model(inputs, p.classifier_head(x, num_classes), name="lenet5")


def _mnist_cnn(p: _Parts, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Build the Keras MNIST convnet.

    The first dropout uses ``cfg.dropout``, the one before the softmax
    ``min(0.5, 2 * cfg.dropout)``: the original's 0.25 and 0.5 at the default 0.25.
    """
    layers = p.k.layers
    inputs = p.input(shape)
    x = p.conv(32, 3, "conv1")(inputs)
    x = p.conv(64, 3, "conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = p.dropout(p.cfg.dropout, "dropout1")(x)
    x = layers.Flatten(name="flatten")(x)
    x = p.dense(128, "embedding")(x)
    x = p.dropout(min(0.5, 2 * p.cfg.dropout), "dropout2")(x)
    return p.k.Model(inputs, p.classifier_head(x, num_classes), name="mnist_cnn")


def _resnet_small(p: _Parts, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Build a ResNet-8 (He et al. 2016, CIFAR variant): stem, 3 stages of basic blocks, GAP.

    Stages 2 and 3 halve the resolution with strided 'same' convolutions, so any input of
    at least 8x8 works (32x32 gives 32, 16, 8; 28x28 gives 28, 14, 7).
    """
    layers = p.k.layers
    inputs = p.input(shape)
    x = p.conv(
        RESNET_STAGE_FILTERS[0], 3, "conv1", padding="same", use_bias=False, activation=None
    )(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation(p.cfg.activation, name="act1")(x)
    for stage, filters in enumerate(RESNET_STAGE_FILTERS, start=1):
        for block in range(1, RESNET_BLOCKS_PER_STAGE + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(p, x, filters, stride, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="embedding")(x)
    return p.k.Model(inputs, p.classifier_head(x, num_classes), name="resnet_small")


def _basic_block(p: _Parts, x: Any, filters: int, stride: int, name: str) -> Any:
    """Add a basic residual block: two 3x3 conv-BN layers plus an identity or 1x1 shortcut."""
    layers = p.k.layers
    shortcut = x
    y = p.conv(
        filters, 3, f"{name}_conv1", strides=stride, padding="same", use_bias=False, activation=None
    )(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.Activation(p.cfg.activation, name=f"{name}_act1")(y)
    y = p.conv(filters, 3, f"{name}_conv2", padding="same", use_bias=False, activation=None)(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = p.conv(
            filters, 1, f"{name}_shortcut", strides=stride, use_bias=False, activation=None
        )(x)
        shortcut = layers.BatchNormalization(name=f"{name}_shortcut_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation(p.cfg.activation, name=f"{name}_out")(y)


def _autoencoder(p: _Parts, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Build a convolutional autoencoder when height and width divide by 4, dense otherwise.

    Convolutional: conv1 (32) → pool1 → conv2 (64) → pool2 → flatten → ``latent`` → dense
    → reshape → two stride-2 transposed convolutions → ``reconstruction`` (sigmoid 3x3 conv).
    Dense: flatten → ``encoder1`` (hidden_units) → ``latent`` → ``decoder1`` (hidden_units)
    → sigmoid dense → ``reconstruction`` (reshape to the input shape). ``num_classes`` is
    unused; dropout is not applied.
    """
    layers = p.k.layers
    height, width, channels = shape
    inputs = p.input(shape)
    if height % 4 == 0 and width % 4 == 0:
        x = p.conv(32, 3, "conv1", padding="same")(inputs)
        x = layers.MaxPooling2D(2, name="pool1")(x)
        x = p.conv(64, 3, "conv2", padding="same")(x)
        x = layers.MaxPooling2D(2, name="pool2")(x)
        x = layers.Flatten(name="flatten")(x)
        x = p.dense(p.cfg.latent_dim, "latent")(x)
        small = (height // 4, width // 4, 64)
        x = p.dense(small[0] * small[1] * small[2], "decoder1")(x)
        x = layers.Reshape(small, name="unflatten")(x)
        x = p.deconv(64, 3, "deconv1")(x)
        x = p.deconv(32, 3, "deconv2")(x)
        outputs = p.conv(
            channels, 3, "reconstruction", padding="same", activation="sigmoid", dtype="float32"
        )(x)
    else:
        x = layers.Flatten(name="flatten")(inputs)
        x = p.dense(p.cfg.hidden_units, "encoder1")(x)
        x = p.dense(p.cfg.latent_dim, "latent")(x)
        x = p.dense(p.cfg.hidden_units, "decoder1")(x)
        x = p.dense(
            height * width * channels, "decoder_out", activation="sigmoid", dtype="float32"
        )(x)
        # float32 too: under mixed_float16 a float16 layer would cast its input back down.
        outputs = layers.Reshape(shape, name="reconstruction", dtype="float32")(x)
    return p.k.Model(inputs, outputs, name="autoencoder")
