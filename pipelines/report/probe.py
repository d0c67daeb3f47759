"""Keras model introspection for run reports: which layers to draw, and what they output.

In: a trained Keras model (layer names as :mod:`pipelines.models` documents) and an input
batch. Out: the layers whose activation maps a report draws, and the outputs of named layers
as numpy arrays. Keras is imported inside the functions, through :mod:`pipelines.keras_api`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipelines.keras_api import KerasModel


def activation_layers(model: KerasModel) -> list[Any]:
    """The layers whose activation maps a report draws, in model order.

    Convolutions (transposed ones included), 2-D pooling and ``Activation`` layers with a
    ``(batch, height, width, channels)`` output.

    Args:
        model: A Keras model.

    Returns:
        The layers.

    """
    from pipelines.keras_api import keras

    layers = keras().layers
    kinds = (
        layers.Conv2D,
        layers.MaxPooling2D,
        layers.AveragePooling2D,
        layers.Activation,
    )
    return [
        layer for layer in model.layers if isinstance(layer, kinds) and len(layer.output.shape) == 4
    ]


def layer_outputs(model: KerasModel, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
    """Run ``x`` through ``model`` and return the outputs of the named layers (inference mode).

    Args:
        model: A Keras functional model.
        names: Layer names.
        x: Model input batch.

    Returns:
        One array per name, in order.

    """
    from pipelines.keras_api import keras
    from pipelines.model_layers import outer_output

    outputs = [outer_output(model.get_layer(name)) for name in names]  # nested models too
    probe = keras().Model(model.inputs, outputs)
    values = probe.predict(x, batch_size=256, verbose=0)
    return [np.asarray(v) for v in (values if isinstance(values, list) else [values])]
