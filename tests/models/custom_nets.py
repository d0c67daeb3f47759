"""Users' own models for the ``train.model: package.module:function`` tests."""

from __future__ import annotations

from typing import Any

from pipelines.keras_api import keras


def tiny(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A small uncompiled convnet, as a user would write one."""
    k = keras()
    inputs = k.Input(shape=input_shape)
    x = k.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    x = k.layers.GlobalAveragePooling2D(name="embedding")(x)
    return k.Model(inputs, k.layers.Dense(num_classes, activation="softmax")(x), name="tiny")


def wrong_classes(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A model with one output too many."""
    return tiny(input_shape, num_classes + 1)


def not_a_model(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Not a Keras model at all."""
    return "a model"
