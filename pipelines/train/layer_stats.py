"""How every layer trains: per-epoch statistics of each layer with weights, on rank 0.

In: the model being fitted (through the Keras callback :func:`layer_stats_callback` builds)
and a fixed probe batch taken once before ``fit`` (:func:`probe_batch`). Out, appended at
every epoch end to two plain dicts the caller owns (small, JSON and pickle friendly):

- ``stats``: ``{"<layer>/<stat>": [value of epoch 0, epoch 1, ...]}`` for every ``<stat>``
  of :data:`STATS`:

  - ``weight_norm``: L2 norm of the layer's trainable weights (kernel and bias together);
  - ``grad_norm``: L2 norm of the gradient of the loss on the probe batch with respect to
    them (regularisation included, as the optimizer sees it, loss scaling undone);
  - ``update_ratio``: ``||W_e - W_{e-1}|| / ||W_{e-1}||``, ``W_{-1}`` being the weights
    at the start of ``fit`` (the initial or resumed ones);
  - ``act_min``, ``act_max``, ``act_mean``: of the layer's output on the probe batch (after
    the layer's own activation, as ConvNetJS prints them).

- ``histograms``: ``{"<layer>/weights" | "<layer>/gradients": [rows of epoch 0, ...]}``,
  each epoch's rows ``[[left, right, count], ...]`` (:data:`HISTOGRAM_BUCKETS` buckets from
  the minimum to the maximum, TensorBoard's histogram layout; a constant tensor has every
  edge at its value and its whole count in the last bucket).

The value of epoch ``e`` is always at index ``e`` (missing epochs are NaN, or an empty
histogram), so a resumed run's lists, and those after a Horovod elastic reset, stay aligned.

Computed at the epoch end, after Horovod's averaging, so the weights are the ones every rank
holds. The probe pass runs in inference mode (``training=False``): no dropout mask, batch
normalisation on its moving statistics, so one epoch compares with the next on the same
function; its gradient is thus that of the inference-mode loss, not the last batch's. The
cost is one forward and backward pass over the probe batch per epoch, in one traced
function that returns a few numbers per layer; nothing is done per batch. TensorFlow and
Keras are imported inside the functions (``k``, the Keras module, is passed in).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

#: Rows of the fixed probe batch. Its forward and backward pass costs about what training
#: that many rows does: 32 (one default batch) is ~4 % of an epoch of the default digits run
#: (23 steps of 32 per rank); 64 would be ~9 %, over the 5 % budget.
PROBE_ROWS = 32
#: Buckets of every weight and gradient histogram (TensorBoard's default).
HISTOGRAM_BUCKETS = 30
#: The statistics recorded per layer and epoch, in this order.
STATS = ("weight_norm", "grad_norm", "update_ratio", "act_min", "act_max", "act_mean")
#: The histograms recorded per layer and epoch.
HISTOGRAMS = ("weights", "gradients")


def probe_batch(data: Iterable[Any], rows: int = PROBE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` rows of a dataset of ``(x, y)`` batches, as numpy arrays.

    Args:
        data: Batches, e.g. the unshuffled validation feed (which starts from its first row
            on every new iterator, so the probe is the same rows on every run).
        rows: How many rows to keep; fewer when ``data`` ends sooner.

    Returns:
        ``(x, y)``.

    Raises:
        ValueError: ``data`` has no rows.
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have = 0
    for x, y in data:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
        have += len(xs[-1])
        if have >= rows:
            break  # drops the iterator: an infinite feed's reader stops with it
    if not have:
        raise ValueError("layer stats: the probe dataset has no rows")
    return np.concatenate(xs)[:rows], np.concatenate(ys)[:rows]


def weighted_layers(model: Any) -> list[Any]:
    """The model's layers with trainable weights, in model order."""
    return [layer for layer in model.layers if layer.trainable_weights]


