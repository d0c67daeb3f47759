"""Training-time report: compute every section and write (or log) it as run artifacts.

In (:func:`log_training_report`, on the driver inside the active MLflow run, after
evaluation): the trained Keras model, rank 0's per-epoch ``history``, the model's
:class:`~pipelines.tasks.Evaluation` (the whole split's metrics and summary, and a bounded
sample of its images with the model's outputs on them) and its :class:`~pipelines.tasks.Task`,
which says which sections apply. Sections that draw images use the sample; what counts
the whole split (metrics, the confusion matrix) uses the split.
Out: the files listed in :mod:`pipelines.report` under the run's :data:`REPORT_DIR`
(:func:`write_training_report` writes the same files to a local directory and logs nothing),
and the summary dict also stored as ``summary.json``. Each section is computed with
:mod:`~pipelines.report.numeric` and :mod:`~pipelines.report.probe`, drawn with
:mod:`~pipelines.report.plots`; a section that fails is recorded, never raised.
TensorFlow and MLflow are imported inside the functions that need them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report import embeddings
from pipelines.report.attribution import write_attribution
from pipelines.report.filters import write_filter_topk
from pipelines.report.layers import LayerRecords, write_layer_section
from pipelines.report.numeric import (
    class_name,
    classification_report,
    jsonable,
    most_confident_errors,
    pca_2d,
    pick_samples,
    tsne_2d,
)
from pipelines.report.plots import (
    plot_activations,
    plot_confusion,
    plot_curves,
    plot_embeddings,
    plot_misclassified,
    plot_reconstructions,
    plot_tiles,
    save_png,
)
from pipelines.report.probe import activation_layers, layer_outputs

if TYPE_CHECKING:
    from pipelines.keras_api import KerasModel
    from pipelines.tasks import Evaluation, Task
    from pipelines.train.feed import SplitArrays

log = logging.getLogger(__name__)

#: Artifact directory of the run that holds the report.
REPORT_DIR = "report"
#: How many of the most confident errors the misclassified grid shows.
MISCLASSIFIED_SHOWN = 16
#: How many images the reconstruction figure shows.
RECONSTRUCTIONS_SHOWN = 8
#: At most this many first-layer filters (or dense units) are drawn and stored.
FILTERS_SHOWN = 64


#: The note of the TensorBoard parts on the Keras stack (no TensorFlow, no TensorBoard there).
NO_TENSORBOARD = (
    "TensorBoard files not written: the Keras stack has no TensorFlow or TensorBoard "
    "(the same numbers are in the report's plots, CSVs and MLflow metrics)"
)


def log_training_report(
    model: KerasModel,
    *,
    history: Mapping[str, Sequence[float]],
    evaluation: Evaluation,
    task: Task,
    tsne: bool = False,
    samples: int = 4,
    layers: LayerRecords | None = None,
) -> dict[str, Any]:
    """Compute the training report and log it to the active MLflow run under ``report/``.

    Call it on the driver inside ``mlflow.start_run()``, after evaluating ``model``. A
    section that fails (a plot bug, an odd custom model) is logged as a warning and listed
    under ``errors`` in the result; it never fails the training run.

    Args:
        model: The trained Keras model (layer names as :mod:`pipelines.models` documents).
        history: Per-epoch metrics of rank 0, e.g. ``loss``, ``accuracy``, ``val_loss``,
            ``val_accuracy``, ``lr`` (``reconstruction_error`` ... for a reconstruction).
        evaluation: The model's evaluation on the test split (the val split when test is
            empty): metrics, summary, and the sample the image sections draw.
        task: What the model does: which sections apply.
        tsne: Also project the embeddings with t-SNE (scikit-learn; minutes for 10,000 images).
        samples: Number of sample images whose activation maps are drawn.
        layers: Rank 0's per-layer statistics and histograms per epoch and the gradient
            thresholds (``train.layer_stats``); None: the section says none were recorded.

    Returns:
        The summary also stored as ``report/summary.json``: ``artifacts`` (relative names),
        ``notes`` and ``errors`` per section, ``task``, ``test_rows``, ``sample`` (the images
        the image sections drew, of how many) and, for classifiers, ``accuracy``,
        ``correct`` and ``confusion_matrix`` (a list of rows), for a reconstruction
        ``reconstruction_error``; plus ``embedding`` and ``activation_layers``.

    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
        summary = write_training_report(
            tmp,
            model,
            history=history,
            evaluation=evaluation,
            task=task,
            tsne=tsne,
            samples=samples,
            layers=layers,
        )
        mlflow.log_artifacts(tmp, artifact_path=REPORT_DIR)
    return summary


