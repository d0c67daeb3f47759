"""Horovod's ranks: :class:`~pipelines.train.distributions.Distribution` over Horovod's Keras API.

In: a rank process started by :class:`~pipelines.train.horovod_launcher.HorovodSparkLauncher`.
Out: :class:`HorovodDistribution` (``hvd.init()``, averaged gradients, rank 0's initial
weights broadcast, averaged metrics, learning-rate warm-up, batch-norm moving statistics
averaged at every epoch end, object collectives) and
:class:`ElasticHorovodDistribution` (the same in elastic mode, with the state committed and
restored across resets). With :mod:`~pipelines.train.horovod_launcher` and
:mod:`~pipelines.train.horovod_patches`, the only modules importing Horovod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.train.distributions import LocalDistribution

if TYPE_CHECKING:
    from pipelines.config import HorovodConfig


class HorovodDistribution:
    """Horovod's Keras API; :meth:`__init__` calls ``hvd.init()``.

    Args:
        knobs: Horovod's performance settings (``train.horovod``); None: Horovod's defaults.
    """

    def __init__(self, knobs: HorovodConfig | None = None) -> None:
        import os

        import horovod.tensorflow.keras as hvd

        if knobs is not None:
            # Horovod: its background thread reads fusion, cycle time and autotune at init.
            os.environ.update(knobs.environment())
        hvd.init()
        self._hvd = hvd
        self._compression = (
            hvd.Compression.fp16 if knobs and knobs.compression == "fp16" else hvd.Compression.none
        )
        self._backward_passes = knobs.backward_passes_per_step if knobs else 1
        self.rank, self.size, self.local_size = hvd.rank(), hvd.size(), hvd.local_size()
        self.local_rank = hvd.local_rank()

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Horovod: average gradients across ranks with allreduce."""
        if self.size == 1:
            # Nothing to average: the per-step allreduce through Horovod's background
            # thread measured 10-15% of a small model's step (dlpipe bench train).
            return optimizer
        return self._distributed(optimizer)

    def _distributed(self, optimizer: Any) -> Any:
        """Horovod: ``DistributedOptimizer`` with the configured compression and passes."""
        return self._hvd.DistributedOptimizer(
            optimizer,
            compression=self._compression,
            backward_passes_per_step=self._backward_passes,
        )

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """Horovod: broadcast rank 0's initial weights, average metrics, warm the rate up."""
        hvd = self._hvd
        callbacks = [
            # Horovod: start every rank from rank 0's weights (random init or checkpoint).
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            # Horovod: average epoch metrics so early stopping decides the same everywhere.
            hvd.callbacks.MetricAverageCallback(),
        ]
        if warmup_epochs > 0 and self.size > 1:
            # Horovod: ramp from the one-rank rate to the scaled one (Goyal et al., 2017).
            callbacks.append(
                hvd.callbacks.LearningRateWarmupCallback(
                    initial_lr=initial_lr,
                    warmup_epochs=warmup_epochs,
                    steps_per_epoch=steps_per_epoch,
                    verbose=0,
                )
            )
        return callbacks

    def sync_model_state(self, model: Any) -> None:
        """Horovod: average the batch-norm moving statistics across ranks, in one allreduce.

        Why averaging at each epoch end rather than synchronised batch normalisation
        (``hvd.SyncBatchNormalization``): the model keeps Keras' own layers, so the saved
        model and every pretrained backbone load and serve without Horovod; it costs one
        allreduce per epoch instead of two per batch-norm layer per step; and the moving
        statistics, which are all that inference uses, become the mean over every rank's
        batches. Batch statistics during a step stay per rank (``train.batch_size`` rows),
        as in Horovod's own Keras examples.
        """
        if self.size == 1:
            return
        import horovod.tensorflow as hvd_tf
        import tensorflow as tf

        from pipelines.model_layers import moving_statistics

        variables = moving_statistics(model)
        if not variables:
            return
        flat = tf.concat([tf.reshape(tf.cast(v, tf.float32), [-1]) for v in variables], 0)
        # Horovod: one fused allreduce for every layer's statistics.
        mean = hvd_tf.allreduce(flat, op=hvd_tf.Average, name="moving_statistics")
        offset = 0
        for variable in variables:
            size = int(np.prod(variable.shape))
            part = tf.reshape(mean[offset : offset + size], variable.shape)
            variable.assign(tf.cast(part, variable.dtype))
            offset += size

    def load_model(self, path: str) -> Any:
        """Horovod: reload with the optimizer state, re-wrapped in a DistributedOptimizer."""
        if self.size == 1:
            return LocalDistribution().load_model(path)
        return self._load_wrapped(path)

    def _load_wrapped(self, path: str) -> Any:
        """Horovod: ``hvd.load_model``, mixed-precision checkpoints included.

        Such a checkpoint holds ``LossScaleOptimizer(inner)``: Horovod must wrap the inner
        optimizer (its own mapping would wrap the LossScaleOptimizer and fail).
        """
        return self._hvd.load_model(
            path,
            compression=self._compression,
            legacy_opts=True,
            custom_objects={"lossscaleoptimizer": self._loss_scale_optimizer},
        )

    def _loss_scale_optimizer(self, inner_optimizer: dict[str, Any], **config: Any) -> Any:
        """Horovod: rebuild ``LossScaleOptimizer(DistributedOptimizer(inner))`` from its config."""
        from pipelines.keras_api import keras

        k = keras()
        inner = k.optimizers.deserialize(inner_optimizer, use_legacy_optimizer=True)
        if not hasattr(inner, "_allreduce"):  # hvd.load_model's scope may have wrapped it
            inner = self.wrap_optimizer(inner)
        return k.mixed_precision.LossScaleOptimizer(inner, **config)

    def broadcast(self, value: Any, name: str) -> Any:
        """Horovod: rank 0's value everywhere."""
        import horovod.tensorflow as hvd_tf

        return hvd_tf.broadcast_object(value, root_rank=0, name=name)

    def allgather(self, value: Any, name: str) -> list[Any]:
        """Horovod: every rank's value everywhere."""
        import horovod.tensorflow as hvd_tf

        return hvd_tf.allgather_object(value, name=name)