def layer_stats_callback(
    k: Any,
    probe: tuple[np.ndarray, np.ndarray],
    stats: dict[str, list[float]],
    histograms: dict[str, list[list[list[float]]]],
    *,
    buckets: int = HISTOGRAM_BUCKETS,
) -> Any:
    """A Keras callback recording every weighted layer's statistics at each epoch end.

    Args:
        k: The Keras module.
        probe: The fixed probe batch ``(x, y)`` (see :func:`probe_batch`).
        stats: Filled as the module docstring says (existing epochs are kept: a resumed
            run passes its checkpoint's lists).
        histograms: Likewise, the weight and gradient histograms.
        buckets: Buckets per histogram.

    Returns:
        The callback; its ``seconds`` lists the wall time it took at each epoch end.
    """

    class LayerStats(k.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._layers: list[Any] = []
            self._compute: Any = None

        def on_train_begin(self, logs: dict | None = None) -> None:
            # The model (new, resumed or restored after an elastic reset) is known only now.
            self._layers = weighted_layers(self.model)
            build = _jax_epoch_function if _keras3() else _epoch_function
            self._compute = build(k, self.model, self._layers, probe, buckets)
            if self._layers and hasattr(self._compute, "get_concrete_function"):
                self._compute.get_concrete_function()  # trace now, not in the first epoch

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if not self._layers:
                return
            start = time.perf_counter()
            scalars, edges, counts = (np.asarray(t) for t in self._compute())
            for i, layer in enumerate(self._layers):
                for j, name in enumerate(STATS):
                    _put(stats.setdefault(f"{layer.name}/{name}", []), epoch, float(scalars[i, j]))
                for j, kind in enumerate(HISTOGRAMS):
                    rows = histogram_rows(edges[i, j, 0], edges[i, j, 1], counts[i, j])
                    _put(histograms.setdefault(f"{layer.name}/{kind}", []), epoch, rows)
            self.seconds.append(time.perf_counter() - start)

    return LayerStats()


def histogram_rows(low: float, high: float, counts: np.ndarray) -> list[list[float]]:
    """``[[left, right, count], ...]`` of equal buckets from ``low`` to ``high``.

    TensorBoard's layout: a constant tensor (``low == high``) has every edge at its value
    and its whole count in the last bucket.
    """
    low, high = float(low), float(high)
    n = len(counts)
    if high > low:
        edges = np.linspace(low, high, n + 1)
        edges[-1] = high  # exactly the maximum, whatever linspace's rounding
    else:
        edges = np.full(n + 1, high)
    return [[float(edges[i]), float(edges[i + 1]), float(counts[i])] for i in range(n)]


def _put(series: list, epoch: int, value: Any) -> None:
    """Set ``series[epoch]``, dropping later epochs and padding missing ones."""
    del series[epoch:]  # an epoch run again (elastic reset) replaces its old value
    pad: Any = [] if isinstance(value, list) else math.nan
    series.extend([pad] * (epoch - len(series)))
    series.append(value)


def _epoch_function(
    k: Any, model: Any, layers: list[Any], probe: tuple[np.ndarray, np.ndarray], buckets: int
) -> Any:
    """A traced function returning this epoch's numbers, all layers at once.

    Returns:
        A function of no argument returning ``(scalars (L, len(STATS)) float32, edges
        (L, 2, 2) float32 [[w_min, w_max], [g_min, g_max]], counts (L, 2, buckets) int32)``;
        each call also makes the current weights the previous ones of the next call.
    """
    import tensorflow as tf

    x = tf.constant(probe[0])
    y = tf.constant(probe[1])
    outputs = [layer.output for layer in layers]
    probe_model = k.Model(model.inputs, [*outputs, model.outputs[0]])
    loss_fn = k.losses.get(model.loss)
    optimizer = getattr(model, "optimizer", None)
    # Mixed precision: float16 gradients underflow without the loss scale.
    scaled = isinstance(optimizer, k.mixed_precision.LossScaleOptimizer)
    groups = [list(layer.trainable_weights) for layer in layers]
    variables = [v for group in groups for v in group]
    previous = [tf.Variable(_float32(v), trainable=False) for v in variables]
    spans, start = [], 0
    for group in groups:
        spans.append((start, start + len(group)))
        start += len(group)

    @tf.function
    def compute() -> tuple[Any, Any, Any]:
        with tf.GradientTape() as tape:
            values = probe_model(x, training=False)
            loss = tf.reduce_mean(tf.cast(loss_fn(y, values[-1]), tf.float32))
            if probe_model.losses:  # weight decay: part of the gradient the optimizer gets
                loss += tf.add_n([tf.cast(v, tf.float32) for v in probe_model.losses])
            target = optimizer.get_scaled_loss(loss) if scaled else loss
        grads = tape.gradient(target, variables)
        if scaled:
            grads = optimizer.get_unscaled_gradients(grads)
        grads = [
            tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)
        ]
        # Per variable, never concatenated: no copy of a large kernel per statistic.
        weights = [_float32(v) for v in variables]
        scalars, edges, counts = [], [], []
        for (lo, hi), activation in zip(spans, values[:-1], strict=True):
            w_norm, w_edges, w_counts = _histogram(weights[lo:hi], buckets)
            g_norm, g_edges, g_counts = _histogram([_float32(g) for g in grads[lo:hi]], buckets)
            before = _norm(previous[lo:hi])
            change = _norm([w - b for w, b in zip(weights[lo:hi], previous[lo:hi], strict=True)])
            ratio = tf.where(before > 0, change / before, float("nan"))
            act = tf.cast(activation, tf.float32)
            row = [w_norm, g_norm, ratio, tf.reduce_min(act), tf.reduce_max(act)]
            scalars.append(tf.stack([*row, tf.reduce_mean(act)]))
            edges.append(tf.stack([w_edges, g_edges]))
            counts.append(tf.stack([w_counts, g_counts]))
        # After every read above (tf.function orders ops on the same variable).
        for keep, w in zip(previous, weights, strict=True):
            keep.assign(w)
        return tf.stack(scalars), tf.stack(edges), tf.stack(counts)

    return compute


