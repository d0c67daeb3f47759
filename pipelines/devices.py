"""Which device a training rank or scoring worker computes on, and in which precision.

In: a ``use_gpu`` setting (``true``, ``false`` or ``"auto"``) and the process's index among
its host's processes (a Horovod rank's local rank, a scoring task's GPU). Out: the device
chosen, as text for the run's tags (``"GPU:1 (NVIDIA H200)"`` or ``"CPU"``), and Keras'
global dtype policy (``mixed_float16`` or ``float32``) for a block of training.

:func:`pin_device` must run before the process's first TensorFlow op: afterwards TensorFlow
no longer lets visible devices or memory growth change. TensorFlow is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines.errors import NoGpuError

log = logging.getLogger(__name__)

#: What :func:`pin_device` returns when the process computes on the CPU.
CPU = "CPU"
#: Keras dtype policies :func:`precision` sets.
MIXED, FLOAT32 = "mixed_float16", "float32"


def pin_device(use_gpu: bool | str, index: int = 0, key: str = "train.use_gpu") -> str:
    """Make one GPU (or none) visible to TensorFlow in this process.

    ``true`` pins GPU ``index % count`` with memory growth on (so ranks sharing a host
    never grab each other's memory) and fails without a GPU; ``"auto"`` does the same but
    falls back to the CPU; ``false`` hides every GPU, so a GPU host with the setting off
    really computes on its CPU.

    Args:
        use_gpu: ``True``, ``False`` or ``"auto"``.
        index: Which of the host's GPUs, e.g. the Horovod local rank.
        key: The config key, named in errors.

    Returns:
        ``"GPU:<n> (<name>)"`` (the physical GPU) or :data:`CPU`.

    Raises:
        NoGpuError: ``use_gpu`` is true and TensorFlow sees no GPU here.
        ValueError: ``use_gpu`` is none of the three values.

    """
    if not (isinstance(use_gpu, bool) or use_gpu == "auto"):
        raise ValueError(f"{key}: expected true, false or 'auto', got {use_gpu!r}")
    from pipelines.keras_api import is_keras3

    if is_keras3():
        return _jax_device(use_gpu, index, key)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if use_gpu is True and not gpus:
        cuda = "with" if tf.test.is_built_with_cuda() else "without"
        raise NoGpuError(
            f"{key} is true but TensorFlow {tf.__version__} (built {cuda} CUDA) finds no GPU "
            f"on host {_host()}; set {key}=auto (use a GPU where there is one) "
            "or false, or install the gpu extra on a GPU host (make venv GPU=1: "
            "tensorflow[and-cuda]) and check that nvidia-smi sees the GPU"
        )
    if use_gpu is False or not gpus:
        _set_visible(tf, [])
        if gpus:
            log.info("%s is false: %d GPU(s) hidden, computing on the CPU", key, len(gpus))
        elif use_gpu == "auto":
            log.info("%s is auto and host %s has no GPU: computing on the CPU", key, _host())
        return _visible(tf, key, wanted=None)
    gpu = gpus[index % len(gpus)]
    _set_visible(tf, [gpu])
    try:
        tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        log.warning("TensorFlow already initialised: memory growth of %s unchanged", gpu.name)
    return _visible(tf, key, wanted=gpu)


@contextmanager
def precision(mixed: bool, device: str) -> Iterator[str]:
    """Set Keras' global dtype policy for the block, and restore the previous one after.

    Mixed float16 only pays on a GPU (on a CPU float16 is emulated, many times slower), so
    with ``mixed`` on a CPU device (``use_gpu: auto`` on a host without a GPU) the block
    runs in float32 and a warning says so. Restoring matters because the local launcher
    trains in the caller's process.

    Args:
        mixed: ``train.mixed_precision``.
        device: What :func:`pin_device` returned.

    Yields:
        The policy in force: ``"mixed_float16"`` or ``"float32"``.

    """
    from pipelines.keras_api import keras

    policies = keras().mixed_precision
    previous = policies.global_policy()
    name = MIXED if mixed and device != CPU else FLOAT32
    if mixed and name == FLOAT32:
        log.warning("train.mixed_precision needs a GPU; training in float32 on the CPU")
    policies.set_global_policy(name)
    try:
        yield name
    finally:
        policies.set_global_policy(previous)


def _jax_device(use_gpu: bool | str, index: int, key: str) -> str:
    """The Keras stack's :func:`pin_device`: the device JAX computes on in this process.

    JAX fixes its platforms at its first use, from ``JAX_PLATFORMS`` (the keras launcher
    sets ``cpu`` for its ranks when ``use_gpu`` is false); its GPU where it has one (a
    ``jax[cuda12]`` install on a GPU host), the same code otherwise.
    """
    import jax

    devices = jax.local_devices()
    gpus = [d for d in devices if d.platform == "gpu"]
    if use_gpu is True and not gpus:
        raise NoGpuError(
            f"{key} is true but JAX {jax.__version__} finds no GPU on host {_host()} "
            f"(platform {devices[0].platform}); set {key}=auto or false, or install the "
            "keras-gpu extra on a GPU host (make venv STACK=keras GPU=1: jax[cuda12])"
        )
    if use_gpu is False or not gpus:
        return CPU
    gpu = gpus[index % len(gpus)]
    return f"GPU:{gpu.id} ({gpu.device_kind})"


def _set_visible(tf: Any, gpus: list[Any]) -> None:
    try:
        tf.config.set_visible_devices(gpus, "GPU")
    except RuntimeError:
        # TensorFlow already ran in this process (the local launcher after other work, a
        # reused Spark Python worker): the devices stay as they are; _visible reports them.
        log.warning("TensorFlow already initialised: visible GPUs unchanged")


def _visible(tf: Any, key: str, wanted: Any) -> str:
    """Describe the GPU TensorFlow will really use (the first visible), or the CPU."""
    visible = tf.config.get_visible_devices("GPU")
    if not visible:
        if wanted is not None:
            raise NoGpuError(
                f"{key}: {wanted.name} cannot be made visible on host {_host()}: TensorFlow "
                "had already started in this process with the GPUs hidden"
            )
        return CPU
    gpu = wanted if wanted in visible else visible[0]
    number = gpu.name.rsplit(":", 1)[-1]
    name = tf.config.experimental.get_device_details(gpu).get("device_name")
    return f"GPU:{number} ({name})" if name else f"GPU:{number}"


def _host() -> str:
    return socket.gethostname()
