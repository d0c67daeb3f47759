"""One image, explained: what a logged model predicts for a file, and why.

In (:func:`explain_image`): an image file and a model URI (``models:/<name>@<alias>``,
``models:/<name>/<version>``, ``runs:/<run_id>/model``, a local model directory), the
tracking (and registry) URI. Out: one self-contained HTML page ``explain-<stem>.html`` under
``out_dir`` (the input as the model sees it, every class's probability, saliency and
Grad-CAM of the predicted class, the activation maps per layer) and an
:class:`ExplainResult` with the numbers. ``dlpipe explain`` prints them (:func:`summary`),
as JSON with ``--json``.

The model is loaded as scoring loads it (``mlflow.pyfunc.load_model``), the probabilities
are the pyfunc's own ``predict`` on the file's bytes, and the pixels the maps are computed on
come from the same :func:`~pipelines.image_model.to_pixels` and
:func:`~pipelines.images.normalise`, so the page explains exactly what scoring and serving
answer. MLflow, TensorFlow and matplotlib are imported inside the functions (importing this
module stays cheap).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import UserError
from pipelines.images import DEFAULT_RESIZE
from pipelines.store import write_atomic
from pipelines.tasks import task_of_image_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure


log = logging.getLogger(__name__)

#: Side in pixels of the enlarged input picture on the page.
PICTURE_SIDE = 256


@dataclass(frozen=True)
class ExplainResult:
    """What :func:`explain_image` found.

    Attributes:
        page: The HTML page written.
        image: The image file explained.
        model_uri: The model, pinned to a version for a registry URI.
        model_name: Registered model name, or None outside the registry.
        model_version: Registered version, or None.
        label_names: The model's classes, in output order.
        probabilities: Every class's probability, by class name, in that order.
        predicted_label: The most probable class.
        probability: Its probability.
        saliency_peak: ``(row, col)`` of the saliency maximum in the model's input, or None.
        grad_cam_layer: The layer Grad-CAM explains (None for a model without convolution).
        grad_cam_peak: ``(row, col)`` of the Grad-CAM maximum, or None.
        activations: Per layer drawn: ``name``, ``type``, ``output_shape``, ``min``, ``max``,
            ``mean`` of its activation on this image.
    """

    page: Path
    image: str
    model_uri: str
    model_name: str | None
    model_version: str | None
    label_names: list[str]
    probabilities: dict[str, float]
    predicted_label: str
    probability: float
    saliency_peak: tuple[int, int] | None
    grad_cam_layer: str | None
    grad_cam_peak: tuple[int, int] | None
    activations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-able values (paths as strings, peaks as lists)."""
        data = asdict(self)
        data["page"] = str(self.page)
        for key in ("saliency_peak", "grad_cam_peak"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data


@dataclass(frozen=True)
class _Loaded:
    """The pyfunc model and what the page needs of it."""

    pyfunc: Any
    keras_model: Any
    label_names: list[str]
    image_shape: tuple[int, int, int]
    resize: str = DEFAULT_RESIZE


def explain_image(
    image_path: str | Path,
    model_uri: str,
    *,
    out_dir: str | Path,
    tracking_uri: str,
    registry_uri: str | None = None,
) -> ExplainResult:
    """Explain one image's prediction and write it as one offline HTML page.

    Args:
        image_path: An image file (anything :func:`pipelines.images.decode_image` reads).
        model_uri: A model URI as scoring takes it, e.g. ``models:/digits-classifier@champion``,
            ``runs:/<run_id>/model`` or a local model directory.
        out_dir: Directory for ``explain-<stem>.html`` (created if missing).
        tracking_uri: Tracking (and, unless ``registry_uri`` says otherwise, registry) URI.
        registry_uri: Registry URI when it is not the tracking store's.

    Returns:
        The numbers shown on the page, and the page's path.

    Raises:
        UserError: The file is missing or not a decodable image; the model does not exist,
            cannot be loaded, or is not a classifier logged by this project.

    """
    from pipelines.registry import resolve_model_uri

    if not model_uri:
        raise UserError("no model URI given: pass --model or set score.model")
    path = Path(image_path).expanduser()
    if not path.is_file():
        raise UserError(f"no image file {path}: check the path")
    data = path.read_bytes()
    resolved = resolve_model_uri(
        model_uri, model_name="", alias="", tracking_uri=tracking_uri, registry_uri=registry_uri
    )
    loaded = _load(resolved.uri, tracking_uri, registry_uri)
    pixels = _pixels(data, path, loaded.image_shape, loaded.resize)
    probabilities = _predict(loaded, data, path)
    numbers = _explain(loaded, pixels, probabilities)
    version = f"{resolved.name} version {resolved.version}" if resolved.version else None
    page = _page(path, resolved.uri, version, loaded, pixels, probabilities, numbers)
    target = _write_page(Path(out_dir) / f"explain-{_stem(path)}.html", page)
    best = int(np.argmax(probabilities))
    log.info("explain: wrote %s", target)
    return ExplainResult(
        page=target,
        image=str(path),
        model_uri=resolved.uri,
        model_name=resolved.name,
        model_version=resolved.version,
        label_names=list(loaded.label_names),
        probabilities={n: float(p) for n, p in zip(loaded.label_names, probabilities, strict=True)},
        predicted_label=loaded.label_names[best],
        probability=float(probabilities[best]),
        saliency_peak=numbers["saliency_peak"],
        grad_cam_layer=numbers["cam_layer"],
        grad_cam_peak=numbers["cam_peak"],
        activations=numbers["activations"],
    )


def _load(uri: str, tracking_uri: str, registry_uri: str | None) -> _Loaded:
    """Load the pyfunc model as scoring does; refuse anything but this project's classifier."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import pointed_at

    try:
        with pointed_at(tracking_uri, registry_uri):  # the caller's MLflow set-up stays
            pyfunc = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"cannot load model {uri}: {reason}") from None
    try:
        python_model = pyfunc.unwrap_python_model()
    except Exception:  # not a Python-function model: no Keras model to look into
        python_model = None
    # Duck typing: the class may come from the model's own copy of the package (code_paths).
    if not all(hasattr(python_model, a) for a in ("model", "label_names", "image_shape")):
        raise UserError(f"model {uri} is not an image model logged by dlpipe (no Keras model)")
    task = task_of_image_model(python_model)
    if not task.uses_labels:
        raise UserError(f"model {uri} is a {task.name} model: it has no labels to explain")
    return _Loaded(
        pyfunc=pyfunc,
        keras_model=python_model.model,
        label_names=[str(n) for n in python_model.label_names],
        image_shape=tuple(int(d) for d in python_model.image_shape),  # type: ignore[arg-type]
        resize=str(getattr(python_model, "resize", DEFAULT_RESIZE)),
    )


def _pixels(data: bytes, path: Path, shape: tuple[int, int, int], resize: str) -> np.ndarray:
    """The file's pixels exactly as the pyfunc's ``predict`` makes them."""
    from pipelines.image_model import to_pixels
    from pipelines.images import ImageDecodeError

    try:
        return to_pixels(data, shape[0], shape[2], resize)
    except ImageDecodeError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def _predict(loaded: _Loaded, data: bytes, path: Path) -> np.ndarray:
    """The pyfunc's own answer for the file's bytes: one probability per class."""
    import pandas as pd

    from pipelines.image_model import IMAGE_COLUMN

    row = loaded.pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: [data]})).iloc[0]
    if row["error"] is not None:
        raise UserError(f"cannot read image {path}: {row['error']}")
    return np.asarray(row["probabilities"], dtype=np.float64)


def _explain(loaded: _Loaded, pixels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Saliency, Grad-CAM and activation maps of the predicted class on one image."""
    from pipelines.images import normalise
    from pipelines.report.attribution import grad_cam, last_conv_layer, peak, saliency, score_kind
    from pipelines.report.probe import activation_layers, layer_outputs

    model = loaded.keras_model
    x = normalise(pixels[np.newaxis])
    best = int(np.argmax(probabilities))
    sal = saliency(model, x, best)[0]
    layer = last_conv_layer(model)
    cam = grad_cam(model, x, best, layer)[0] if layer else None
    chosen = activation_layers(model)
    maps = layer_outputs(model, [c.name for c in chosen], x) if chosen else []
    activations = [
        {
            "name": c.name,
            "type": type(c).__name__,
            "output_shape": [int(d) for d in values.shape[1:]],
            "min": float(values.min()),
            "max": float(values.max()),
            "mean": float(values.mean()),
        }
        for c, values in zip(chosen, maps, strict=True)
    ]
    return {
        "saliency": sal,
        "saliency_peak": peak(sal),
        "cam": cam,
        "cam_layer": layer,
        "cam_peak": peak(cam) if cam is not None else None,
        "score": score_kind(model),
        "activations": activations,
        "maps": maps,
    }


def _page(
    path: Path,
    model_uri: str,
    version: str | None,
    loaded: _Loaded,
    pixels: np.ndarray,
    probabilities: np.ndarray,
    numbers: dict[str, Any],
) -> str:
    """The HTML page of one explained image (self-contained: images are data URIs).

    Args:
        path: The image file.
        model_uri: The model's (pinned) URI.
        version: ``<name> version <n>`` for a registered model, else None.
        loaded: The loaded model.
        pixels: uint8 ``(H, W, C)`` as the model sees them.
        probabilities: One per class.
        numbers: What :func:`_explain` computed.

    Returns:
        The whole HTML document.

    """
    from pipelines.report.attribution import plot_explanation, plot_probabilities
    from pipelines.report.pages import figure_img, html_table, render_page

    names = loaded.label_names
    best = int(np.argmax(probabilities))
    order = np.argsort(-probabilities, kind="stable")
    runner = int(order[1]) if len(order) > 1 else best
    rows = [[name, float(p)] for name, p in zip(names, probabilities, strict=True)]
    marks = [["best", "best"] if k == best else [] for k in range(len(names))]
    cam_layer = numbers["cam_layer"]
    context = {
        "image": {
            "name": path.name,
            "path": str(path),
            "shape": "x".join(str(d) for d in pixels.shape[:2]) + " pixels",
            "mode": "grey" if pixels.shape[2] == 1 else "RGB",
            "picture": _picture(pixels, f"{path.name} as the model sees it"),
        },
        "model": {"uri": model_uri, "version": version},
        "prediction": {
            "label": names[best],
            "probability": f"{probabilities[best]:.1%}",
            "runner_up": f"{names[runner]} {probabilities[runner]:.1%}",
            "classes": len(names),
        },
        "probabilities": {
            "image": figure_img(
                plot_probabilities(names, probabilities.tolist(), best), "class probabilities"
            ),
            "table": html_table(["class", "probability"], rows, marks),
        },
        "attribution": {
            "image": figure_img(
                plot_explanation(
                    pixels, numbers["saliency"], numbers["cam"], cam_layer, names[best]
                ),
                "saliency and Grad-CAM of the predicted class",
            ),
            "note": None
            if cam_layer
            else "the model has no convolution layer: saliency only, no Grad-CAM",
            "saliency_peak": _where(numbers["saliency_peak"]),
            "cam_layer": cam_layer,
            "cam_peak": _where(numbers["cam_peak"]),
            "score": numbers["score"],
            "table": html_table(
                ["map", "peak (row, col)", "max", "mean"],
                _map_rows(numbers),
            ),
        },
        "activations": _activations_context(numbers),
    }
    return render_page("explain.html.j2", f"Explain {path.name}", context)


def _activations_context(numbers: dict[str, Any]) -> dict[str, Any]:
    from pipelines.report.pages import figure_img, html_table

    infos = numbers["activations"]
    if not infos:
        return {"note": "the model has no convolution or pooling layers", "image": None}
    figure = plot_layer_maps(infos, [values[0] for values in numbers["maps"]])
    rows = [
        [
            a["name"],
            a["type"],
            " x ".join(map(str, a["output_shape"])),
            a["min"],
            a["max"],
            a["mean"],
        ]
        for a in infos
    ]
    return {
        "note": None,
        "image": figure_img(figure, "activation maps per layer"),
        "table": html_table(["layer", "type", "output shape", "min", "max", "mean"], rows),
    }


def plot_layer_maps(infos: list[dict[str, Any]], maps: list[np.ndarray]) -> Figure:
    """Every channel of every layer for one image: a wide band of tiles per layer.

    (:func:`~pipelines.report.plots.plot_activations` draws one narrow column per sample,
    made for comparing a few images; one image gets the page's width here.)

    Args:
        infos: Per layer ``name``, ``type``, ``output_shape``, ``min``, ``max``.
        maps: Per layer the ``(h, w, c)`` activation of the image.

    Returns:
        The figure; each layer scaled to its own min..max, white between tiles.

    """
    import matplotlib

    from pipelines.report.plots import new_figure

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    mosaics = [_band(values) for values in maps]
    width = 10.5
    # A band as wide as the page, but a layer of few large tiles (1x1 maps) at most 0.9 inch
    # per row of tiles: it is drawn narrower, from the left.
    rows = [-(-values.shape[2] // 16) for values in maps]
    heights = [
        0.35 + min(width * m.shape[0] / m.shape[1], 0.9 * r)
        for m, r in zip(mosaics, rows, strict=True)
    ]
    fig = new_figure(width + 0.3, sum(heights) + 0.5)
    axes = fig.subplots(len(mosaics), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, info, mosaic in zip(axes, infos, mosaics, strict=True):
        ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_anchor("W")
        ax.set_xticks([])
        ax.set_yticks([])
        shape = "x".join(str(d) for d in info["output_shape"])
        ax.set_title(
            f"{info['name'][:40]} ({info['type']} {shape}): min {info['min']:.3g}, "
            f"max {info['max']:.3g}",
            fontsize=9,
            loc="left",
        )
    fig.suptitle(
        "Activation maps of this image, every channel (each layer scaled to its min..max)",
        fontsize=10,
    )
    return fig


def _band(values: np.ndarray, columns: int = 16) -> np.ndarray:
    """Tile the channels of one ``(h, w, c)`` map in rows of ``columns``; NaN between tiles."""
    h, w, c = values.shape
    cols = min(columns, c)
    rows = -(-c // cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values, float)
    for ch in range(c):
        r, q = divmod(ch, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = scaled[:, :, ch]
    return grid


def _map_rows(numbers: dict[str, Any]) -> list[list[Any]]:
    sal = numbers["saliency"]
    rows = [["saliency", _where(numbers["saliency_peak"]), float(sal.max()), float(sal.mean())]]
    if numbers["cam"] is not None:
        cam = numbers["cam"]
        rows.append(
            [
                f"Grad-CAM {numbers['cam_layer']}",
                _where(numbers["cam_peak"]),
                float(cam.max()),
                float(cam.mean()),
            ]
        )
    return rows


def _where(point: tuple[int, int] | None) -> str:
    return "none (the map is zero)" if point is None else f"row {point[0]}, column {point[1]}"


def _picture(pixels: np.ndarray, alt: str) -> dict[str, str]:
    """The pixels enlarged without smoothing, as a PNG data URI for the ``img`` macro."""
    import base64
    import io

    from PIL import Image

    grey = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    scale = max(1, PICTURE_SIDE // max(pixels.shape[:2]))
    image = Image.fromarray(np.ascontiguousarray(grey)).resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {
        "src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
        "alt": alt,
    }


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "image"


def _write_page(path: Path, text: str) -> Path:
    """Write the page whole or not at all; its absolute path."""
    write_atomic(path, text)
    return path.resolve()


# --- command line ----------------------------------------------------------------------------


def summary(result: ExplainResult) -> str:
    """The result for people: prediction, probabilities, peaks, activation ranges, page."""
    lines = [
        f"image: {result.image}",
        f"model: {result.model_uri}",
        f"predicted: {result.predicted_label} ({result.probability:.4f})",
        "probabilities: "
        + ", ".join(f"{name}={p:.4f}" for name, p in result.probabilities.items()),
        f"saliency peak (row, col): {result.saliency_peak}",
        f"grad-cam peak (row, col): {result.grad_cam_peak} on {result.grad_cam_layer}",
    ]
    lines += ["activations:"] if result.activations else []
    lines += [
        f"  {a['name']}: min {a['min']:.4g} max {a['max']:.4g} mean {a['mean']:.4g}"
        for a in result.activations
    ]
    lines.append(f"page: {result.page}")
    return "\n".join(lines)
