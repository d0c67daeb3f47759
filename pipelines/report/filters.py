"""What each convolution filter responds to: its top-k images, cropped to its receptive field.

In: a Keras model (layer names as :mod:`pipelines.models` documents), a set of uint8 images
and the same images normalised as the model's input. Out: per ``Conv2D`` layer (transposed
ones excluded) and per filter, the ``k`` images whose activation map peaks highest, where it
peaks and the input-pixel box of the filter's receptive field around that peak; a grid
figure per layer of those crops; and the report section :func:`write_filter_topk`, which
writes ``filters_topk_<layer>.png`` per layer, ``filters_topk.json`` and
``filters_topk.csv``.

Receptive fields are computed through the layer graph from the input (convolutions,
pooling, zero padding and cropping move and grow them; element-wise and merge layers pass
them on), so each crop covers exactly the input pixels that the peak unit sees; a field
that sticks out of the image is clipped there and padded back to the field's size, so the
tiles of a layer align and the peak is always at the centre of its tile. A layer downstream
of a dense layer, a global pooling or an upsampling sees the whole image at every unit and
is skipped. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.plots import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipelines.keras_api import KerasModel

#: Images per forward pass.
BATCH_SIZE = 256
#: At most this many filters of a layer are drawn (all of them are in the JSON and CSV).
FILTERS_DRAWN = 32
#: Colour of the part of a crop that lies outside the image (pale blue, not a pixel value
#: a grey image can have), and of the lines between tiles.
PAD_RGB = (0.80, 0.87, 1.0)
GAP_RGB = (1.0, 1.0, 1.0)
#: Header of ``filters_topk.csv``.
CSV_HEADER = (
    "layer", "filter", "rank", "index", "peak", "row", "col", "top", "left", "bottom", "right",
)  # fmt: skip


@dataclass(frozen=True)
class ReceptiveField:
    """The input pixels one unit of a layer's output sees, per axis (rows, columns).

    Unit ``(i, j)`` of the layer sees input rows ``offset[0] + i * stride[0]`` up to (not
    including) that plus ``size[0]``, and likewise for columns; ``offset`` is negative
    where padding puts the first field partly outside the image.

    Attributes:
        size: Field height and width in input pixels.
        stride: Input pixels between neighbouring units.
        offset: Input row and column of the top-left corner of unit ``(0, 0)``'s field.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The field of unit ``(row, col)`` clipped to a ``height x width`` image.

        Args:
            row: Row of the unit in the layer's output.
            col: Column of the unit.
            height: Image height.
            width: Image width.

        Returns:
            ``(top, left, bottom, right)``, bottom and right exclusive.

        """
        top, left = self.corner(row, col)
        return (
            max(0, top),
            max(0, left),
            min(height, top + self.size[0]),
            min(width, left + self.size[1]),
        )

    def corner(self, row: int, col: int) -> tuple[int, int]:
        """The unclipped top-left input pixel of unit ``(row, col)``'s field."""
        return self.offset[0] + row * self.stride[0], self.offset[1] + col * self.stride[1]

    def centre(self, row: float, col: float) -> tuple[float, float]:
        """The input coordinates (pixel centres are integers) of unit ``(row, col)``'s centre."""
        top, left = self.offset[0] + row * self.stride[0], self.offset[1] + col * self.stride[1]
        return top + (self.size[0] - 1) / 2, left + (self.size[1] - 1) / 2

    def to_dict(self) -> dict[str, list[int]]:
        """The field as plain lists, for JSON."""
        return {"size": list(self.size), "stride": list(self.stride), "offset": list(self.offset)}


@dataclass(frozen=True)
class LayerTopK:
    """The top-k images of every filter of one convolution layer.

    Arrays are ``(filters, k)``, rank 0 first (highest peak; ties: lower image index first).

    Attributes:
        name: Layer name.
        output_shape: ``(height, width, filters)`` of the layer's output.
        field: Receptive field of one output unit.
        index: Image index (into the images given) of each rank.
        peak: The maximum of the filter's activation map on that image.
        row: Row of that maximum in the activation map (the first one in row-major order).
        col: Its column.
    """

    name: str
    output_shape: tuple[int, int, int]
    field: ReceptiveField
    index: np.ndarray
    peak: np.ndarray
    row: np.ndarray
    col: np.ndarray

    @property
    def k(self) -> int:
        """Images per filter."""
        return int(self.index.shape[1])

    def boxes(self, height: int, width: int) -> np.ndarray:
        """``(filters, k, 4)`` crop boxes ``(top, left, bottom, right)`` in the input image."""
        out = np.zeros((*self.index.shape, 4), dtype=np.int64)
        for f, r in np.ndindex(*self.index.shape):
            out[f, r] = self.field.box(int(self.row[f, r]), int(self.col[f, r]), height, width)
        return out


