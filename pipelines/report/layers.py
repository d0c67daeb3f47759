"""Run-report section "how every layer trains": per-layer statistics, histograms, warnings.

In: rank 0's per-layer records of a training run, as
:mod:`pipelines.train.layer_stats` documents them (``layer_stats``: ``"<layer>/<stat>"`` ->
one value per epoch; ``layer_histograms``: ``"<layer>/weights"`` or
``"<layer>/gradients"`` -> one ``[[left, right, count], ...]`` per epoch), and the gradient
norm thresholds of ``train.grad_vanish_below`` and ``train.grad_explode_above``.
Out, under the section's directory: ``layer_stats.csv`` (one row per epoch and layer,
epochs counted from 1 as in ``learning_curves.csv``), ``layer_stats.png`` (one panel per
statistic, a line per layer) and TensorBoard histogram events of the weights and gradients
(``tensorboard/histograms``, step = epoch from 0 as the TensorBoard scalars); and the
section's summary: the layers, and a warning per layer whose gradient vanished or exploded.
TensorFlow and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.plots import new_figure, save_png, shorten, suptitle

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The per-layer statistics, in column order (as :data:`pipelines.train.layer_stats.STATS`;
#: not imported from there, so the report never needs the training package).
STATS = ("weight_norm", "grad_norm", "update_ratio", "act_min", "act_max", "act_mean")
#: Panel titles of :data:`STATS`.
TITLES = {
    "weight_norm": "weight norm ||W||",
    "grad_norm": "gradient norm (probe batch)",
    "update_ratio": "update / weight ||ΔW|| / ||W||",
    "act_min": "activation min",
    "act_max": "activation max",
    "act_mean": "activation mean",
}
#: Statistics drawn on a log scale (when every value is positive).
LOG_SCALE = ("weight_norm", "grad_norm", "update_ratio")
#: Where the TensorBoard histogram events go, under the section's directory.
HISTOGRAM_EVENTS = Path("tensorboard") / "histograms"


@dataclass(frozen=True)
class LayerRecords:
    """Rank 0's per-layer records of a run and the thresholds its warnings use.

    Attributes:
        stats: ``"<layer>/<stat>"`` -> one value per epoch (NaN: not recorded).
        histograms: ``"<layer>/<weights|gradients>"`` -> ``[[left, right, count], ...]``
            per epoch.
        vanish_below: A gradient norm below this is flagged as vanishing
            (``train.grad_vanish_below``).
        explode_above: A gradient norm above this, or not finite, is flagged as exploding
            (``train.grad_explode_above``).
    """

    stats: Mapping[str, Sequence[float]] = field(default_factory=dict)
    histograms: Mapping[str, Sequence[Sequence[Sequence[float]]]] = field(default_factory=dict)
    vanish_below: float = 1.0e-7
    explode_above: float = 1000.0


def write_layer_section(out: str | Path, records: LayerRecords) -> dict[str, Any]:
    """Write the per-layer CSV, figure and TensorBoard histograms; flag bad gradients.

    Args:
        out: The report directory (written into; ``tensorboard/histograms`` below it).
        records: The statistics, histograms and thresholds.

    Returns:
        ``{"layer_stats": {"layers", "epochs", "warnings", "histograms"}}``; each warning
        ``{"layer", "epoch" (from 1), "stat", "value", "kind", "epochs", "message"}`` is the
        first epoch of a layer's vanishing or exploding gradient, ``epochs`` how many epochs
        were. With nothing recorded, no file and a ``note``.
    """
    out = Path(out)
    layer_stats = records.stats
    vanish_below, explode_above = records.vanish_below, records.explode_above
    layers = layer_names(layer_stats)
    if not layers:
        return {
            "layer_stats": {"layers": [], "epochs": 0, "warnings": [], "histograms": 0},
            "note": "no per-layer statistics were recorded (train.layer_stats is off?)",
        }
    out.mkdir(parents=True, exist_ok=True)
    epochs = max(len(values) for values in layer_stats.values())
    _write_csv(out / "layer_stats.csv", layer_stats, layers, epochs)
    save_png(
        plot_layer_stats(layer_stats, layers, vanish_below, explode_above), out / "layer_stats.png"
    )
    from pipelines.keras_api import is_keras3

    result: dict[str, Any] = {}
    if is_keras3():  # no TensorFlow or TensorBoard on the Keras stack to write events with
        from pipelines.report.artifacts import NO_TENSORBOARD

        written, result["note"] = 0, NO_TENSORBOARD
    else:
        written = write_histogram_events(out / HISTOGRAM_EVENTS, records.histograms)
    return {
        "layer_stats": {
            "layers": layers,
            "epochs": epochs,
            "warnings": gradient_warnings(layer_stats, layers, vanish_below, explode_above),
            "histograms": written,
        },
        **result,
    }


def layer_names(layer_stats: Mapping[str, Sequence[float]]) -> list[str]:
    """The layers of ``"<layer>/<stat>"`` keys, in the order first seen (model order)."""
    names: dict[str, None] = {}
    for key in layer_stats:
        layer, _, stat = key.rpartition("/")
        if layer and stat in STATS:
            names.setdefault(layer)
    return list(names)


def gradient_warnings(
    layer_stats: Mapping[str, Sequence[float]],
    layers: Sequence[str],
    vanish_below: float,
    explode_above: float,
) -> list[dict[str, Any]]:
    """One warning per layer and kind (vanishing, exploding): its first epoch and count."""
    warnings = []
    for layer in layers:
        norms = [float(v) for v in layer_stats.get(f"{layer}/grad_norm", [])]
        kinds = {
            "vanishing": [e for e, v in enumerate(norms) if v < vanish_below],
            "exploding": [e for e, v in enumerate(norms) if not v <= explode_above],
        }
        for kind, hits in kinds.items():
            if not hits:
                continue
            epoch, value = hits[0] + 1, norms[hits[0]]
            if kind == "vanishing":
                why = f"below {vanish_below:g} (vanishing: the layer barely learns)"
            elif math.isfinite(value):
                why = f"above {explode_above:g} (exploding: its updates may blow the weights up)"
            else:
                why = "not finite (exploding: training diverged)"
            warnings.append(
                {
                    "layer": layer,
                    "epoch": epoch,
                    "stat": "grad_norm",
                    "value": value,
                    "kind": kind,
                    "epochs": len(hits),
                    "message": (
                        f"{layer}: gradient norm {value:.3g} at epoch {epoch} is {why}, in "
                        f"{len(hits)} of {len(norms)} epochs"
                    ),
                }
            )
    return warnings


def plot_layer_stats(
    layer_stats: Mapping[str, Sequence[float]],
    layers: Sequence[str],
    vanish_below: float | None = None,
    explode_above: float | None = None,
) -> Figure:
    """One small panel per statistic (3 x 2, 900 px wide), one line per layer.

    A gradient threshold is drawn in its panel when the norms come within a decade of it
    (drawing it always would squash the curves on the log scale).
    """
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(9.0, 5.6 + 0.18 * math.ceil(len(layers) / 4))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    colours = _colours(len(layers))
    epochs = max(len(values) for values in layer_stats.values())
    for ax, stat in zip(axes, STATS, strict=True):
        drawn: list[float] = []
        for layer, colour in zip(layers, colours, strict=True):
            values = np.asarray(layer_stats.get(f"{layer}/{stat}", []), dtype=float)
            if not len(values):
                continue
            ax.plot(np.arange(1, len(values) + 1), values, color=colour, lw=1.3, label=layer)
            drawn += [v for v in values.tolist() if math.isfinite(v)]
        if stat in LOG_SCALE and drawn and min(drawn) > 0:
            _log_axis(ax, min(drawn), max(drawn))
            if stat == "grad_norm":
                _thresholds(ax, drawn, vanish_below, explode_above)
        ax.set_title(TITLES[stat], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        [shorten(label, 28) for label in labels],
        loc="outside lower center",
        ncol=min(4, len(labels)),
        fontsize=8,
    )
    suptitle(fig, f"How each layer trains ({len(layers)} layers, {epochs} epochs, probe batch)")
    return fig


def write_histogram_events(
    folder: Path, layer_histograms: Mapping[str, Sequence[Sequence[Sequence[float]]]]
) -> int:
    """Write each ``"<layer>/<kind>"`` histogram as TensorBoard histogram events, step = epoch.

    The histogram plugin's own format (a ``[k, 3]`` float64 tensor of ``[left, right,
    count]`` with its plugin metadata), built from the recorded buckets: no raw weights.

    Returns:
        The number of events written.
    """
    import tensorflow as tf
    from tensorboard.plugins.histogram import metadata

    written = 0
    writer = tf.summary.create_file_writer(str(folder))
    try:
        with writer.as_default():
            for tag, per_epoch in layer_histograms.items():
                layer, _, kind = tag.rpartition("/")
                meta = metadata.create_summary_metadata(
                    display_name=tag, description=f"{kind} of layer {layer} at each epoch end"
                )
                for epoch, rows in enumerate(per_epoch):
                    if not len(rows):  # an epoch not recorded
                        continue
                    tensor = tf.constant(np.asarray(rows, dtype=np.float64).reshape(-1, 3))
                    tf.summary.write(tag, tensor, step=epoch, metadata=meta)
                    written += 1
    finally:
        writer.flush()
        writer.close()
    return written


def _log_axis(ax: Any, low: float, high: float) -> None:
    """A log y axis; under two decades its 2s and 5s are labelled too (else one label)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    if high < low * 100:
        plain = FuncFormatter(lambda value, _: f"{value:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)


def _thresholds(
    ax: Any, values: Sequence[float], vanish_below: float | None, explode_above: float | None
) -> None:
    from matplotlib.transforms import blended_transform_factory

    low, high = min(values), max(values)
    where = blended_transform_factory(ax.transAxes, ax.transData)
    for level, label, near, valign in (
        (vanish_below, "vanishing below", vanish_below and vanish_below >= low / 10, "top"),
        (explode_above, "exploding above", explode_above and explode_above <= high * 10, "bottom"),
    ):
        if level and level > 0 and near:
            ax.axhline(level, color="grey", ls="--", lw=1)
            ax.text(
                0.98,
                level,
                f"{label} {level:g}",
                transform=where,
                ha="right",
                va=valign,
                fontsize=7,
                color="dimgrey",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )


def _colours(n: int) -> list[Any]:
    """Matplotlib's ten categorical colours; a depth-ordered colour map beyond ten layers."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    # Stops short of viridis' palest yellow, hard to see on white.
    return [colormaps["viridis"](0.9 * i / (n - 1)) for i in range(n)]


def _write_csv(
    path: Path, layer_stats: Mapping[str, Sequence[float]], layers: Sequence[str], epochs: int
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "layer", *STATS])
        for epoch in range(epochs):
            for layer in layers:
                row: list[Any] = [epoch + 1, layer]
                for stat in STATS:
                    values = layer_stats.get(f"{layer}/{stat}", [])
                    value = float(values[epoch]) if epoch < len(values) else math.nan
                    row.append("" if math.isnan(value) else value)  # NaN: not recorded
                writer.writerow(row)
