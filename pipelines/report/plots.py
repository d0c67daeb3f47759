"""The figures of a run report, drawn on matplotlib's Agg canvas (never ``pyplot``).

In: numpy arrays and the numbers of :mod:`pipelines.report.numeric` (histories, confusion
counts, filter tiles, activation maps, 2-D projections, reconstructions). Out: one
:class:`matplotlib.figure.Figure` per ``plot_*`` function, and :func:`save_png` to write it.
Figures live on their own :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so
reports leave the caller's plotting state and backend alone and work on headless drivers.
matplotlib is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Resolution of the PNGs.
DPI = 100
#: Green for right, red for wrong.
GOOD = "#1a7f37"
BAD = "#cf222e"
#: Font size of figure titles (matplotlib's ``large`` at the default 10 pt).
_TITLE_SIZE = 12.0
#: Width of an average character of DejaVu Sans in ems, rounded up: wrapping uses it to keep
#: titles inside their figure (tests/unit/test_plot_text_fits.py measures the real extents).
_CHAR_EM = 0.62


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, independent of pyplot and of the session's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Break ``text`` into lines that fit ``width_in`` inches at ``fontsize`` points."""
    chars = max(8, int(width_in * 72 / (fontsize * _CHAR_EM)))
    return "\n".join(
        "\n".join(textwrap.wrap(line, chars, break_on_hyphens=False)) or line
        for line in text.splitlines()
    )


