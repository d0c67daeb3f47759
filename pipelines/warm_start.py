"""Warm start (``train.init_from``): a new model takes a registered model's weights.

In: a model just built from the config, and the Keras file of a registered model (the
driver resolves ``models:/NAME@ALIAS``, downloads it and copies its Keras file into the
run's folder, where every rank reads it). Out: the new model with every layer whose path
(:func:`~pipelines.model_layers.leaf_layers`) and weight shapes match set from the old one;
the rest (a head for another number of classes) keeps its built weights.
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines.errors import UserError
from pipelines.model_layers import leaf_layers

log = logging.getLogger(__name__)


class WarmStartError(UserError):
    """The model to start from cannot be read, or shares no layer with the new one."""


def warm_start(model: Any, path: str, source: str) -> tuple[list[str], list[str]]:
    """Set ``model``'s layers from the Keras model file ``path`` where they match.

    Args:
        model: The new model (built, compiled or not).
        path: A Keras model file (``.h5``) visible to this process.
        source: What ``path`` is, for messages (``models:/NAME@ALIAS``).

    Returns:
        The paths of the layers copied, and of the weighted layers left as built.

    Raises:
        WarmStartError: The file does not load, or no layer matches.
    """
    from pipelines.keras_api import keras

    try:
        old = keras().models.load_model(path, compile=False)
    except Exception as exc:
        raise WarmStartError(
            f"train.init_from {source}: cannot load its Keras model ({exc})"
        ) from None
    weights = {name: layer.get_weights() for name, layer in leaf_layers(old)}
    copied, kept = [], []
    for name, layer in leaf_layers(model):
        mine = layer.get_weights()
        if not mine:
            continue
        theirs = weights.get(name)
        if theirs is not None and [w.shape for w in theirs] == [w.shape for w in mine]:
            layer.set_weights(theirs)
            copied.append(name)
        else:
            kept.append(name)
    if not copied:
        raise WarmStartError(
            f"train.init_from {source}: no layer of {old.name} matches {model.name} in name "
            "and shape; warm start needs the same architecture"
        )
    log.info("warm start from %s: %d layers copied, %s left as built", source, len(copied), kept)
    return copied, kept
