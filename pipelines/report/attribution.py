"""Why this label: which input pixels a classifier's decision rests on (saliency, Grad-CAM).

In: a trained Keras classifier (softmax output, layer names as :mod:`pipelines.models`
documents), normalised input images and the class to explain for each. Out:

* :func:`saliency`: ``|d p_class / d input|``, the largest over the colour channels: the
  pixels whose change would move the class probability most (Simonyan et al. 2014).
* :func:`grad_cam`: Grad-CAM (Selvaraju et al. 2017) on the last ``Conv2D`` layer by
  default: ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of the gradient of
  the class score (the pre-softmax logit when the output layer is a softmax dense layer,
  else the probability) with respect to feature map ``A_k``; brought to the input size by
  placing each map cell at the centre of its receptive field
  (:func:`~pipelines.report.filters.receptive_fields`) and interpolating bilinearly (plain
  resizing would shift the map of a 'valid' convolution by up to half its field), then
  scaled to [0, 1] per image.
* :func:`write_attribution`: the report section: the most confident mistakes and as many
  of the most confident correct images, each drawn with both maps (``attribution.png``)
  and summarised in ``attribution.json``.

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.filters import conv_layers, layer_depths, receptive_fields
from pipelines.report.numeric import class_name, jsonable, most_confident_errors
from pipelines.report.plots import BAD, GOOD, new_figure, save_png, show_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipelines.keras_api import KerasModel

#: Images per gradient pass.
BATCH_SIZE = 64
#: Images per row of ``attribution.png``.
IMAGES_PER_ROW = 4
#: Class names longer than this are cut (with an ellipsis) so titles fit their panels.
NAME_CHARS = 22
#: Colour map of both maps, alone and over the image (one colour bar explains them all).
OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.5
#: Width of one panel of ``attribution.png``, inches.
_PANEL_IN = 0.88


def saliency(model: KerasModel, x: np.ndarray, class_index: int | Sequence[int]) -> np.ndarray:
    """Gradient magnitude of a class probability with respect to each input pixel.

    Behind a softmax dense head the gradient is taken through the logits ``z`` with the
    softmax's Jacobian written out, ``d p_c / d z_c = p_c * sum_{j != c} p_j`` and
    ``d p_c / d z_j = -p_c p_j``: automatic differentiation forms ``p_c (1 - p_c)``, which is
    exactly 0 in float32 once a confident model's ``p_c`` rounds to 1, leaving noise.

    Args:
        model: A Keras classifier whose output is class probabilities ``(N, K)``.
        x: Model input ``(N, H, W, C)``.
        class_index: The class to explain: one for all images, or one per image.

    Returns:
        float32 ``(N, H, W)``: ``|d p_class / d x|``, the maximum over channels.

    """
    from pipelines.keras_api import is_keras3

    logits = _logits(model) if score_kind(model) == "logit" else None
    classes = _classes(class_index, len(x))
    if is_keras3():
        return _jax_saliency(model, x, classes, logits)
    import tensorflow as tf

    maps = []
    for start in range(0, len(x), BATCH_SIZE):
        batch = tf.constant(np.asarray(x[start : start + BATCH_SIZE], dtype=np.float32))
        chosen = tf.constant(classes[start : start + BATCH_SIZE])
        with tf.GradientTape() as tape:
            tape.watch(batch)
            if logits is None:
                out = tf.cast(model(batch, training=False), tf.float32)
                weights = tf.one_hot(chosen, out.shape[-1])  # d p_c / d p
            else:
                out = logits(batch)
                weights = _softmax_row(out, chosen)
        # Images are independent, so the vector-Jacobian product is per image.
        gradient = tape.gradient(out, batch, output_gradients=tf.stop_gradient(weights))
        maps.append(tf.reduce_max(tf.abs(gradient), axis=-1).numpy())
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[1:3]), np.float32)


def _logits(model: KerasModel) -> Any:
    """A function from inputs to the pre-softmax logits of a softmax dense head (float32)."""
    from pipelines.keras_api import keras

    head = model.layers[-1]
    hidden = keras().Model(model.inputs, head.input)

    def logits(batch: Any) -> Any:
        return _dense_logits(head, hidden(batch, training=False))

    return logits


def _dense_logits(head: Any, hidden: Any) -> Any:
    """What the softmax dense layer ``head`` computes from ``hidden`` before its softmax."""
    from pipelines.keras_api import is_keras3

    if is_keras3():
        import jax.numpy as jnp

        kernel = jnp.asarray(head.kernel.value, jnp.float32)
        z = jnp.matmul(jnp.asarray(hidden, jnp.float32), kernel)
        return z + jnp.asarray(head.bias.value, jnp.float32) if head.use_bias else z
    import tensorflow as tf

    z = tf.matmul(tf.cast(hidden, tf.float32), tf.cast(head.kernel, tf.float32))
    return z + tf.cast(head.bias, tf.float32) if head.use_bias else z


def _softmax_row(z: Any, chosen: Any) -> Any:
    """``d p_c / d z`` per image, ``1 - p_c`` summed from the other classes (no cancellation)."""
    import tensorflow as tf

    p = tf.nn.softmax(z)
    mine = tf.one_hot(chosen, z.shape[-1])
    p_c = tf.reduce_sum(p * mine, axis=1, keepdims=True)
    rest = tf.reduce_sum(p * (1 - mine), axis=1, keepdims=True)
    return p_c * (mine * rest - (1 - mine) * p)


def _jax_saliency(model: KerasModel, x: np.ndarray, classes: np.ndarray, logits: Any) -> Any:
    """:func:`saliency` on the Keras stack: the same vector-Jacobian product, by ``jax.vjp``."""
    import jax
    import jax.numpy as jnp

    def out(batch: Any) -> Any:
        if logits is None:
            return jnp.asarray(model(batch, training=False), jnp.float32)
        return logits(batch)

    maps = []
    for start in range(0, len(x), BATCH_SIZE):
        batch = jnp.asarray(x[start : start + BATCH_SIZE], jnp.float32)
        chosen = jnp.asarray(classes[start : start + BATCH_SIZE])
        values, vjp = jax.vjp(out, batch)
        mine = jax.nn.one_hot(chosen, values.shape[-1])
        if logits is None:
            weights = mine  # d p_c / d p
        else:  # _softmax_row, in JAX
            p = jax.nn.softmax(values)
            p_c = jnp.sum(p * mine, axis=1, keepdims=True)
            rest = jnp.sum(p * (1 - mine), axis=1, keepdims=True)
            weights = p_c * (mine * rest - (1 - mine) * p)
        (gradient,) = vjp(jax.lax.stop_gradient(weights))
        maps.append(np.asarray(jnp.max(jnp.abs(gradient), axis=-1)))
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[1:3]), np.float32)


def _jax_cams(model: KerasModel, layer: Any, x: np.ndarray, classes: np.ndarray) -> list[Any]:
    """Grad-CAM's ``relu(sum_k mean(dS/dA_k) A_k)`` on the Keras stack, by ``jax.grad``.

    JAX differentiates with respect to inputs, not to a layer's output inside a model, so
    the layer's output gets a zero ``delta`` added in its ``call`` for the pass: the
    gradient with respect to ``delta`` at 0 is the one with respect to the maps.
    """
    import jax
    import jax.numpy as jnp

    logit = score_kind(model) == "logit"
    head = model.layers[-1]
    probe = keras_module().Model(model.inputs, head.input if logit else model.output)
    own_call = layer.call
    maps: dict[str, Any] = {}

    def score(delta: Any, batch: Any, chosen: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            maps["features"] = own_call(*args, **kwargs)
            return maps["features"] + delta

        layer.call = call
        try:
            last = probe(batch, training=False)
        finally:
            del layer.call
        last = _dense_logits(head, last) if logit else jnp.asarray(last, jnp.float32)
        return jnp.sum(jnp.take_along_axis(last, chosen[:, None], axis=1))

    shape = tuple(int(d) for d in layer.output.shape[1:])
    cams = []
    for start in range(0, len(x), BATCH_SIZE):
        batch = jnp.asarray(x[start : start + BATCH_SIZE], jnp.float32)
        chosen = jnp.asarray(classes[start : start + BATCH_SIZE])
        delta = jnp.zeros((len(batch), *shape), jnp.float32)
        gradient = jax.grad(score)(delta, batch, chosen)
        features = jnp.asarray(jax.lax.stop_gradient(maps.pop("features")), jnp.float32)
        weights = jnp.mean(gradient, axis=(1, 2), keepdims=True)
        cams.append(np.asarray(jax.nn.relu(jnp.sum(weights * features, axis=-1))))
    return cams


def keras_module() -> Any:
    """The Keras API module (:func:`pipelines.keras_api.keras`)."""
    from pipelines.keras_api import keras

    return keras()


def last_conv_layer(model: KerasModel) -> str | None:
    """The Grad-CAM default: the deepest ``Conv2D`` layer (transposed ones excluded).

    Deepest on the layer graph, later in model order on a tie: a residual block's 1x1
    shortcut, listed after the block's second convolution, is not the last one.
    """
    convs = conv_layers(model)
    if not convs:
        return None
    depths = layer_depths(model)
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    return max(convs, key=lambda layer: (depths[layer.name], order[layer.name])).name


def score_kind(model: KerasModel) -> str:
    """What Grad-CAM differentiates: ``logit`` behind a softmax dense head, else ``probability``."""
    from pipelines.keras_api import keras

    head = model.layers[-1]
    softmax = getattr(getattr(head, "activation", None), "__name__", "") == "softmax"
    return "logit" if isinstance(head, keras().layers.Dense) and softmax else "probability"


def grad_cam(
    model: KerasModel,
    x: np.ndarray,
    class_index: int | Sequence[int],
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM maps of a class, at the input's size, each scaled to [0, 1].

    Args:
        model: A Keras classifier with at least one ``Conv2D`` layer.
        x: Model input ``(N, H, W, C)``.
        class_index: The class to explain: one for all images, or one per image.
        layer_name: The convolution layer to explain (default: :func:`last_conv_layer`).

    Returns:
        float32 ``(N, H, W)`` in [0, 1]; all zeros where no cell has positive evidence.

    Raises:
        ValueError: The model has no ``Conv2D`` layer and none was named.

    """
    from pipelines.keras_api import is_keras3, keras

    name = layer_name or last_conv_layer(model)
    if name is None:
        raise ValueError(f"model {model.name} has no Conv2D layer for Grad-CAM")
    layer = model.get_layer(name)
    classes = _classes(class_index, len(x))
    height, width = (int(d) for d in model.input_shape[1:3])
    if is_keras3():
        return _scaled_cams(model, name, _jax_cams(model, layer, x, classes), height, width)
    import tensorflow as tf

    logit = score_kind(model) == "logit"
    head = model.layers[-1]
    # The layer's maps and what comes right before the head (or the probabilities).
    probe = keras().Model(model.inputs, [layer.output, head.input if logit else model.output])
    cams = []
    for start in range(0, len(x), BATCH_SIZE):
        batch = tf.constant(np.asarray(x[start : start + BATCH_SIZE], dtype=np.float32))
        chosen = tf.constant(classes[start : start + BATCH_SIZE])
        with tf.GradientTape() as tape:
            features, last = probe(batch, training=False)
            last = _dense_logits(head, last) if logit else tf.cast(last, tf.float32)
            score = tf.gather(last, chosen, axis=1, batch_dims=1)
        gradient = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(gradient, axis=(1, 2), keepdims=True)
        cams.append(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy())
    return _scaled_cams(model, name, cams, height, width)


