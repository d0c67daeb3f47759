"""Transfer learning: Keras Applications backbones and users' own models for the zoo.

In: a :class:`~pipelines.config.TrainConfig` whose ``model`` is a backbone
(:data:`~pipelines.zoo.BACKBONES`) or ``package.module:function``, the image shape and the
number of classes. Out: an uncompiled Keras classifier whose input is float32 images in
``[0, 1]`` (what :mod:`pipelines.images` makes of any image's bytes, so the registered pyfunc
still takes raw bytes), and the two-phase fine-tuning steps.

A backbone classifier is, layer by layer::

    image (H, W, C) in [0, 1]
    preprocess   Dense(3), frozen: the backbone's own input convention as a per-pixel
                 affine map (MobileNetV2: [-1, 1]; EfficientNetB0: [0, 255], it normalises
                 itself; ResNet50: BGR, 0-255 less the ImageNet mean); grey images are
                 repeated into three channels, as the pretrained weights expect RGB
    backbone     the Keras Application without its top, one nested layer
    embedding    GlobalAveragePooling2D (the embeddings the report projects)
    dropout      train.dropout
    predictions  Dense(num_classes, softmax), float32

The preprocessing is a plain Dense layer, not a Lambda or custom layer, so the saved model
loads anywhere Keras does (scoring executors, serving) with nothing registered.

Pretrained weights (``train.pretrained``): ``imagenet`` lets Keras fetch its ``*_notop.h5``
file into its cache (``~/.keras/models``; pre-seed it where nodes have no internet), a path
loads such a file (or any ``save_weights`` file of the same backbone), ``none`` starts from
random weights. With pretrained weights or a frozen first phase the backbone is called with
``training=False``: its batch normalisation stays in inference mode (its ImageNet
statistics) throughout, as Keras' transfer-learning guide does, also once unfrozen.

Fine-tuning (``train.fine_tune``): the backbone is built frozen when ``frozen_epochs`` > 0;
:func:`unfreeze` then opens its top ``unfreeze_top`` layers (0: all) for the second phase,
which the worker compiles anew at the lower rate.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.config import TrainConfig
    from pipelines.keras_api import KerasModel

#: The nested backbone layer's name.
BACKBONE_LAYER = "backbone"
#: Smallest height and width every backbone here takes (Keras Applications' own minimum).
MIN_SIZE = 32

#: ImageNet channel means of Caffe-style preprocessing (ResNet50), in BGR order, 0-255.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class PretrainedWeightsError(UserError):
    """Pretrained weights could not be fetched or do not fit the backbone."""


class CustomModelError(UserError):
    """A ``package.module:function`` model could not be imported, called or used."""


def uses_backbone(cfg: TrainConfig) -> bool:
    """Whether ``cfg.model`` is a Keras Applications backbone."""
    from pipelines.zoo import BACKBONES

    return cfg.model in BACKBONES


def build_backbone_classifier(
    cfg: TrainConfig,
    shape: tuple[int, int, int],
    num_classes: int,
    head_args: Any,
    load_pretrained: bool = True,
) -> KerasModel:
    """Build the uncompiled classifier on the backbone ``cfg.model`` names.

    Args:
        cfg: Model, pretrained weights, width, dropout, fine-tuning, seed.
        shape: ``(height, width, channels)``, at least :data:`MIN_SIZE` square.
        num_classes: Classes of the softmax head.
        head_args: Keyword arguments of the head's kernel (seeded initialiser, L2).
        load_pretrained: Load ``cfg.pretrained``; False builds random weights (a twin
            whose weights are set afterwards).

    Returns:
        The model, named after ``cfg.model``.

    Raises:
        PretrainedWeightsError: The weights cannot be fetched or do not fit.
    """
    from pipelines.keras_api import keras

    k = keras()
    layers = k.layers
    inputs = k.Input(shape=shape, dtype="float32", name="image")
    scale, kernel, bias = _input_convention(cfg.model, shape[-1])
    preprocess = layers.Dense(3, name="preprocess", trainable=False)
    x = preprocess(inputs)
    preprocess.set_weights([kernel * scale, bias])
    backbone = _application(cfg, (shape[0], shape[1], 3), load_pretrained)
    frozen = cfg.fine_tune.frozen_epochs > 0
    if frozen:
        backbone.trainable = False
    inference_bn = frozen or cfg.pretrained != "none"
    x = backbone(x, training=False) if inference_bn else backbone(x)
    x = layers.GlobalAveragePooling2D(name="embedding")(x)
    x = layers.Dropout(cfg.dropout, seed=cfg.seed, name="dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions", **head_args
    )(x)
    return k.Model(inputs, outputs, name=cfg.model)


def _input_convention(model: str, channels: int) -> tuple[float, np.ndarray, np.ndarray]:
    """The backbone's input as ``scale * x @ kernel + bias`` of images in [0, 1]."""
    # Output channel j reads input channel order[j] (BGR for Caffe-style ResNet50).
    order = (2, 1, 0) if model == "resnet50" else (0, 1, 2)
    kernel = np.zeros((channels, 3), np.float32)
    for out, source in enumerate(order):
        kernel[source if channels == 3 else 0, out] = 1.0
    if model == "mobilenet_v2":
        return 2.0, kernel, np.full(3, -1.0, np.float32)
    if model == "resnet50":
        return 255.0, kernel, -np.asarray(_CAFFE_MEAN_BGR, np.float32)
    return 255.0, kernel, np.zeros(3, np.float32)  # efficientnet_b0 normalises itself