def conv_layers(model: KerasModel) -> list[Any]:
    """The ``Conv2D`` layers of ``model`` in model order, transposed convolutions excluded."""
    from pipelines.keras_api import keras

    layers = keras().layers
    return [
        layer
        for layer in model.layers
        if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose)
    ]


def receptive_fields(model: KerasModel) -> dict[str, ReceptiveField]:
    """The receptive field of every layer with a local, known one, by layer name.

    Walks the layers in model order (topological for a functional model). Inputs have a
    1-pixel field; convolutions (dilation included) and 2-D pooling grow it, zero padding
    and cropping shift it; layers whose 4-D output keeps the spatial size of their inputs
    (activations, batch normalisation, dropout, ``Add`` ...) pass on the union of their
    inputs' fields. Anything else (dense, flatten, global pooling, upsampling, transposed
    convolution) has no local field, nor has any layer after it.

    Args:
        model: A Keras functional (or sequential) model with one image input.

    Returns:
        Fields by layer name; layers without a local field are absent.

    """
    from pipelines.keras_api import keras

    fields: dict[str, ReceptiveField] = {}
    for layer in model.layers:
        inbound = _inbound_names(layer)
        if not inbound:
            fields[layer.name] = ReceptiveField((1, 1), (1, 1), (0, 0))
            continue
        if any(name not in fields for name in inbound):
            continue
        field = _layer_field(keras().layers, layer, [fields[name] for name in inbound])
        if field is not None:
            fields[layer.name] = field
    return fields


def layer_depths(model: KerasModel) -> dict[str, int]:
    """Each layer's depth: the most layers on a path from the input (the input is 0).

    In a residual network a block's shortcut convolution comes after the block's last
    convolution in ``model.layers`` but is shallower; depth tells them apart.
    """
    depths: dict[str, int] = {}
    for layer in model.layers:
        inbound = [depths.get(name, 0) for name in _inbound_names(layer)]
        depths[layer.name] = 1 + max(inbound) if inbound else 0
    return depths


def _inbound_names(layer: Any) -> list[str]:
    """Names of the layers feeding ``layer`` (its first call in the model)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if not nodes:
        return []
    if hasattr(nodes[0], "parent_nodes"):  # Keras 3
        return [parent.operation.name for parent in nodes[0].parent_nodes]
    inbound = nodes[0].inbound_layers
    return [item.name for item in (inbound if isinstance(inbound, list | tuple) else [inbound])]


def _shape(layer: Any, side: str) -> Any:
    """``layer.input_shape`` / ``output_shape`` (Keras 2), or its tensor's shape (Keras 3)."""
    shape = getattr(layer, f"{side}_shape", None)
    if shape is None:
        tensor = getattr(layer, side)
        shape = [t.shape for t in tensor] if isinstance(tensor, list) else tensor.shape
    return shape


def _layer_field(layers: Any, layer: Any, inputs: list[ReceptiveField]) -> ReceptiveField | None:
    """The field of ``layer``'s output from its inputs' fields; None if not local."""
    in_shape = _spatial(_shape(layer, "input"))
    out_shape = _spatial(_shape(layer, "output"))
    if in_shape is None or out_shape is None:
        return None
    if isinstance(layer, layers.Conv2DTranspose | layers.UpSampling2D):
        return None
    if isinstance(layer, layers.Conv2D):
        dilated = zip(layer.kernel_size, layer.dilation_rate, strict=True)
        kernel = [d * (k - 1) + 1 for k, d in dilated]
        return _windowed(inputs[0], kernel, layer.strides, layer.padding, in_shape)
    if isinstance(layer, layers.MaxPooling2D | layers.AveragePooling2D):
        return _windowed(inputs[0], layer.pool_size, layer.strides, layer.padding, in_shape)
    if isinstance(layer, layers.ZeroPadding2D | layers.Cropping2D):
        sign = -1 if isinstance(layer, layers.ZeroPadding2D) else 1
        amounts = layer.padding if sign < 0 else layer.cropping
        field = inputs[0]
        moved = zip(field.offset, amounts, field.stride, strict=True)
        offset = tuple(o + sign * a[0] * s for o, a, s in moved)
        return ReceptiveField(field.size, field.stride, offset)  # type: ignore[arg-type]
    if _same_spatial(layer, out_shape):
        return _union(inputs)
    return None


