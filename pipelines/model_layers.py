"""Walking a Keras model's layers, nested models included (a pretrained backbone is one layer).

In: a built Keras model, whose layers may themselves be models (``train.model: mobilenet_v2``
wraps Keras' MobileNetV2 as the layer ``backbone``). Out: its innermost layers with their
``/``-joined path names (:func:`leaf_layers`), the batch-normalisation statistics that
training updates (:func:`moving_statistics`), and a digest of each layer's weights
(:func:`layer_digests`), and a nested model's output in the outer graph
(:func:`outer_output`). Works on ``tf.keras`` (Keras 2) and Keras 3 alike: only public
attributes (``layers``, ``weights``, ``trainable``) are read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def leaf_layers(model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The innermost layers of ``model`` in model order, each with its path name.

    A nested model's layers are named ``<model layer>/<layer>``; top-level layers keep
    their own name, so a model without nesting gives its ``model.layers`` names unchanged.

    Args:
        model: A Keras model (functional or sequential).
        prefix: Path of ``model`` itself inside an outer model (``""`` at the top).

    Returns:
        ``[(path, layer), ...]``.
    """
    leaves: list[tuple[str, Any]] = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if is_nested_model(layer):
            leaves += leaf_layers(layer, f"{path}/")
        else:
            leaves.append((path, layer))
    return leaves


def is_nested_model(layer: Any) -> bool:
    """Whether ``layer`` is itself a model (a backbone), not a plain layer."""
    return hasattr(layer, "layers")


def outer_output(layer: Any) -> Any:
    """``layer``'s output in the model it was last called in.

    For a plain layer of a functional model, ``layer.output``. A nested model's ``output``
    is that of its own inner graph, which a probe model of the outer inputs cannot reach
    ("graph disconnected"); its last call node's output is the outer model's tensor.
    """
    if not is_nested_model(layer):
        return layer.output
    # Keras 2 and 3 both keep a layer's call nodes; the last is the outer model's call.
    outputs = layer._inbound_nodes[-1].output_tensors
    return outputs[0] if isinstance(outputs, list | tuple) and len(outputs) == 1 else outputs


def moving_statistics(model: Any) -> list[Any]:
    """The moving mean and variance of every batch-normalisation layer that trains.

    These are the only variables a training step changes without a gradient, so the only
    ones that averaged gradients do not keep equal across data-parallel ranks. A frozen
    layer (``trainable`` false: a frozen backbone) runs in inference mode and never changes
    them, so it is left out.

    Args:
        model: A Keras model.

    Returns:
        The variables, in model order.
    """
    from pipelines.keras_api import keras

    norm = keras().layers.BatchNormalization
    return [
        variable
        for _, layer in leaf_layers(model)
        if isinstance(layer, norm) and layer.trainable
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def layer_digests(model: Any) -> dict[str, str]:
    """SHA-256 of each weighted innermost layer's weights, by path name, in model order.

    Compared across ranks, they name the layers that went apart (the whole-model digest
    only says that some did).
    """
    digests = {}
    for path, layer in leaf_layers(model):
        if not layer.weights:
            continue
        digest = hashlib.sha256()
        for variable in layer.weights:
            digest.update(np.ascontiguousarray(np.asarray(variable)).tobytes())
        digests[path] = digest.hexdigest()[:16]
    return digests
