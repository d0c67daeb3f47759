"""The Keras stack's tests (``make test STACK=keras``): Python 3.12, Keras 3 on JAX, Spark 4.

Collected only where Keras 3 and JAX are installed. Elsewhere (the pinned stack's venv, whose
``keras`` is Keras 2) no test module of this folder is even imported: they are ignored before
collection, and this file imports neither Keras nor JAX to decide.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os


def _keras_stack() -> bool:
    """Whether Keras 3 and JAX are installed (read from the metadata, nothing imported)."""
    try:
        major = int(importlib.metadata.version("keras").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 3 and importlib.util.find_spec("jax") is not None


if _keras_stack():
    # Before any test imports Keras: its backend is chosen once, at import.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    collect_ignore_glob = ["*.py"]