def _spatial(shape: Any) -> tuple[int, int] | None:
    """``(height, width)`` of a single 4-D shape (or of a list of equal ones), else None."""
    shapes = shape if isinstance(shape, list) else [shape]
    spatial = {tuple(s[1:3]) for s in shapes if s is not None and len(s) == 4}
    if len(spatial) != 1 or len(shapes) != len([s for s in shapes if s and len(s) == 4]):
        return None
    (hw,) = spatial
    return None if None in hw else (int(hw[0]), int(hw[1]))


def _same_spatial(layer: Any, out_shape: tuple[int, int]) -> bool:
    """A layer that keeps the spatial size and has no window of its own (element-wise, merge)."""
    has_window = any(hasattr(layer, a) for a in ("kernel_size", "pool_size", "size"))
    return not has_window and _spatial(_shape(layer, "input")) == out_shape


def _windowed(
    field: ReceptiveField,
    window: Sequence[int],
    strides: Sequence[int],
    padding: str,
    in_shape: tuple[int, int],
) -> ReceptiveField:
    """A sliding window of ``window`` pixels over the input field (TensorFlow's padding rule)."""
    size, stride, offset = [], [], []
    for axis in range(2):
        k, s, n = int(window[axis]), int(strides[axis]), in_shape[axis]
        # TensorFlow's 'same': total padding to give ceil(n / s) outputs, the smaller half first.
        before = max((math.ceil(n / s) - 1) * s + k - n, 0) // 2 if padding == "same" else 0
        size.append(field.size[axis] + (k - 1) * field.stride[axis])
        stride.append(field.stride[axis] * s)
        offset.append(field.offset[axis] - before * field.stride[axis])
    return ReceptiveField(tuple(size), tuple(stride), tuple(offset))  # type: ignore[arg-type]


def _union(fields: list[ReceptiveField]) -> ReceptiveField | None:
    """The field covering all of ``fields`` (a merge layer); None when their strides differ."""
    if len({f.stride for f in fields}) != 1:
        return None
    top = min(f.offset[0] for f in fields)
    left = min(f.offset[1] for f in fields)
    bottom = max(f.offset[0] + f.size[0] for f in fields)
    right = max(f.offset[1] + f.size[1] for f in fields)
    return ReceptiveField((bottom - top, right - left), fields[0].stride, (top, left))


def filter_topk(
    model: KerasModel, x: np.ndarray, k: int = 9, *, batch_size: int = BATCH_SIZE
) -> tuple[list[LayerTopK], list[dict[str, str]]]:
    """The ``k`` images that activate each filter of each ``Conv2D`` layer most.

    One forward pass over ``x`` (in batches) to all convolution outputs at once; each batch
    is reduced to the per-image, per-filter peak and its location before the next, so
    memory stays at one batch of activation maps.

    Args:
        model: A Keras model.
        x: Model input batch ``(N, H, W, C)`` (normalised images).
        k: Images per filter (at most ``N``).
        batch_size: Images per forward pass.

    Returns:
        The layers with a local receptive field, in model order, and the skipped layers as
        ``{"name": ..., "reason": ...}``.

    """
    from pipelines.keras_api import is_keras3, keras

    if not is_keras3():
        import tensorflow as tf
    fields = receptive_fields(model)
    convs = conv_layers(model)
    chosen = [layer for layer in convs if layer.name in fields]
    skipped = [
        {"name": layer.name, "reason": "every unit sees the whole image (no local field)"}
        for layer in convs
        if layer.name not in fields
    ]
    if not chosen or not len(x) or k < 1:
        return [], skipped
    probe = keras().Model(model.inputs, [layer.output for layer in chosen])
    if is_keras3():  # JAX: Keras 3 runs the layers' ops itself, no graph to trace
        return _peaks_eager(probe, chosen, fields, x, k, batch_size), skipped
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)

    @tf.function(input_signature=[spec])
    def peaks(batch: Any) -> list[tuple[Any, Any]]:
        outputs = probe(batch, training=False)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        reduced = []
        for maps in outputs:
            flat = tf.reshape(tf.cast(maps, tf.float32), [tf.shape(maps)[0], -1, maps.shape[-1]])
            reduced.append((tf.reduce_max(flat, axis=1), tf.argmax(flat, axis=1)))
        return reduced

    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in chosen]
    for start in range(0, len(x), batch_size):
        batch = tf.constant(np.asarray(x[start : start + batch_size], dtype=np.float32))
        for part, (value, where) in zip(parts, peaks(batch), strict=True):
            part.append((value.numpy(), where.numpy()))
    return [
        _rank(layer, fields[layer.name], part, min(k, len(x)))
        for layer, part in zip(chosen, parts, strict=True)
    ], skipped


