"""Which of the project's two stacks this process runs on, and what that means for a model.

In: the installed distributions (read from their metadata: nothing is imported). Out:
:func:`current`, ``default`` (TensorFlow 2.15, Keras 2, Horovod, Petastorm, Spark 3.5) or
``keras`` (Keras 3 on JAX, Spark 4, numpy 2, no TensorFlow: ``make venv STACK=keras``);
:func:`launcher_for`, the training launcher a configured one means on this stack; and
:func:`check_model_stack`, the one-line refusal of a model trained on the other stack.

Why a model is tied to its stack: a Keras 2 HDF5 file and a Keras 3 ``.keras`` file are
different formats (and Keras 3 reads a Keras 2 file's layers with other defaults), so a
model scored on the stack that did not train it could load wrongly or not at all. The
registered model records its stack (:data:`STACK_TAG` on the version and in the model's
own metadata); scoring and serving compare it with :func:`current` first.
"""

from __future__ import annotations

import functools
import importlib.metadata

from pipelines.errors import UserError

DEFAULT = "default"
KERAS = "keras"
#: The MLflow tag (run and model version) and model-metadata key naming the training stack.
STACK_TAG = "dlpipe.stack"


class WrongStackError(UserError):
    """A model trained on one stack was loaded on the other."""


@functools.cache
def current() -> str:
    """``keras`` where Keras 3 and JAX are installed (the Keras stack), else ``default``.

    Keras 3 alone is not enough: in the pinned stack's environment it is a broken pin
    (Horovod would stop averaging), which that stack's preflight reports as such.
    """
    try:
        major = int(importlib.metadata.version("keras").split(".")[0])
        importlib.metadata.version("jax")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return DEFAULT
    return KERAS if major >= 3 else DEFAULT


def launcher_for(configured: str, stack: str | None = None) -> str:
    """The launcher ``train.launcher: <configured>`` runs on ``stack`` (default: this one).

    ``horovod`` (the default) is the stack's distributed launcher: on the Keras stack, where
    Horovod cannot be installed, it runs as ``keras``, so one config serves both stacks.

    Raises:
        UserError: ``keras`` asked for on the default stack (it needs Keras 3 and JAX).
    """
    stack = stack or current()
    if stack == KERAS and configured == "horovod":
        return KERAS
    if stack == DEFAULT and configured == KERAS:
        raise UserError(
            "train.launcher=keras needs the Keras stack (Keras 3 on JAX: make venv STACK=keras); "
            "this environment is the default stack (use train.launcher=horovod)"
        )
    return configured


def check_model_stack(recorded: str | None, what: str, stack: str | None = None) -> None:
    """Refuse, in one line, a model that another stack trained.

    Args:
        recorded: The stack in the model's metadata; None (a model logged before stacks
            were recorded) counts as the default stack.
        what: The model, as the message names it (e.g. ``models:/digits@champion``).
        stack: The stack here (default: :func:`current`).

    Raises:
        WrongStackError: The stacks differ.
    """
    stack = stack or current()
    trained = recorded or DEFAULT
    if trained != stack:
        raise WrongStackError(
            f"{what} was trained on the {trained} stack and cannot run on the {stack} stack "
            f"(its Keras format differs): use the {trained} stack's environment "
            f"({_venv(trained)}), or retrain it on this one"
        )


def _venv(stack: str) -> str:
    return "make venv STACK=keras" if stack == KERAS else "make venv"