def shorten(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters with an ellipsis (tile titles of long names)."""
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def suptitle(fig: Figure, text: str, fontsize: float = _TITLE_SIZE) -> None:
    """A figure title wrapped to the figure's width, so a narrow figure does not clip it."""
    fig.suptitle(_wrap(text, fig.get_figwidth() * 0.95, fontsize), fontsize=fontsize)


def save_png(fig: Figure, path: Path, dpi: int = DPI) -> None:
    """Write ``fig`` as a PNG on a white background.

    The figure is not cleared: it belongs to no pyplot manager, so it is freed with its last
    reference, and clearing its axes took 0.3 s of the run report's 4.4 s.
    """
    fig.savefig(path, format="png", dpi=dpi, facecolor="white")


def show_image(ax: Any, image: np.ndarray, **kwargs: Any) -> None:
    """Draw one uint8 HxWxC image (grey or RGB) without axes."""
    if image.ndim == 3 and image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, **kwargs)
    else:
        ax.imshow(image, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _curve_panels(keys: Sequence[str]) -> list[str]:
    """Base metric names (``val_`` stripped): loss first, learning rate last."""
    bases: list[str] = []
    for key in keys:
        base = key[4:] if key.startswith("val_") else key
        if base not in bases:
            bases.append(base)
    return sorted(bases, key=lambda b: (b != "loss", b == "lr", bases.index(b)))


def plot_curves(runs: Sequence[tuple[str, Mapping[str, Sequence[float]]]], title: str) -> Figure:
    """One panel per metric, train solid and validation dashed; one colour per run."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = _curve_panels([key for _, series in runs for key in series])
    fig = new_figure(min(5.0 * len(panels), 15.0), 4.2 if len(runs) == 1 else 5.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, base in zip(axes, panels, strict=True):
        for (_, series), colour in zip(runs, colours, strict=True):
            for key, style, part in ((base, "-", "train"), (f"val_{base}", "--", "validation")):
                values = series.get(key)
                if not values:
                    continue
                epochs = np.arange(1, len(values) + 1)
                single = len(runs) == 1
                ax.plot(
                    epochs,
                    values,
                    style,
                    marker="o",
                    ms=3,
                    color=("C1" if part == "validation" else "C0") if single else colour,
                    label=part if single else None,
                )
            best = series.get(f"val_{base}")
            if len(runs) == 1 and base == "loss" and best and all(map(math.isfinite, best)):
                epoch = int(np.argmin(best)) + 1
                ax.axvline(epoch, color="grey", ls=":", lw=1, label=f"best val_loss: epoch {epoch}")
        ax.set_title(base.replace("_", " ") if base != "lr" else "learning rate")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(base)
        ax.grid(alpha=0.3)
        if base == "lr" and all(v > 0 for _, s in runs for v in s.get(base, [])):
            ax.set_yscale("log")
        if base == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if len(runs) == 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if len(runs) > 1:
        handles = [Line2D([], [], color=c, lw=2) for c in colours]
        handles += [Line2D([], [], color="black", ls="-"), Line2D([], [], color="black", ls="--")]
        labels = [label for label, _ in runs] + ["train", "validation"]
        fig.legend(
            handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8
        )
    suptitle(fig, title)
    return fig


def plot_confusion(cm: np.ndarray, names: list[str], accuracy: float) -> Figure:
    """Counts per cell; the diagonal in greens, errors in reds, shaded by share of the row."""
    k = len(names)
    side = max(4.5, 0.55 * k + 3.0)
    fig = new_figure(side + 1.6, side)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    diagonal = np.eye(k, dtype=bool)
    good = ax.imshow(np.ma.masked_where(~diagonal, share), cmap="Greens", vmin=0, vmax=1)
    bad = ax.imshow(np.ma.masked_where(diagonal, share), cmap="Reds", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j] or i == j:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8 if k > 12 else 10,
                        color="white" if share[i, j] > 0.55 else "black",
                    )
    ax.set_xticks(range(k), names, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {int(cm.sum())} images, accuracy {accuracy:.1%}")
    fig.colorbar(bad, ax=ax, shrink=0.7, label="wrong: share of the true class")
    fig.colorbar(good, ax=ax, shrink=0.7, label="correct: share of the true class")
    return fig


def plot_misclassified(
    images: np.ndarray, rows: list[list[Any]], errors: int, total: int
) -> Figure:
    """A grid of the misclassified images, true and predicted class over each.

    Args:
        images: uint8 images ``(N, H, W, C)`` of the split.
        rows: The rows of ``misclassified.csv``: rank, index, path, true, predicted,
            probability, true_probability.
        errors: How many images of the split are misclassified.
        total: How many images the split has.

    Returns:
        The figure (a one-line message when ``rows`` is empty).

    """
    if not rows:
        fig = new_figure(6, 1.5)
        message = f"No misclassified images ({total} of {total} correct)"
        fig.text(0.5, 0.5, message, ha="center", va="center", color=GOOD, fontsize=13)
        return fig
    cols = min(8, len(rows))
    nrows = math.ceil(len(rows) / cols)
    # at least 5 inches wide: a grid of one or two images still has room for its title
    fig = new_figure(max(5.0, 1.6 * cols), 2.05 * nrows + 0.9)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, index, _, true, predicted, probability, _) in zip(axes.ravel(), rows, strict=False):
        ax.axis("on")
        show_image(ax, images[index])
        # names cut to what a 1.6-inch tile holds at 8 pt; the table below has them whole
        ax.set_title(
            f"true {shorten(str(true), 17)}\npred {shorten(str(predicted), 17)}\n"
            f"probability {probability:.2f}",
            fontsize=8,
            color=BAD,
        )
        for spine in ax.spines.values():
            spine.set_edgecolor(BAD)
            spine.set_linewidth(2)
    suptitle(
        fig,
        f"Most confidently misclassified: {len(rows)} of {errors} errors in {total} images "
        "(predicted probability)",
    )
    return fig


def plot_tiles(tiles: np.ndarray, title: str) -> Figure:
    """Filters (n, h, w, c): grey per tile (channel mean unless RGB), own min..max each.

    The tiles are laid into one image on one axes (a tile per axes cost ~10 ms each to
    create and lay out: most of the run report's time at 64 filters), numbered above.
    """
    n, h, w = len(tiles), tiles.shape[1], tiles.shape[2]
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    # gaps in tile pixels: a column gap, and room above each tile for its number
    gap_x, gap_y = max(1, round(w * 0.15)), max(1, round(h * 0.35))
    cell_w, cell_h = w + gap_x, h + gap_y
    canvas = np.ones((rows * cell_h, cols * cell_w - gap_x, 3))
    fig = new_figure(max(4.0, 0.9 * cols + 0.5), 0.9 * rows + 0.8)
    ax = fig.add_subplot()
    ax.set_axis_off()
    for i, tile in enumerate(tiles):
        low, high = float(tile.min()), float(tile.max())
        scaled = (tile - low) / (high - low) if high > low else np.zeros_like(tile)
        shown = scaled if tile.shape[-1] == 3 else scaled.mean(axis=-1, keepdims=True)
        r, q = divmod(i, cols)
        top, left = r * cell_h + gap_y, q * cell_w
        canvas[top : top + h, left : left + w] = shown  # grey broadcasts to RGB
        ax.text(left + (w - 1) / 2, top - 0.5, str(i), ha="center", va="bottom", fontsize=7)
    ax.imshow(canvas, interpolation="nearest")
    suptitle(fig, title, fontsize=10)
    return fig


def _mosaic(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Tile the channels of one (h, w, c) map into a grid, NaN between tiles; scale 0..1."""
    h, w, c = values.shape
    cols = max(1, math.ceil(math.sqrt(c)))
    rows = math.ceil(c / cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    for ch in range(c):
        r, q = divmod(ch, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = scaled[:, :, ch]
    return grid, low, high


def plot_activations(
    images: np.ndarray,
    samples: list[dict[str, Any]],
    layers_info: list[dict[str, Any]],
    maps: list[np.ndarray],
) -> Figure:
    """ConvNetJS-style: a row per layer (shape, max, min), a column per sample image."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    cols = len(samples)
    rows = len(layers_info) + 1
    fig = new_figure(2.6 + 1.7 * cols, 1.75 * rows)
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.5] + [1.0] * cols)
    label = fig.add_subplot(grid[0, 0])
    label.axis("off")
    label.text(1.0, 0.5, "input", ha="right", va="center", fontsize=10, weight="bold")
    for j, (image, info) in enumerate(zip(images, samples, strict=True)):
        ax = fig.add_subplot(grid[0, j + 1])
        show_image(ax, image)
        ax.set_title(f"#{info['index']}\nlabel {shorten(str(info['label']), 18)}", fontsize=8)
    for r, (info, values) in enumerate(zip(layers_info, maps, strict=True), start=1):
        label = fig.add_subplot(grid[r, 0])
        label.axis("off")
        shape = "x".join(str(d) for d in info["output_shape"])
        label.text(
            1.0,
            0.5,
            f"{info['name']}\n{info['type']} {shape}\nmax {info['max']:.3g}\nmin {info['min']:.3g}",
            ha="right",
            va="center",
            fontsize=8,
        )
        for j, sample_values in enumerate(values):
            ax = fig.add_subplot(grid[r, j + 1])
            mosaic, low, high = _mosaic(sample_values)
            ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{low:.2g} .. {high:.2g}", fontsize=6)
    suptitle(
        fig,
        "Activation maps per layer (channels tiled; each map scaled to its min..max)",
        fontsize=10,
    )
    return fig


def _class_colours(k: int) -> list[Any]:
    """One distinct colour per class: tab10, tab20, then a continuous map."""
    import matplotlib

    if k <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(k)]
    return [matplotlib.colormaps["nipy_spectral"](i / max(1, k - 1)) for i in range(k)]


def class_colours_hex(k: int) -> list[str]:
    """The class colours of :func:`plot_embeddings` as ``#rrggbb``, for the page's plot."""
    from matplotlib.colors import to_hex

    return [to_hex(colour) for colour in _class_colours(k)]


def plot_embeddings(
    projections: Mapping[str, np.ndarray],
    labels: np.ndarray,
    predicted: np.ndarray | None,
    names: list[str],
    layer: str,
    dims: int,
    ratio: np.ndarray,
    label_caption: str = "true class",
) -> Figure:
    """Scatter plots of the 2-D projections, coloured by class, errors marked with a cross.

    Args:
        projections: ``(N, 2)`` coordinates per method (``pca``, optionally ``tsne``).
        labels: True class index of each row.
        predicted: Predicted class index of each row; None when the model predicts none.
        names: Class names.
        layer: Name of the projected layer.
        dims: Its number of dimensions.
        ratio: Explained-variance ratio of the two principal components.
        label_caption: What the labels are to the model (the task's
            :attr:`~pipelines.tasks.Task.label_caption`).

    Returns:
        The figure, one panel per method.

    """
    from matplotlib.lines import Line2D

    fig = new_figure(6.0 * len(projections) + 1.8, 5.6)
    axes = fig.subplots(1, len(projections), squeeze=False)[0]
    colours = _class_colours(len(names))
    wrong = np.zeros(len(labels), bool) if predicted is None else predicted != labels
    for ax, (method, coords) in zip(axes, projections.items(), strict=True):
        for k, colour in enumerate(colours):
            right = (labels == k) & ~wrong
            ax.scatter(*coords[right].T, s=14, color=colour, alpha=0.8, linewidths=0)
            miss = (labels == k) & wrong
            if miss.any():
                ax.scatter(*coords[miss].T, s=28, color=colour, marker="x", linewidths=1.2)
        if method == "pca":
            ax.set_title(f"PCA of '{layer}' ({dims}-d)")
            ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)")
            ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)")
        else:
            ax.set_title(f"t-SNE of '{layer}' ({dims}-d)")
            ax.set_xlabel("t-SNE 1")
            ax.set_ylabel("t-SNE 2")
        ax.grid(alpha=0.2)
    if len(names) <= 20:
        handles = [
            Line2D([], [], marker="o", ls="", color=c, label=n)
            for c, n in zip(colours, names, strict=True)
        ]
        if wrong.any():
            handles.append(Line2D([], [], marker="x", ls="", color="black", label="misclassified"))
        fig.legend(handles=handles, loc="outside right center", fontsize=8, title="true class")
    suptitle(
        fig,
        f"Embeddings of the evaluation split ({len(labels)} images), coloured by {label_caption}",
    )
    return fig


def plot_reconstructions(
    x: np.ndarray, outputs: np.ndarray, shown: Sequence[int], errors: np.ndarray
) -> Figure:
    """Originals (top row) above their reconstructions (bottom row), with each one's MAE.

    Args:
        x: Model inputs in [0, 1], ``(N, H, W, C)``.
        outputs: Reconstructions, same shape (clipped to [0, 1] for display).
        shown: Row indexes to draw.
        errors: Mean absolute error of each row.

    Returns:
        The figure.

    """
    cols = max(1, len(shown))
    fig = new_figure(max(4.0, 1.5 * cols + 1.2), 3.9)
    axes = fig.subplots(2, cols, squeeze=False)
    for j, i in enumerate(shown):
        original = (x[i] * 255).round().astype(np.uint8)
        rebuilt = (np.clip(outputs[i], 0, 1) * 255).round().astype(np.uint8)
        show_image(axes[0, j], original)
        show_image(axes[1, j], rebuilt)
        axes[0, j].set_title(f"#{i}", fontsize=8)
        axes[1, j].set_title(f"MAE {errors[i]:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstruction")
    suptitle(fig, f"Originals and reconstructions (mean absolute error {errors.mean():.4f})")
    return fig