def _keras3() -> bool:
    from pipelines.keras_api import is_keras3

    return is_keras3()


def _jax_epoch_function(
    k: Any, model: Any, layers: list[Any], probe: tuple[np.ndarray, np.ndarray], buckets: int
) -> Any:
    """:func:`_epoch_function` on the Keras stack: ``jax.grad`` over ``stateless_call``.

    Rank 0 alone computes it, so it works on this process's own copy of every variable
    (``addressable_data``: the replicated values of keras' ``DataParallel``), and the
    statistics in numpy: the probe batch is small, and no collective may run on one rank.
    """
    import jax
    import jax.numpy as jnp

    x, y = jnp.asarray(probe[0]), jnp.asarray(probe[1])
    probe_model = k.Model(model.inputs, [*[layer.output for layer in layers], model.outputs[0]])
    loss_fn = k.losses.get(model.loss)
    index = {id(v): i for i, v in enumerate(probe_model.trainable_variables)}
    groups = [[index[id(v)] for v in layer.trainable_weights] for layer in layers]
    previous: list[list[np.ndarray]] = []

    def local(variable: Any) -> Any:
        value = variable.value
        own = value.addressable_data(0) if hasattr(value, "addressable_data") else value
        return jnp.asarray(own)

    def loss_of(trainable: list[Any], non_trainable: list[Any]) -> tuple[Any, Any]:
        values, _, losses = probe_model.stateless_call(
            trainable, non_trainable, x, training=False, return_losses=True
        )
        loss = jnp.mean(loss_fn(y, values[-1]).astype(jnp.float32))
        for extra in losses:  # weight decay: part of the gradient the optimizer gets
            loss = loss + jnp.asarray(extra, jnp.float32)
        return loss, values

    gradient = jax.jit(jax.grad(loss_of, has_aux=True))

    def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        trainable = [local(v) for v in probe_model.trainable_variables]
        non_trainable = [local(v) for v in probe_model.non_trainable_variables]
        grads, values = gradient(trainable, non_trainable)
        weights = [np.asarray(t, np.float32) for t in trainable]
        grads = [np.asarray(g, np.float32) for g in grads]
        if not previous:
            previous.append(weights)  # the weights at the start of fit
        scalars, edges, counts = [], [], []
        for group, activation in zip(groups, values[:-1], strict=True):
            w = [weights[i] for i in group]
            g = [grads[i] for i in group]
            before = [previous[0][i] for i in group]
            w_norm, w_edges, w_counts = _np_histogram(w, buckets)
            g_norm, g_edges, g_counts = _np_histogram(g, buckets)
            norm_before = _np_norm(before)
            change = _np_norm([a - b for a, b in zip(w, before, strict=True)])
            ratio = change / norm_before if norm_before > 0 else math.nan
            act = np.asarray(activation, np.float32)
            scalars.append([w_norm, g_norm, ratio, act.min(), act.max(), act.mean()])
            edges.append([w_edges, g_edges])
            counts.append([w_counts, g_counts])
        previous[0] = weights
        return np.asarray(scalars, np.float32), np.asarray(edges, np.float32), np.asarray(counts)

    return compute


def _np_norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def _np_histogram(arrays: list[np.ndarray], buckets: int) -> tuple[float, list[float], Any]:
    """:func:`_histogram` in numpy (TensorBoard's layout: a constant one in the last bucket)."""
    flat = np.concatenate([a.ravel() for a in arrays])
    low, high = float(flat.min()), float(flat.max())
    if high > low:
        counts, _ = np.histogram(flat, bins=buckets, range=(low, high))
    else:
        counts = np.zeros(buckets, np.int64)
        counts[-1] = flat.size
    return _np_norm(arrays), [low, high], counts.astype(np.int32)


def _float32(tensor: Any) -> Any:
    import tensorflow as tf

    return tf.cast(tf.convert_to_tensor(tensor), tf.float32)


def _norm(tensors: list[Any]) -> Any:
    """The L2 norm of the tensors taken together."""
    import tensorflow as tf

    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def _histogram(tensors: list[Any], buckets: int) -> tuple[Any, Any, Any]:
    """``(norm, [min, max], counts)`` of the tensors taken together, in equal buckets."""
    import tensorflow as tf

    low = tf.reduce_min(tf.stack([tf.reduce_min(t) for t in tensors]))
    high = tf.reduce_max(tf.stack([tf.reduce_max(t) for t in tensors]))
    # A constant tensor: any positive range puts it all in the first bucket; TensorBoard
    # puts it in the last one, which histogram_rows does by reversing it.
    wide = tf.stack([low, tf.where(high > low, high, low + 1.0)])
    counts = tf.add_n([tf.histogram_fixed_width(t, wide, nbins=buckets) for t in tensors])
    counts = tf.where(high > low, counts, tf.reverse(counts, [0]))
    return _norm(tensors), tf.stack([low, high]), counts