class ElasticHorovodDistribution(HorovodDistribution):
    """Horovod elastic: rank and size are read afresh, as a reset may change them."""

    @property  # type: ignore[override]
    def rank(self) -> int:
        """Horovod: this rank in the current world."""
        return self._hvd.rank()

    @rank.setter
    def rank(self, value: int) -> None:  # set once by HorovodDistribution.__init__
        pass

    @property  # type: ignore[override]
    def size(self) -> int:
        """Horovod: the current world size."""
        return self._hvd.size()

    @size.setter
    def size(self, value: int) -> None:
        pass

    @property  # type: ignore[override]
    def local_rank(self) -> int:
        """Horovod: this rank's index on its host in the current world."""
        return self._hvd.local_rank()

    @local_rank.setter
    def local_rank(self, value: int) -> None:
        pass

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """Horovod: always average gradients, as the world may change size."""
        return self._distributed(optimizer)

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list:
        """As non-elastic, less the initial broadcast: the elastic state's sync does it."""
        # Horovod: the first callback of the parent is BroadcastGlobalVariablesCallback.
        return super().callbacks(
            initial_lr=initial_lr, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch
        )[1:]

    def load_model(self, path: str) -> Any:
        """Horovod: always re-wrap the optimizer, even in a world of one."""
        return self._load_wrapped(path)

    def elastic_state(self, model: Any, **values: Any) -> Any:
        """Horovod: weights, optimizer and ``values``, committed and restored together."""
        return self._hvd.elastic.KerasState(model, **values)

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Horovod: restore the last commit and call ``fn`` again when the world resets."""
        return self._hvd.elastic.run(fn)

    def elastic_callbacks(self, state: Any) -> list:
        """Horovod: count epochs in the state, then commit it at the end of every epoch."""
        return [
            # state.epoch = the epochs completed, for the restart after a reset.
            _epoch_state_callback(state),
            # Horovod: commit only at epoch ends (a commit copies every weight).
            self._hvd.elastic.CommitStateCallback(state, batches_per_commit=1 << 30),
        ]


def _epoch_state_callback(state: Any) -> Any:
    """A Keras callback setting ``state.epoch`` to the epochs completed, at each epoch's end.

    Not Horovod's ``UpdateEpochStateCallback``: it adds the state's epoch to Keras' epoch
    index, which is right for ``fit(epochs=remaining)``, while training here calls
    ``fit(initial_epoch=state.epoch, epochs=train.epochs)`` (the index is already the
    run's): after a reset it counted the epochs before it twice, skipping epochs.
    """
    from pipelines.keras_api import keras

    class EpochState(keras().callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            state.epoch = epoch + 1

    return EpochState()
