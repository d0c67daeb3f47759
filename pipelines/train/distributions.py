"""The rank side of distributed training: what a training rank asks of its runtime.

In: the launcher kind a rank was started by (``train.launcher``). Out: a
:class:`Distribution`: the rank's number and world, the optimizer wrapper and callbacks that
keep ranks in step, model loading, and object collectives. Worker code
(:mod:`pipelines.train.worker`) reaches every distributed step through it, so it never
imports Horovod (or any other runtime): :func:`distribution` picks the implementation,
:class:`LocalDistribution` here for one in-process rank, and
:mod:`pipelines.train.horovod_distribution` for Horovod's ranks.

The driver side, which starts the ranks, is :mod:`pipelines.train.launchers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipelines.config import HorovodConfig


class Distribution(Protocol):
    """What a training rank needs from the distributed runtime."""

    rank: int
    size: int
    local_size: int
    #: This rank's index among the ranks on its host: which of the host's GPUs it pins.
    local_rank: int

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Wrap a Keras optimizer so gradients are averaged across ranks."""

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """Keras callbacks that keep ranks in step (run before any other callback)."""

    def load_model(self, path: str) -> Any:
        """Load a full Keras checkpoint (weights and optimizer state) for this runtime."""

    def broadcast(self, value: Any, name: str) -> Any:
        """Rank 0's ``value`` on every rank."""

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Elastic mode: the state restored after a reset (model, optimizer, ``values``)."""

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Elastic mode: ``fn(state)`` re-entered after every reset of the world."""

    def elastic_callbacks(self, state: Any) -> list:
        """Elastic mode: Keras callbacks tracking the epoch and committing the state."""


class LocalDistribution:
    """A world of one: every collective is the identity."""

    rank, size, local_size, local_rank = 0, 1, 1, 0

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Return the optimizer unchanged."""
        return optimizer

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """No callbacks: with one rank the learning rate is not scaled, so no warm-up."""
        return []

    def load_model(self, path: str) -> Any:
        """Load with plain Keras."""
        from pipelines.keras_api import keras

        return keras().models.load_model(path)

    def broadcast(self, value: Any, name: str) -> Any:
        """Return the value unchanged."""
        return value

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Return the one value as a list."""
        return [value]

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Not available: elastic mode needs the Horovod launcher (the config says so)."""
        raise NotImplementedError("elastic mode needs train.launcher=horovod")

    elastic_run = elastic_callbacks = elastic_state


def distribution(
    kind: str,
    elastic: bool = False,
    knobs: HorovodConfig | None = None,
    seed: int | None = None,
) -> Distribution:
    """The :class:`Distribution` a worker started by launcher ``kind`` runs under.

    Args:
        kind: ``horovod``, ``keras`` or ``local``.
        elastic: Horovod elastic mode.
        knobs: Horovod's performance settings (``train.horovod``); unused otherwise.
        seed: keras: every rank seeds alike before building, so their weights agree.
    """
    if kind == "keras":
        from pipelines.train.jax_distribution import JaxDistribution

        return JaxDistribution(seed=seed)
    if kind != "horovod":
        return LocalDistribution()
    from pipelines.train.horovod_distribution import (
        ElasticHorovodDistribution,
        HorovodDistribution,
    )

    return ElasticHorovodDistribution(knobs) if elastic else HorovodDistribution(knobs)