def _peaks_eager(
    probe: Any, chosen: list[Any], fields: dict[str, Any], x: np.ndarray, k: int, batch_size: int
) -> list[LayerTopK]:
    """:func:`top_activations`' peaks on the Keras stack, one batch at a time in numpy."""
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in chosen]
    for start in range(0, len(x), batch_size):
        outputs = probe(np.asarray(x[start : start + batch_size], np.float32), training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for part, maps in zip(parts, outputs, strict=True):
            flat = np.asarray(maps, np.float32).reshape(len(maps), -1, maps.shape[-1])
            part.append((flat.max(axis=1), flat.argmax(axis=1)))
    return [
        _rank(layer, fields[layer.name], part, min(k, len(x)))
        for layer, part in zip(chosen, parts, strict=True)
    ]


def _rank(
    layer: Any, field: ReceptiveField, parts: list[tuple[np.ndarray, np.ndarray]], k: int
) -> LayerTopK:
    """Order the images of each filter by peak (stable: ties keep the lower index first)."""
    values = np.concatenate([v for v, _ in parts])  # (N, filters)
    where = np.concatenate([w for _, w in parts])
    height, width, filters = (int(d) for d in _shape(layer, "output")[1:])
    order = np.argsort(-values, axis=0, kind="stable")[:k].T  # (filters, k)
    cols = np.arange(filters)[:, None]
    flat = where[order, cols]
    return LayerTopK(
        name=layer.name,
        output_shape=(height, width, filters),
        field=field,
        index=order.astype(np.int64),
        peak=values[order, cols].astype(np.float64),
        row=(flat // width).astype(np.int64),
        col=(flat % width).astype(np.int64),
    )


def crop(image: np.ndarray, field: ReceptiveField, row: int, col: int) -> np.ndarray:
    """The receptive field of unit ``(row, col)`` cut from ``image``, padded to its full size.

    Args:
        image: uint8 ``(H, W, C)``.
        field: The layer's receptive field.
        row: Unit row in the layer's output.
        col: Unit column.

    Returns:
        float ``(size_h, size_w, C)`` in [0, 1]; NaN where the field lies outside the image.

    """
    height, width, channels = image.shape
    top, left = field.corner(row, col)
    tile = np.full((*field.size, channels), np.nan)
    t, lt, b, r = field.box(row, col, height, width)
    if b > t and r > lt:
        tile[t - top : b - top, lt - left : r - left] = image[t:b, lt:r] / 255.0
    return tile


def plot_filter_topk(
    images: np.ndarray, topk: LayerTopK, max_filters: int = FILTERS_DRAWN
) -> Figure:
    """A grid per layer: a row per filter, its ``k`` receptive-field crops left to right.

    Args:
        images: uint8 ``(N, H, W, C)``, the images ``topk`` indexes.
        topk: One layer's result of :func:`filter_topk`.
        max_filters: At most this many filters (the first ones) are drawn.

    Returns:
        The figure: one image of tiles (pale blue where a field leaves the image).

    """
    filters = min(max_filters, topk.output_shape[2])
    size_h, size_w = topk.field.size
    mosaic = np.empty((filters * (size_h + 1) - 1, topk.k * (size_w + 1) - 1, 3))
    mosaic[:] = GAP_RGB
    for f, r in np.ndindex(filters, topk.k):
        tile = crop(images[topk.index[f, r]], topk.field, int(topk.row[f, r]), int(topk.col[f, r]))
        rgb = np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile
        rgb = np.where(np.isnan(rgb), np.asarray(PAD_RGB), rgb)
        y, x = f * (size_h + 1), r * (size_w + 1)
        mosaic[y : y + size_h, x : x + size_w] = rgb
    cell = 0.5  # inches per tile, whatever the field's size in pixels
    # At least 6 inches wide, so that the two title lines fit over a grid of few images.
    width = max(6.0, 2.0 + cell * topk.k * max(1.0, size_w / size_h))
    fig = new_figure(width, 1.3 + cell * filters)
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_xticks([r * (size_w + 1) + (size_w - 1) / 2 for r in range(topk.k)])
    ax.set_xticklabels([str(r + 1) for r in range(topk.k)], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([f * (size_h + 1) + (size_h - 1) / 2 for f in range(filters)])
    ax.set_yticklabels([_row_label(f, float(topk.peak[f, 0])) for f in range(filters)], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    shown = (
        f"all {filters} filters"
        if filters == topk.output_shape[2]
        else f"filters 0-{filters - 1} of {topk.output_shape[2]}"
    )
    fig.suptitle(
        f"{topk.name[:40]}: top {topk.k} images per filter ({shown})\n"
        f"crops: receptive field {size_h}x{size_w} px (stride {topk.field.stride[0]}) "
        "at the peak\npale blue: outside the image",
        fontsize=9,
    )
    return fig


def _row_label(f: int, best: float) -> str:
    """A filter's row label: its index and best peak; a filter never above 0 is dead (ReLU)."""
    return f"filter {f}  peak {best:.3g}" if best > 0 else f"filter {f}  never active"


def write_filter_topk(
    out: Path, model: KerasModel, images_uint8: np.ndarray, x_normalised: np.ndarray, k: int = 9
) -> dict[str, Any]:
    """Report section: the top-k images of every filter, as PNG grids, JSON and CSV.

    Writes ``filters_topk_<layer>.png`` per convolution layer, ``filters_topk.json`` (per
    layer its output shape, receptive field, and per filter the ranked images with peak,
    peak location and crop box) and ``filters_topk.csv`` (one row per layer, filter and
    rank: :data:`CSV_HEADER`).

    Args:
        out: Directory to write into (exists).
        model: The trained Keras model.
        images_uint8: uint8 images ``(N, H, W, C)`` of the evaluation split.
        x_normalised: The same images as the model's input.
        k: Images per filter.

    Returns:
        ``{"filters_topk": {"layers": [...], "k": k}}``, plus ``"note"`` when the model has
        no convolution layer with a local receptive field, or there are no images.

    """
    images = np.asarray(images_uint8)
    height, width = images.shape[1:3] if images.ndim == 4 else (0, 0)
    layers, skipped = filter_topk(model, x_normalised, k)
    note = _note(model, layers, skipped, len(images))
    data: dict[str, Any] = {"k": k, "images": len(images), "layers": [], "skipped": skipped}
    rows: list[list[Any]] = []
    for topk in layers:
        boxes = topk.boxes(height, width)
        data["layers"].append(_layer_json(topk, boxes))
        for f, r in np.ndindex(*topk.index.shape):
            rows.append(
                [topk.name, f, r + 1, int(topk.index[f, r]), float(topk.peak[f, r])]
                + [int(topk.row[f, r]), int(topk.col[f, r]), *(int(v) for v in boxes[f, r])]
            )
        save_png(plot_filter_topk(images, topk), out / f"filters_topk_{_safe(topk.name)}.png")
    if note:
        data["note"] = note
    (out / "filters_topk.json").write_text(json.dumps(data))
    with (out / "filters_topk.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    result: dict[str, Any] = {"filters_topk": {"layers": [t.name for t in layers], "k": k}}
    if note:
        result["note"] = note
    return result


def _note(
    model: KerasModel, layers: list[LayerTopK], skipped: list[dict[str, str]], images: int
) -> str | None:
    if not images:
        return "no images to rank"
    if layers and not skipped:
        return None
    if skipped:
        names = ", ".join(item["name"] for item in skipped)
        if layers:
            return f"skipped {names}: every unit sees the whole image"
        return f"model {model.name}: no convolution has a local receptive field ({names})"
    return f"model {model.name} has no convolution layer"


def _layer_json(topk: LayerTopK, boxes: np.ndarray) -> dict[str, Any]:
    return {
        "name": topk.name,
        "output_shape": list(topk.output_shape),
        "receptive_field": topk.field.to_dict(),
        "filters": topk.output_shape[2],
        "drawn": min(FILTERS_DRAWN, topk.output_shape[2]),
        "topk": [
            [
                {
                    "rank": r + 1,
                    "index": int(topk.index[f, r]),
                    "peak": _finite(topk.peak[f, r]),
                    "row": int(topk.row[f, r]),
                    "col": int(topk.col[f, r]),
                    "box": [int(v) for v in boxes[f, r]],
                }
                for r in range(topk.k)
            ]
            for f in range(topk.output_shape[2])
        ],
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _safe(name: str) -> str:
    """A layer name as a file-name part (Keras names may hold ``/``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