def write_training_report(
    out_dir: str | Path,
    model: KerasModel,
    *,
    history: Mapping[str, Sequence[float]],
    evaluation: Evaluation,
    task: Task,
    tsne: bool = False,
    samples: int = 4,
    layers: LayerRecords | None = None,
) -> dict[str, Any]:
    """Write the files of :func:`log_training_report` to a local directory, log nothing.

    Args:
        out_dir: Directory to write into (created if missing).
        model: See :func:`log_training_report`.
        history: See :func:`log_training_report`.
        evaluation: See :func:`log_training_report`.
        task: See :func:`log_training_report`.
        tsne: See :func:`log_training_report`.
        samples: See :func:`log_training_report`.
        layers: See :func:`log_training_report`.

    Returns:
        The summary, as :func:`log_training_report` returns it.

    Raises:
        ValueError: The evaluation's outputs do not fit its sample (row count, classes).

    """
    from pipelines.images import normalise

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = evaluation.sample
    outputs = np.asarray(evaluation.outputs)
    labels = np.asarray(arrays.labels, dtype=np.int64)
    names = [str(name) for name in arrays.label_names]
    _check_outputs(outputs, arrays, names, task)
    x = normalise(arrays.images)

    summary: dict[str, Any] = {
        "model": str(getattr(model, "name", "model")),
        "task": task.name,
        "test_rows": evaluation.rows,
        "sample": {"images": len(arrays), "of": evaluation.rows},
        "label_names": names,
        "notes": {},
        "errors": {},
    }
    if evaluation.sampled:
        summary["notes"]["sample"] = (
            f"the sections that draw images use {len(arrays)} of the split's "
            f"{evaluation.rows} images"
            + (", the mistakes first" if task.uses_labels else ", drawn at random")
        )
    writers: dict[str, Callable[[], dict[str, Any]]] = {
        "confusion_matrix": lambda: _confusion(out, evaluation.summary, names),
        "misclassified": lambda: _misclassified(out, arrays, outputs, names, evaluation),
        "attribution": lambda: write_attribution(
            out, model, arrays.images, x, labels, outputs, names
        ),
        "reconstructions": lambda: _reconstructions(out, arrays, x, outputs, names, evaluation),
    }
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("learning_curves", lambda: _learning_curves(out, history)),
        *((name, writers[name]) for name in task.report_sections),
        ("filters_layer1", lambda: _filters(out, model)),
        ("filters_topk", lambda: write_filter_topk(out, model, arrays.images, x)),
        ("activations", lambda: _activations(out, model, arrays, x, names, samples)),
        ("embeddings", lambda: _embeddings(out, model, arrays, x, outputs, names, task, tsne)),
        ("layer_stats", lambda: write_layer_section(out, layers or LayerRecords())),
        ("tensorboard", lambda: _tensorboard(out / "tensorboard", model, history, x)),
    ]
    for name, section in sections:
        try:
            result = section()
        except Exception as exc:  # a broken plot must not lose the trained model
            log.warning("report: section %s failed", name, exc_info=True)
            summary["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        note = result.pop("note", None)
        if note:
            summary["notes"][name] = note
        summary.update(result)
    summary["artifacts"] = _artifact_names(out)
    summary["artifacts"].append("summary.json")
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    return summary


def _learning_curves(out: Path, history: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    series = {key: [float(v) for v in values] for key, values in history.items() if len(values)}
    if not series:
        return {"note": "no per-epoch history was recorded"}
    epochs = max(len(values) for values in series.values())
    rows = [
        [epoch + 1, *(values[epoch] if epoch < len(values) else "" for values in series.values())]
        for epoch in range(epochs)
    ]
    _write_csv(out / "learning_curves.csv", ["epoch", *series], rows)
    fig = plot_curves([("", series)], title=f"Learning curves ({epochs} epochs)")
    save_png(fig, out / "learning_curves.png")
    return {"epochs": epochs}


def _confusion(out: Path, split: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The whole split's confusion matrix (counted by the evaluation) and class scores."""
    cm = np.asarray(split["confusion_matrix"], dtype=np.int64)
    _write_csv(
        out / "confusion_matrix.csv",
        ["true \\ predicted", *names],
        [[names[k], *cm[k].tolist()] for k in range(len(names))],
    )
    report = classification_report(cm, names)
    (out / "classification_report.json").write_text(json.dumps(jsonable(report), indent=2))
    save_png(plot_confusion(cm, names, report["accuracy"]), out / "confusion_matrix.png")
    return {
        "accuracy": report["accuracy"],
        "correct": report["correct"],
        "confusion_matrix": cm.tolist(),
    }


def _misclassified(
    out: Path,
    arrays: SplitArrays,
    probabilities: np.ndarray,
    names: list[str],
    evaluation: Evaluation,
) -> dict[str, Any]:
    """The most confident mistakes: the sample holds the split's, most confident first."""
    labels = np.asarray(arrays.labels)
    predicted = probabilities.argmax(axis=1)
    errors = int(evaluation.summary.get("errors", np.sum(predicted != labels)))
    shown = most_confident_errors(labels, probabilities, MISCLASSIFIED_SHOWN)
    rows = [
        [
            rank + 1,
            int(i),
            arrays.paths[i],
            names[labels[i]],
            names[predicted[i]],
            float(probabilities[i, predicted[i]]),
            float(probabilities[i, labels[i]]),
        ]
        for rank, i in enumerate(shown)
    ]
    header = ["rank", "index", "path", "true", "predicted", "probability", "true_probability"]
    _write_csv(out / "misclassified.csv", header, rows)
    save_png(
        plot_misclassified(arrays.images, rows, errors, evaluation.rows), out / "misclassified.png"
    )
    result: dict[str, Any] = {"misclassified": errors}
    if not errors:
        result["note"] = "every image of the split was classified correctly"
    return result


def _filters(out: Path, model: KerasModel) -> dict[str, Any]:
    from pipelines.keras_api import keras

    layers = keras().layers
    image_shape = tuple(int(d) for d in model.input_shape[1:])
    first_conv = next(
        (
            layer
            for layer in model.layers
            if isinstance(layer, layers.Conv2D) and not isinstance(layer, layers.Conv2DTranspose)
        ),
        None,
    )
    if first_conv is not None:
        kernel = first_conv.get_weights()[0]  # (kh, kw, in, out)
        tiles = np.moveaxis(kernel, -1, 0)  # (out, kh, kw, in)
        kind, layer, note = "conv", first_conv, None
    else:
        layer = next(
            (
                candidate
                for candidate in model.layers
                if isinstance(candidate, layers.Dense)
                and candidate.get_weights()
                and candidate.get_weights()[0].shape[0] == math.prod(image_shape)
            ),
            None,
        )
        if layer is None:
            note = f"model {model.name} has no convolution and no dense layer on the pixels"
            (out / "filters_layer1.json").write_text(json.dumps({"layer": None, "note": note}))
            return {"filters": {"layer": None}, "note": note}
        kernel = layer.get_weights()[0]  # (pixels, units)
        tiles = kernel.T.reshape(-1, *image_shape)
        kind = "dense"
        note = (
            f"model {model.name} has no convolution layer; showing the weights of each unit "
            f"of its first dense layer ({layer.name}) as an image instead"
        )
    shown = tiles[:FILTERS_SHOWN]
    bias = layer.get_weights()[1] if len(layer.get_weights()) > 1 else None
    data = {
        "layer": layer.name,
        "kind": kind,
        "kernel_shape": list(kernel.shape),
        "count": len(tiles),
        "shown": len(shown),
        "filters": [
            {
                "index": i,
                "min": float(tile.min()),
                "max": float(tile.max()),
                "mean": float(tile.mean()),
                "l2_norm": float(np.linalg.norm(tile)),
                "bias": float(bias[i]) if bias is not None else None,
            }
            for i, tile in enumerate(tiles)
        ],
        "weights": shown.tolist(),  # (shown, kh, kw, in): the drawn tiles
    }
    if note:
        data["note"] = note
    (out / "filters_layer1.json").write_text(json.dumps(jsonable(data)))
    title = (
        f"{layer.name}: {len(tiles)} filters {'x'.join(str(d) for d in kernel.shape[:3])}"
        if kind == "conv"
        else f"{layer.name}: weights of {len(tiles)} units as {'x'.join(map(str, image_shape))}"
    )
    save_png(
        plot_tiles(shown, f"{title} (each scaled to its own min..max)"), out / "filters_layer1.png"
    )
    result: dict[str, Any] = {"filters": {"layer": layer.name, "kind": kind}}
    if note:
        result["note"] = note
    return result


def _activations(
    out: Path,
    model: KerasModel,
    arrays: SplitArrays,
    x: np.ndarray,
    names: list[str],
    samples: int,
) -> dict[str, Any]:
    chosen = activation_layers(model)
    picked = pick_samples(np.asarray(arrays.labels), samples)
    sample_info = [
        {"index": int(i), "path": arrays.paths[i], "label": class_name(names, arrays.labels[i])}
        for i in picked
    ]
    if not chosen or not len(picked):
        note = (
            f"model {model.name} has no convolution or pooling layers"
            if not chosen
            else "no sample images"
        )
        (out / "activations.json").write_text(
            json.dumps({"samples": sample_info, "layers": [], "note": note})
        )
        return {"activation_layers": [], "note": note}
    maps = layer_outputs(model, [layer.name for layer in chosen], x[picked])
    layers_info = []
    for layer, values in zip(chosen, maps, strict=True):
        layers_info.append(
            {
                "name": layer.name,
                "type": type(layer).__name__,
                "output_shape": list(values.shape[1:]),
                "min": float(values.min()),
                "max": float(values.max()),
                "per_sample": [
                    {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}
                    for v in values
                ],
            }
        )
    (out / "activations.json").write_text(
        json.dumps(jsonable({"samples": sample_info, "layers": layers_info}), indent=1)
    )
    fig = plot_activations(arrays.images[picked], sample_info, layers_info, maps)
    save_png(fig, out / "activations.png")
    return {"activation_layers": [info["name"] for info in layers_info]}


def _embeddings(
    out: Path,
    model: KerasModel,
    arrays: SplitArrays,
    x: np.ndarray,
    outputs: np.ndarray,
    names: list[str],
    task: Task,
    tsne: bool,
) -> dict[str, Any]:
    """The 2-D projections (CSV, PNG), the page's thumbnails and the projector files.

    ``embeddings.csv`` has one row per image; ``embeddings_sprite.png/.json`` hold the
    thumbnails of the (at most :data:`EMBEDDINGS_SHOWN`) points the page plots, in the order
    of the JSON's ``indices``; ``tensorboard/`` gets the projector's vectors, metadata,
    sprite and config.
    """
    wanted = task.embedding_layer
    layer_names = [layer.name for layer in model.layers]
    notes = []
    if wanted in layer_names:
        layer_name = wanted
    else:
        layer_name = model.layers[-2].name
        notes.append(
            f"model {model.name} has no layer {wanted!r}; projecting {layer_name!r} instead"
        )
    (features,) = layer_outputs(model, [layer_name], x)
    features = features.reshape(len(features), -1)
    coords, ratio = pca_2d(features)
    projections = {"pca": coords}
    if tsne:
        if len(features) >= 4:
            projections["tsne"] = tsne_2d(features)
        else:
            notes.append("t-SNE skipped: it needs at least 4 images")
    labels = np.asarray(arrays.labels)
    predicted = outputs.argmax(axis=1) if task.uses_labels else None
    _write_csv(
        out / "embeddings.csv",
        *_embedding_rows(arrays.paths, labels, predicted, outputs, names, projections),
    )
    fig = plot_embeddings(
        projections,
        labels,
        predicted,
        names,
        layer_name,
        features.shape[1],
        ratio,
        task.label_caption,
    )
    save_png(fig, out / "embeddings.png")
    shown = embeddings.sample_points(labels, predicted, embeddings.EMBEDDINGS_SHOWN)
    embeddings.write_thumbnails(out, arrays.images, shown, len(labels))
    from pipelines.keras_api import is_keras3

    projector = None
    if is_keras3():
        notes.append(NO_TENSORBOARD)
    else:
        try:  # the projector is an extra: its failure must not cost the plots above
            projector = embeddings.write_projector(
                out / "tensorboard", features, arrays, labels, predicted, names, layer_name
            )
        except Exception as exc:
            log.warning("report: the TensorBoard projector files failed", exc_info=True)
            notes.append(f"TensorBoard projector files not written: {type(exc).__name__}: {exc}")
    result: dict[str, Any] = {
        "embedding": {
            "layer": layer_name,
            "dimensions": int(features.shape[1]),
            "methods": list(projections),
            "pca_explained_variance_ratio": ratio.tolist(),
            "shown": len(shown),
        },
        "projector": projector,
    }
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _embedding_rows(
    paths: Sequence[str],
    labels: np.ndarray,
    predicted: np.ndarray | None,
    outputs: np.ndarray,
    names: list[str],
    projections: Mapping[str, np.ndarray],
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``embeddings.csv``: one per image, the page's plot reads them."""
    header = ["index", "path", "label"]
    if predicted is not None:
        header += ["predicted", "probability"]
    for method in projections:
        header += [f"{method}_1", f"{method}_2"]
    rows = []
    for i in range(len(labels)):
        row: list[Any] = [i, paths[i], class_name(names, labels[i])]
        if predicted is not None:
            row += [class_name(names, predicted[i]), float(outputs[i, predicted[i]])]
        for method_coords in projections.values():
            row += [float(method_coords[i, 0]), float(method_coords[i, 1])]
        rows.append(row)
    return header, rows


def _reconstructions(
    out: Path,
    arrays: SplitArrays,
    x: np.ndarray,
    outputs: np.ndarray,
    names: list[str],
    evaluation: Evaluation,
) -> dict[str, Any]:
    outputs = outputs.reshape(x.shape)
    errors = np.abs(outputs - x).reshape(len(x), -1).mean(axis=1)
    squared = ((outputs - x) ** 2).reshape(len(x), -1).mean(axis=1)
    count = min(RECONSTRUCTIONS_SHOWN, len(x))
    shown = np.unique(np.linspace(0, len(x) - 1, count).round().astype(int)) if count else []
    rows = [
        [
            int(i),
            arrays.paths[i],
            class_name(names, arrays.labels[i]),
            float(errors[i]),
            float(squared[i]),
        ]
        for i in shown
    ]
    _write_csv(out / "reconstructions.csv", ["index", "path", "label", "mae", "mse"], rows)
    save_png(plot_reconstructions(x, outputs, shown, errors), out / "reconstructions.png")
    return {"reconstruction_error": evaluation.metrics.get("test_reconstruction_error", 0.0)}


def _tensorboard(
    out: Path, model: KerasModel, history: Mapping[str, Sequence[float]], x: np.ndarray
) -> dict[str, Any]:
    """Write TensorBoard logs: epoch scalars (train/ and validation/) and the model graph.

    The projector files in the same folder are written by :func:`_embeddings`, which has the
    embedding layer's outputs; the summary says whether they are there. The Keras stack
    has neither TensorFlow nor TensorBoard: no logs, and a note says so.
    """
    from pipelines.keras_api import is_keras3

    if is_keras3():
        return {
            "tensorboard": {"scalars": [], "graph": False, "projector": False},
            "note": NO_TENSORBOARD,
        }
    import tensorflow as tf

    writers = {
        "train": tf.summary.create_file_writer(str(out / "train")),
        "validation": tf.summary.create_file_writer(str(out / "validation")),
    }
    for key, values in history.items():
        kind, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
        with writers[kind].as_default():
            for epoch, value in enumerate(values):
                tf.summary.scalar(f"epoch_{tag}", float(value), step=epoch)
    graph_written = False
    if len(x):
        forward = tf.function(lambda batch: model(batch, training=False))
        tf.summary.trace_on(graph=True, profiler=False)
        try:
            forward(tf.constant(x[:1]))
            with writers["train"].as_default():
                tf.summary.trace_export(name=f"{model.name}_graph", step=0)
            graph_written = True
        finally:
            tf.summary.trace_off()
    for writer in writers.values():
        writer.flush()
        writer.close()
    projector = (out / embeddings.PROJECTOR_CONFIG).is_file()
    return {
        "tensorboard": {"scalars": sorted(history), "graph": graph_written, "projector": projector}
    }


def _check_outputs(outputs: np.ndarray, arrays: SplitArrays, names: list[str], task: Task) -> None:
    if len(outputs) != len(arrays.labels):
        raise ValueError(f"{len(outputs)} outputs for {len(arrays.labels)} images")
    if not task.uses_labels:
        if outputs.size != arrays.images.size:
            raise ValueError(
                f"reconstructions {outputs.shape} do not match images {arrays.images.shape}"
            )
    elif outputs.ndim != 2 or outputs.shape[1] != len(names):
        raise ValueError(
            f"class probabilities must be (N, {len(names)}) for {len(names)} label names, "
            f"got {outputs.shape}"
        )


def _artifact_names(out: Path) -> list[str]:
    names = []
    for path in sorted(out.iterdir()):
        names.append(f"{path.name}/" if path.is_dir() else path.name)
    return names


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
