"""Every text of every report figure lies inside the figure, for small and large inputs.

Each ``plot_*`` function of :mod:`pipelines.report.plots` is drawn on the Agg canvas with
its smallest and largest realistic inputs (one mistake and sixteen, two classes and ten and
twenty-five, long class and layer names), laid out as :func:`~pipelines.report.plots.save_png`
lays it out, and every visible, non-empty :class:`~matplotlib.text.Text` must lie within the
figure's bounding box: a title clipped at the PNG's edge fails here. No TensorFlow needed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from pipelines.report import plots

LONG = "a rather long class name"
SHORT_NAMES = ["0", "1"]


def _names(k: int, long: bool = False) -> list[str]:
    return [f"{LONG} {i}" if long else f"class{i}" for i in range(k)]


def _images(n: int, size: int = 16, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _misclassified_rows(count: int, names: list[str]) -> list[list[object]]:
    k = len(names)
    return [
        [r + 1, r, f"/data/{r}.png", names[r % k], names[(r + 1) % k], 0.99 - r / 100, 0.01]
        for r in range(count)
    ]


def _history(epochs: int) -> dict[str, list[float]]:
    return {
        "loss": list(np.linspace(2, 0.5, epochs)),
        "val_loss": list(np.linspace(2.2, 0.7, epochs)),
        "accuracy": list(np.linspace(0.2, 0.9, epochs)),
        "val_accuracy": list(np.linspace(0.2, 0.85, epochs)),
        "lr": [1e-3] * epochs,
    }


def _embeddings(n: int, k: int, tsne: bool, autoencoder: bool, long: bool):
    rng = np.random.default_rng(k)
    labels = np.arange(n) % k
    predicted = None if autoencoder else np.where(rng.random(n) < 0.1, (labels + 1) % k, labels)
    projections = {"pca": rng.normal(size=(n, 2))}
    if tsne:
        projections["tsne"] = rng.normal(size=(n, 2)) * 30
    layer = "a_long_embedding_layer_name" if long else "embedding"
    return plots.plot_embeddings(
        projections,
        labels,
        predicted,
        _names(k, long),
        layer,
        84,
        np.array([0.41, 0.22]),
        "dataset label (not used for training)" if autoencoder else "true class",
    )


def _activations(samples: int, long: bool):
    images = _images(samples)
    info = [{"index": 1000 + i, "label": _names(10, long)[i]} for i in range(samples)]
    shapes = [(16, 16, 6), (8, 8, 6), (4, 4, 16), (2, 2, 16)]
    rng = np.random.default_rng(samples)
    maps = [rng.random((samples, *shape)) for shape in shapes]
    layers_info = [
        {
            "name": f"{'block_with_a_long_name_' if long else ''}layer{i}",
            "type": "MaxPooling2D" if i % 2 else "Conv2D",
            "output_shape": list(shape),
            "max": 12.345678,
            "min": -0.000123,
        }
        for i, shape in enumerate(shapes)
    ]
    return plots.plot_activations(images, info, layers_info, maps)


def _reconstructions(count: int):
    x = _images(max(count, 1)).astype(np.float64) / 255
    errors = np.full(len(x), 0.0123)
    return plots.plot_reconstructions(x, x[::-1], list(range(count)), errors)


#: (id, a function drawing the figure).
FIGURES: list[tuple[str, Callable[[], object]]] = [
    (
        "curves-1-epoch",
        lambda: plots.plot_curves([("", _history(1))], "Learning curves (1 epochs)"),
    ),
    ("curves-30-epochs", lambda: plots.plot_curves([("", _history(30))], "Learning curves")),
    (
        "curves-compare-long-labels",
        lambda: plots.plot_curves(
            [
                (f"run-{i} (train.activation=sigmoid, train.learning_rate=0.001)", _history(5))
                for i in range(5)
            ],
            "Learning curves",
        ),
    ),
    ("curves-loss-only", lambda: plots.plot_curves([("", {"loss": [1.0, 0.5]})], "Curves")),
    ("confusion-2", lambda: plots.plot_confusion(np.array([[5, 1], [0, 7]]), SHORT_NAMES, 0.9)),
    (
        "confusion-10",
        lambda: plots.plot_confusion(np.arange(100).reshape(10, 10), _names(10), 0.123),
    ),
    (
        "confusion-10-long",
        lambda: plots.plot_confusion(np.arange(100).reshape(10, 10), _names(10, True), 0.5),
    ),
    (
        "confusion-2-long",
        lambda: plots.plot_confusion(np.array([[50, 1], [0, 700]]), _names(2, True), 0.99),
    ),
    ("misclassified-0", lambda: plots.plot_misclassified(_images(3), [], 0, 186)),
    (
        "misclassified-1",
        lambda: plots.plot_misclassified(_images(3), _misclassified_rows(1, _names(2)), 1, 3),
    ),
    (
        "misclassified-2-of-186",
        lambda: plots.plot_misclassified(_images(20), _misclassified_rows(2, _names(10)), 2, 186),
    ),
    (
        "misclassified-1-long",
        lambda: plots.plot_misclassified(
            _images(3), _misclassified_rows(1, _names(2, True)), 1, 10_000
        ),
    ),
    (
        "misclassified-16",
        lambda: plots.plot_misclassified(
            _images(20), _misclassified_rows(16, _names(10)), 1234, 10_000
        ),
    ),
    (
        "misclassified-16-long",
        lambda: plots.plot_misclassified(
            _images(20), _misclassified_rows(16, _names(10, True)), 16, 20
        ),
    ),
    ("tiles-1", lambda: plots.plot_tiles(np.random.default_rng(0).random((1, 5, 5, 1)), "f")),
    (
        "tiles-1-long-title",
        lambda: plots.plot_tiles(
            np.random.default_rng(0).random((1, 5, 5, 1)),
            "conv1: 1 filters 5x5x1 (each scaled to its own min..max)",
        ),
    ),
    (
        "tiles-64",
        lambda: plots.plot_tiles(
            np.random.default_rng(0).random((64, 3, 3, 3)),
            "dense: weights of 64 units as 28x28x1 (each scaled to its own min..max)",
        ),
    ),
    ("activations-1", lambda: _activations(1, False)),
    ("activations-1-long", lambda: _activations(1, True)),
    ("activations-4-long", lambda: _activations(4, True)),
    ("embeddings-2", lambda: _embeddings(10, 2, False, False, False)),
    ("embeddings-10-tsne", lambda: _embeddings(200, 10, True, False, False)),
    ("embeddings-10-long", lambda: _embeddings(200, 10, False, False, True)),
    ("embeddings-10-long-tsne", lambda: _embeddings(200, 10, True, False, True)),
    ("embeddings-25", lambda: _embeddings(200, 25, False, False, False)),
    ("embeddings-autoencoder", lambda: _embeddings(50, 3, False, True, False)),
    ("reconstructions-1", lambda: _reconstructions(1)),
    ("reconstructions-8", lambda: _reconstructions(8)),
]


def _undrawn_tick_labels(fig: object) -> set[int]:
    """Ids of the axis texts matplotlib keeps but does not draw (axes off, ticks off view)."""
    from matplotlib.text import Text

    hidden: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not ax.axison:  # ax.axis("off"): no ticks and no axis labels are drawn
                hidden.update(id(text) for text in axis.findobj(Text))
                continue
            low, high = sorted(axis.get_view_interval())
            slack = (high - low) * 1e-9
            for ticks, locs in (
                (axis.get_major_ticks(), axis.get_majorticklocs()),
                (axis.get_minor_ticks(), axis.get_minorticklocs()),
            ):
                for tick, loc in zip(ticks, locs, strict=False):
                    if not low - slack <= loc <= high + slack:
                        hidden.update((id(tick.label1), id(tick.label2)))
    return hidden


def assert_text_fits(fig: object, tolerance: float = 1.0) -> None:
    """Fail when a visible, non-empty text reaches outside its figure or subfigure.

    Args:
        fig: A :class:`matplotlib.figure.Figure` on its own canvas.
        tolerance: Pixels a text may overhang (anti-aliasing).

    """
    from matplotlib.text import Text

    fig.canvas.draw()  # runs the constrained layout, as savefig does
    renderer = fig.canvas.get_renderer()
    parts = [fig]
    for part in parts:  # grows: every subfigure, at any depth
        parts.extend(part.subfigs)
    hidden = set().union(*(_undrawn_tick_labels(part) for part in parts))
    outside = []
    for part in parts:
        box = part.bbox
        for text in part.findobj(Text):
            if id(text) in hidden or not text.get_visible() or not text.get_text().strip():
                continue
            extent = text.get_window_extent(renderer)
            if (
                extent.x0 < box.x0 - tolerance
                or extent.y0 < box.y0 - tolerance
                or extent.x1 > box.x1 + tolerance
                or extent.y1 > box.y1 + tolerance
            ):
                outside.append(f"{text.get_text()!r} at {extent.bounds} outside {box.bounds}")
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize("draw", [f for _, f in FIGURES], ids=[name for name, _ in FIGURES])
def test_every_text_lies_inside_the_figure(draw: Callable[[], object]) -> None:
    assert_text_fits(draw())


def test_the_check_catches_a_clipped_title() -> None:
    fig = plots.new_figure(2.0, 1.0)
    fig.suptitle("a title far too long for a figure two inches wide, clipped at both sides")
    with pytest.raises(AssertionError, match="far too long"):
        assert_text_fits(fig)
