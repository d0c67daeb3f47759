"""The names ``train.model`` accepts: the zoo's networks, its backbones, or a user's function.

Plain data, no Keras: the config validates ``train.model`` with :func:`check_model_name`
at load time, and :mod:`pipelines.models` builds what the name says.
"""

from __future__ import annotations

import re

#: The zoo's own networks for small images (:mod:`pipelines.models`).
NETWORKS: tuple[str, ...] = ("mlp", "lenet5", "mnist_cnn", "resnet_small", "autoencoder")

#: Keras Applications backbones, by zoo name (:mod:`pipelines.backbones`).
BACKBONES: tuple[str, ...] = ("mobilenet_v2", "efficientnet_b0", "resnet50")

#: Every zoo name.
ZOO: tuple[str, ...] = NETWORKS + BACKBONES

#: ``package.module:function``: a user's function building an uncompiled Keras model.
_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_custom(name: str) -> bool:
    """Whether ``name`` is a user's ``package.module:function`` rather than a zoo name."""
    return bool(_FUNCTION.match(name))


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a zoo name or ``package.module:function``.

    Raises:
        ValueError: Anything else, with the choices.
    """
    if name in ZOO or is_custom(name):
        return name
    raise ValueError(
        f"{name!r} is not one of {', '.join(map(repr, ZOO))}, nor package.module:function "
        "(a function of (input_shape, num_classes) returning an uncompiled Keras model)"
    )