def _scaled_cams(
    model: KerasModel, name: str, cams: list[Any], height: int, width: int
) -> np.ndarray:
    """The maps at the input's size (along the layer's receptive field), each in [0, 1]."""
    if not cams:
        return np.zeros((0, height, width), np.float32)
    small = np.concatenate(cams)
    field = receptive_fields(model).get(name)
    if field is None:
        full = _resized(small, height, width)
    else:
        rows = _interpolation(field.centre(np.arange(small.shape[1]), 0)[0], height)
        cols = _interpolation(field.centre(0, np.arange(small.shape[2]))[1], width)
        full = np.einsum("Hh,nhw,Ww->nHW", rows, small, cols)
    top = full.reshape(len(full), -1).max(axis=1)
    scale = np.divide(1.0, top, out=np.zeros_like(top), where=top > 0)
    return (full * scale[:, None, None]).astype(np.float32)


def _resized(small: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(N, h, w)`` maps to ``(N, height, width)``."""
    from pipelines.keras_api import is_keras3

    if is_keras3():
        import jax

        shape = (len(small), height, width)
        return np.asarray(jax.image.resize(small, shape, "bilinear"), np.float32)
    import tensorflow as tf

    return tf.image.resize(small[..., None], (height, width), "bilinear").numpy()[..., 0]


def _interpolation(centres: np.ndarray, size: int) -> np.ndarray:
    """``(size, len(centres))`` weights of bilinear interpolation from cell centres to pixels.

    Pixels beyond the first or last centre take that cell's value (no extrapolation).
    """
    pixels = np.arange(size, dtype=np.float64)
    eye = np.eye(len(centres))
    return np.stack([np.interp(pixels, centres, eye[i]) for i in range(len(centres))], axis=1)


def _classes(class_index: int | Sequence[int], n: int) -> np.ndarray:
    classes = np.asarray(class_index, dtype=np.int32)
    if classes.ndim == 0:
        return np.full(n, int(classes), dtype=np.int32)
    if classes.shape != (n,):
        raise ValueError(f"class_index: one class or one per image ({n}), got {classes.shape}")
    return classes


def peak(values: np.ndarray) -> tuple[int, int] | None:
    """``(row, col)`` of a map's maximum (the first in row-major order); None if not positive."""
    if not values.size or not float(values.max()) > 0:
        return None
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(row), int(col)


def summarise(values: np.ndarray) -> dict[str, Any]:
    """The summary numbers of one ``(H, W)`` map.

    Args:
        values: The map (saliency or Grad-CAM), non-negative.

    Returns:
        ``peak`` (row, col) or None, ``max``, ``mean``, ``centre_of_mass`` (row, col; None
        for an all-zero map) and ``area_half``: the share of pixels at half the maximum or
        more (small: the evidence is concentrated).

    """
    values = np.asarray(values, dtype=np.float64)
    total = float(values.sum())
    top = float(values.max()) if values.size else 0.0
    centre = None
    if total > 0:
        rows, cols = np.indices(values.shape)
        centre = [float((rows * values).sum() / total), float((cols * values).sum() / total)]
    where = peak(values)
    return {
        "peak": list(where) if where else None,
        "max": top,
        "mean": float(values.mean()) if values.size else 0.0,
        "centre_of_mass": centre,
        "area_half": float(np.mean(values >= top / 2)) if top > 0 else 0.0,
    }


def pick_examples(
    labels: np.ndarray, probabilities: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most confident mistakes and the ``n`` most confident correct images.

    Args:
        labels: True class indexes ``(N,)``.
        probabilities: Class probabilities ``(N, K)``.
        n: At most this many of each.

    Returns:
        ``(mistakes, correct)`` row indexes, most confident first, ties in row order.

    """
    probs = np.asarray(probabilities)
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), predicted]
    mistakes = most_confident_errors(labels, probs, n)
    right = np.flatnonzero(predicted == np.asarray(labels))
    correct = right[np.argsort(-confidence[right], kind="stable")][: max(0, n)]
    return mistakes, correct.astype(np.int64)


def write_attribution(
    out: Path,
    model: KerasModel,
    images_uint8: np.ndarray,
    x: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    names: Sequence[str],
    n: int = 8,
) -> dict[str, Any]:
    """Report section: saliency and Grad-CAM of the predicted class for chosen images.

    Takes the ``n`` most confident mistakes and the ``n`` most confident correct images
    (fewer when the split has fewer), writes ``attribution.png`` (per image: the image, its
    saliency and its Grad-CAM over it, titled with true and predicted label and probability)
    and ``attribution.json`` (per image: index, true, predicted, probability, correct, and
    :func:`summarise` of each map).

    Args:
        out: Directory to write into (exists).
        model: The trained Keras classifier.
        images_uint8: uint8 images ``(N, H, W, C)`` of the evaluation split.
        x: The same images as the model's input.
        labels: True class indexes ``(N,)``.
        probabilities: The model's class probabilities on ``x`` ``(N, K)``.
        names: Class names.
        n: Mistakes (and correct images) to show.

    Returns:
        ``{"attribution": {...}}`` (counts, Grad-CAM layer, score kind), plus ``"note"`` when
        the model has no convolution (saliency only) or there are no images.

    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    mistakes, correct = pick_examples(labels, probs, n)
    chosen = np.concatenate([mistakes, correct]).astype(np.int64)
    layer = last_conv_layer(model)
    notes = []
    if layer is None:
        notes.append(f"model {model.name} has no convolution layer: saliency only, no Grad-CAM")
    if not len(chosen):
        notes.append("no images to explain")
    sal = saliency(model, x[chosen], predicted[chosen]) if len(chosen) else None
    cam = grad_cam(model, x[chosen], predicted[chosen], layer) if layer and len(chosen) else None
    entries = []
    for j, i in enumerate(chosen):
        entries.append(
            {
                "index": int(i),
                "true": class_name(names, labels[i]),
                "predicted": class_name(names, predicted[i]),
                "probability": float(probs[i, predicted[i]]),
                "correct": bool(labels[i] == predicted[i]),
                "saliency": summarise(sal[j]),  # type: ignore[index]
                "grad_cam": summarise(cam[j]) if cam is not None else None,
            }
        )
    info = {
        "explained_class": "predicted",
        "score": score_kind(model),
        "grad_cam_layer": layer,
        "mistakes": len(mistakes),
        "correct": len(correct),
        "errors_in_split": int(np.sum(predicted != labels)),
        "images": entries,
    }
    note = "; ".join(notes) or None
    if note:
        info["note"] = note
    (out / "attribution.json").write_text(json.dumps(jsonable(info), indent=1))
    if len(chosen):
        fig = plot_attribution(
            np.asarray(images_uint8)[chosen], entries, sal, cam, layer, info["errors_in_split"]
        )
        save_png(fig, out / "attribution.png")
    result: dict[str, Any] = {
        "attribution": {
            "mistakes": len(mistakes),
            "correct": len(correct),
            "grad_cam_layer": layer,
            "score": info["score"],
        }
    }
    if note:
        result["note"] = note
    return result


def plot_attribution(
    images: np.ndarray,
    entries: Sequence[dict[str, Any]],
    saliency_maps: np.ndarray,
    cam_maps: np.ndarray | None,
    layer: str | None,
    errors: int,
) -> Figure:
    """Per image: the image, saliency over it, Grad-CAM over it; mistakes first, then correct.

    The panels are composed into one image on one axes, the overlays blended in numpy: an
    axes per panel (48 at 16 images) made this the run report's slowest figure.

    Args:
        images: uint8 ``(M, H, W, C)``, the images of ``entries`` in order.
        entries: The per-image records of :func:`write_attribution` (``true``, ``predicted``,
            ``probability``, ``correct``, map summaries).
        saliency_maps: ``(M, H, W)``.
        cam_maps: ``(M, H, W)`` in [0, 1], or None for a model without convolution.
        layer: The Grad-CAM layer's name.
        errors: Misclassified images in the whole split (for the group title).

    Returns:
        The figure.

    """
    import matplotlib

    images = np.asarray(images)
    h, w = images.shape[1:3]
    panels = 2 if cam_maps is None else 3
    inch = _PANEL_IN / w  # inches per image pixel

    def px(inches: float) -> int:
        return max(1, round(inches / inch))

    panel_gap, cell_gap = px(0.07), px(0.3)
    header, title_band, bottom = px(0.4), px(0.46), px(0.12)
    cell_w = panels * w + (panels - 1) * panel_gap + cell_gap
    groups = []
    for ok in (False, True):
        members = [j for j, e in enumerate(entries) if e["correct"] == ok]
        if members:
            groups.append((ok, members))
    row_h = title_band + h + bottom
    heights = [header + math.ceil(len(m) / IMAGES_PER_ROW) * row_h for _, m in groups]
    canvas = np.ones((sum(heights), IMAGES_PER_ROW * cell_w, 3))
    width_in, body_in = canvas.shape[1] * inch, canvas.shape[0] * inch
    fig = new_figure(width_in, body_in + 0.4)
    fig.set_layout_engine("none")  # one axes placed exactly: the text bands are in pixels
    ax = fig.add_axes((0.0, 0.0, 1.0, body_in / (body_in + 0.4)))
    ax.set_axis_off()
    cmap = matplotlib.colormaps[OVERLAY_CMAP]
    peaks: list[tuple[float, float]] = []
    panel_names = ["input", "saliency", _fit(f"Grad-CAM {layer}", 16)]
    y0 = 0
    for (ok, members), height in zip(groups, heights, strict=True):
        shown = len(members)
        title = (
            f"Most confident correct ({shown} shown)"
            if ok
            else f"Most confident mistakes ({shown} shown of {errors} errors)"
        )
        colour = GOOD if ok else BAD
        ax.text(canvas.shape[1] / 2, y0 + header * 0.6, title, ha="center", va="center",
                fontsize=10, weight="bold", color=colour)  # fmt: skip
        for slot, j in enumerate(members):
            r, q = divmod(slot, IMAGES_PER_ROW)
            top = y0 + header + r * row_h + title_band
            left = q * cell_w + cell_gap // 2
            entry = entries[j]
            base = _rgb(images[j])
            maps = [(base, None), (_blend(base, cmap, _unit(saliency_maps[j])), "saliency")]
            if cam_maps is not None:
                maps.append((_blend(base, cmap, cam_maps[j]), "grad_cam"))
            for p, (picture, kind) in enumerate(maps):
                x = left + p * (w + panel_gap)
                canvas[top : top + h, x : x + w] = picture
                ax.text(x + w / 2, top - 0.5, panel_names[p], ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
                where = entry[kind]["peak"] if kind else None
                if where is not None:
                    peaks.append((x + where[1], top + where[0]))
            ax.text(
                left + (cell_w - cell_gap) / 2,
                top - px(0.17),
                f"#{entry['index']} true {_fit(entry['true'])}\n"
                f"pred {_fit(entry['predicted'])} ({entry['probability']:.2f})",
                ha="center",
                va="bottom",
                fontsize=8,
                color=GOOD if entry["correct"] else BAD,
            )
        y0 += height
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    if peaks:
        xs, ys = zip(*peaks, strict=True)
        ax.plot(xs, ys, linestyle="none", marker="+", color="white", ms=9, mew=2)
        ax.plot(xs, ys, linestyle="none", marker="+", color="black", ms=6, mew=1)
    fig.suptitle(
        "Why this label: saliency |d p / d pixel| and Grad-CAM of the predicted class "
        "(+ marks each map's peak)",
        fontsize=10,
    )
    return fig


def _rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 1 or 3) image as float RGB in [0, 1]."""
    values = np.asarray(image, dtype=np.float64) / 255.0
    return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values[..., :3]


def _blend(base: np.ndarray, cmap: Any, values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] coloured by ``cmap`` over ``base``, as imshow's alpha draws it."""
    coloured = cmap(np.clip(values, 0.0, 1.0))[..., :3]
    return (1.0 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * coloured


def _overlay(ax: Any, image: np.ndarray, values: np.ndarray, where: Any) -> None:
    """A [0, 1] map over the image, the peak marked."""
    show_image(ax, image)
    ax.imshow(values, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
    _mark(ax, where)


def _mark(ax: Any, where: Any) -> None:
    if where is not None:
        ax.plot([where[1]], [where[0]], marker="+", color="white", ms=9, mew=2)
        ax.plot([where[1]], [where[0]], marker="+", color="black", ms=6, mew=1)


def _unit(values: np.ndarray) -> np.ndarray:
    """A map scaled by its own maximum (zeros stay zeros)."""
    top = float(values.max()) if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def plot_explanation(
    image: np.ndarray,
    sal: np.ndarray,
    cam: np.ndarray | None,
    layer: str | None,
    predicted: str,
) -> Figure:
    """One image: input, saliency, saliency over the input, Grad-CAM over the input.

    Args:
        image: uint8 ``(H, W, C)`` as the model sees it.
        sal: Its saliency ``(H, W)`` for the predicted class.
        cam: Its Grad-CAM ``(H, W)`` in [0, 1], or None (no convolution).
        layer: The Grad-CAM layer.
        predicted: The predicted class name (for the title).

    Returns:
        The figure.

    """
    import matplotlib

    panels = 3 if cam is None else 5
    fig = new_figure(2.3 * panels + 0.8, 3.0)
    axes = fig.subplots(1, panels)
    show_image(axes[0], image, interpolation="nearest")
    axes[0].set_title("input (model's view)", fontsize=9)
    axes[1].imshow(_unit(sal), cmap=OVERLAY_CMAP, vmin=0, vmax=1, interpolation="nearest")
    _mark(axes[1], peak(sal))
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    axes[1].set_title(f"saliency (max {float(sal.max()):.2g})", fontsize=9)
    _overlay(axes[2], image, _unit(sal), peak(sal))
    axes[2].set_title("saliency over input", fontsize=9)
    if cam is not None:
        axes[3].imshow(cam, cmap=OVERLAY_CMAP, vmin=0, vmax=1, interpolation="nearest")
        _mark(axes[3], peak(cam))
        axes[3].set_xticks([])
        axes[3].set_yticks([])
        axes[3].set_title(_fit(f"Grad-CAM ({layer})", 26), fontsize=9)
        _overlay(axes[4], image, cam, peak(cam))
        axes[4].set_title("Grad-CAM over input", fontsize=9)
    fig.colorbar(
        matplotlib.cm.ScalarMappable(cmap=OVERLAY_CMAP), ax=list(axes[1:]), shrink=0.8,
        label="share of the map's maximum",
    )  # fmt: skip
    fig.suptitle(f"Why '{_fit(predicted, 40)}': + marks each map's peak", fontsize=10)
    return fig


def plot_probabilities(names: Sequence[str], probabilities: Sequence[float], best: int) -> Figure:
    """Every class's probability as a horizontal bar, the predicted one highlighted.

    Args:
        names: Class names, in output order.
        probabilities: One per class.
        best: Index of the predicted class.

    Returns:
        The figure.

    """
    k = len(names)
    fig = new_figure(7.5, 0.9 + 0.32 * k)
    ax = fig.add_subplot()
    colours = [GOOD if i == best else "#8c959f" for i in range(k)]
    positions = np.arange(k)
    ax.barh(positions, probabilities, color=colours)
    for i, value in enumerate(probabilities):
        ax.text(min(value, 1.0) + 0.01, i, f"{value:.3f}", va="center", fontsize=8)
    ax.set_yticks(positions, [_fit(str(name), 30) for name in names], fontsize=8)
    ax.invert_yaxis()  # class 0 on top, as in the label list
    ax.set_xlim(0, 1.12)  # room for the value beside a full bar
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("probability")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Class probabilities: {_fit(str(names[best]), 40)} {probabilities[best]:.1%}")
    return fig


def _fit(text: str, chars: int = NAME_CHARS) -> str:
    """``text`` cut to ``chars`` characters with an ellipsis, so it fits its panel."""
    text = str(text)
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"
