"""The one place that imports Keras.

In: nothing (the installed TensorFlow). Out: :func:`keras`, the Keras 2 API module
(``tf.keras`` of TensorFlow 2.15.1, i.e. Keras 2.15), checked to be Keras 2.

Why one module: Horovod 0.28.1's Keras integration (``DistributedOptimizer``, its callbacks)
works with Keras 2 only. Under Keras 3 (TensorFlow 2.16 and later, where ``tf.keras`` *is*
Keras 3) ``hvd.DistributedOptimizer`` runs without error but does **not** average gradients,
so the ranks silently drift apart. The project therefore pins TensorFlow 2.15.1, whose
``tf.keras`` is Keras 2, and refuses to run on Keras 3 with a clear error instead of training
wrong models. Horovod 0.27+ also wraps only the *legacy* optimizer classes
(``keras.optimizers.legacy.*``) on Keras 2.11+, which is why :mod:`pipelines.models` uses them.

Every other module gets Keras through here::

    from pipelines.keras_api import keras

    k = keras()
    layer = k.layers.Dense(10)

and never writes ``import keras`` or ``from tensorflow import keras`` itself. A runtime with
TensorFlow 2.16+ and the ``tf-keras`` package (Keras 2 as a separate distribution) could then
be supported by changing only :func:`keras` below, e.g. to ``import tf_keras as module`` (and
setting ``TF_USE_LEGACY_KERAS=1`` so TensorFlow's own helpers agree); note that Horovod's
callbacks still import Keras 3 there, so that runtime needs more than this module to work.

TensorFlow is imported inside :func:`keras`, not at module import, so that importing this
module (e.g. from the CLI) stays cheap.

On the Keras stack (:func:`pipelines.stack.current` is ``keras``: Keras 3 installed, no
TensorFlow, ``make venv STACK=keras``) :func:`keras` is Keras 3 itself on the JAX backend
(``KERAS_BACKEND=jax``, set here unless already set); Horovod is absent there, and the keras
launcher averages gradients in the compiled step (:mod:`pipelines.train.jax_distribution`).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # names for annotations only; nothing is imported at run time
    from tensorflow import keras as _keras

    #: A Keras 2 model (``tf.keras.Model``).
    KerasModel: TypeAlias = _keras.Model
    #: A Keras 2 optimizer that Horovod 0.28.1 can wrap (the legacy ``OptimizerV2`` classes).
    KerasOptimizer: TypeAlias = _keras.optimizers.legacy.Optimizer

#: The Keras major version this project supports (see the module docstring).
SUPPORTED_KERAS_MAJOR = 2


@functools.cache
def keras() -> ModuleType:
    """Return the Keras 2 API module, importing TensorFlow on first use.

    Returns:
        ``tf.keras`` of the installed TensorFlow (Keras 2.15 with TensorFlow 2.15.1).

    Raises:
        RuntimeError: The Keras found is not Keras 2 (e.g. Keras 3 under TensorFlow 2.16+),
            with which Horovod would silently stop averaging gradients.

    """
    from pipelines import stack

    if stack.current() == stack.KERAS:
        return _keras3()
    # The only Keras import in the project. For TF 2.16+ with tf-keras, change this line
    # to `import tf_keras as module`.
    from tensorflow import keras as module

    _check_keras_version(keras_version(module))
    return module


def _keras3() -> ModuleType:
    """Keras 3 on JAX (the Keras stack); the backend is fixed at Keras' first import."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras as module

    if module.backend.backend() != "jax":
        raise RuntimeError(
            f"Keras runs on {module.backend.backend()}; the Keras stack needs JAX: set "
            "KERAS_BACKEND=jax before Keras is first imported"
        )
    return module


def is_keras3() -> bool:
    """Whether :func:`keras` is Keras 3 (the Keras stack) rather than TensorFlow's Keras 2."""
    from pipelines import stack

    return stack.current() == stack.KERAS


def keras_version(module: ModuleType) -> str:
    """Return the version of the Keras distribution that ``module`` belongs to.

    ``tf.keras`` of TensorFlow 2.15 has no ``__version__`` of its own; it is a view
    (``keras.api._v2.keras``) into the ``keras`` package, so the top-level package's
    version is used.

    Args:
        module: A Keras API module such as ``tf.keras`` or ``tf_keras``.

    Returns:
        The version, e.g. ``"2.15.0"``; ``"unknown"`` if none can be found.

    """
    version = getattr(module, "__version__", None)
    if version is None:
        top = importlib.import_module(module.__name__.split(".")[0])
        version = getattr(top, "__version__", None)
    return str(version) if version is not None else "unknown"


def _check_keras_version(version: str) -> None:
    """Fail unless ``version`` is a Keras 2 version.

    Args:
        version: A Keras version string such as ``"2.15.0"`` or ``"3.1.0"``.

    Raises:
        RuntimeError: The major version is not 2, or the version cannot be parsed.

    """
    head = version.strip().split(".")[0]
    major = int(head) if head.isdigit() else None
    if major == SUPPORTED_KERAS_MAJOR:
        return
    raise RuntimeError(
        f"Keras {version} found, but this project needs Keras 2: with Keras 3, Horovod 0.28.1's "
        "DistributedOptimizer silently stops averaging gradients across ranks. Install "
        "tensorflow-cpu==2.15.1 (its tf.keras is Keras 2.15), or for TensorFlow 2.16+ install "
        "tf-keras and switch pipelines/keras_api.py to `import tf_keras`."
    )