def _application(cfg: TrainConfig, shape: tuple[int, int, int], load: bool) -> Any:
    """The Keras Application without its top, with the weights ``cfg.pretrained`` names."""
    from pipelines.keras_api import keras

    apps = keras().applications
    imagenet = load and cfg.pretrained == "imagenet"
    args: dict[str, Any] = {
        "include_top": False,
        "input_shape": shape,
        "weights": "imagenet" if imagenet else None,
    }
    make = {
        "mobilenet_v2": lambda: apps.MobileNetV2(alpha=cfg.backbone_alpha, **args),
        "efficientnet_b0": lambda: apps.EfficientNetB0(**args),
        "resnet50": lambda: apps.ResNet50(**args),
    }[cfg.model]
    try:
        backbone = make()
    except Exception as exc:
        if not imagenet:
            raise
        raise PretrainedWeightsError(
            f"train.pretrained=imagenet: Keras could not load the {cfg.model} ImageNet "
            f"weights ({_first_line(exc)}); without internet, copy the file into "
            "~/.keras/models on every node, or set train.pretrained to a weights file "
            "(docs/photos-models.md)"
        ) from None
    if load and cfg.pretrained not in ("imagenet", "none"):
        _load_weights_file(backbone, cfg.pretrained, cfg.model)
    # Keras names applications after the architecture; one fixed name keeps paths stable.
    try:
        backbone.name = BACKBONE_LAYER  # Keras 3
    except AttributeError:
        backbone._name = BACKBONE_LAYER  # tf.keras 2: a read-only property over _name
    return backbone


def _load_weights_file(backbone: Any, path: str, model: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(
            f"train.pretrained: no weights file {path} (it must be readable on every rank, "
            "e.g. on a shared volume)"
        )
    try:
        backbone.load_weights(str(file))
    except Exception as exc:
        raise PretrainedWeightsError(
            f"train.pretrained: {path} does not fit {model} ({_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def unfreeze(model: KerasModel, top: int) -> int:
    """Open the backbone for fine-tuning: its top ``top`` layers, or all for 0.

    The call stays ``training=False``, so the unfrozen batch normalisation keeps its
    statistics (Keras' transfer-learning guide); only weights move.

    Args:
        model: A classifier :func:`build_backbone_classifier` built.
        top: Backbone layers to unfreeze, counted from its output; 0: all of them.

    Returns:
        How many backbone layers are trainable now.
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    backbone.trainable = True
    if top > 0:
        for layer in backbone.layers[:-top]:
            layer.trainable = False
    return sum(1 for layer in backbone.layers if layer.trainable)


def build_custom(name: str, shape: tuple[int, int, int], num_classes: int) -> KerasModel:
    """Call a user's ``package.module:function`` with ``(input_shape, num_classes)``.

    The function returns an uncompiled Keras classifier: input ``shape`` float32 in
    ``[0, 1]``, output ``(None, num_classes)`` class probabilities (a softmax). Its module
    must be importable on every rank (installed, or shipped with ``--py-files``).

    Raises:
        CustomModelError: The module or function cannot be found, the call fails, or the
            result is not such a model.
    """
    from pipelines.keras_api import keras

    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise CustomModelError(f"train.model {name}: cannot import it ({exc})") from None
    try:
        model = function(shape, num_classes)
    except Exception as exc:
        raise CustomModelError(
            f"train.model {name}: calling it with {shape}, {num_classes} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(model, keras().Model):
        raise CustomModelError(
            f"train.model {name}: returned {type(model).__name__}, not a Keras model"
        )
    out = tuple(model.output_shape)
    if tuple(model.input_shape[1:]) != tuple(shape) or out[1:] != (num_classes,):
        raise CustomModelError(
            f"train.model {name}: takes {model.input_shape} and gives {out}; it must take "
            f"(None, {', '.join(map(str, shape))}) and give (None, {num_classes})"
        )
    return model
