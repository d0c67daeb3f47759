"""HTML building for run reports: one self-contained page per run or per comparison.

In: what :mod:`pipelines.report.render` fetched from MLflow (the run objects, the run's
downloaded ``report/`` files by name, the dataset manifest, per-epoch metric histories, the
registered model version). Out: the page as a string: images embedded as base64 data URIs,
CSS inline and no external references, so it opens offline from the file system. The one
script, the run page's interactive embedding plot (``templates/embeddings.js.j2``), is inline
and reads its data from an inline JSON block; it fetches nothing. Curves missing from the
artifacts are drawn with :mod:`pipelines.report.plots`. Nothing here talks to MLflow or
writes the page.

The markup lives in Jinja2 templates shipped in the package (``templates/*.html.j2``, with
``templates/report.css`` included into each page's ``<style>``); this module turns the run
into their context: plain text, numbers formatted for display, tables as cells, images as
data URIs. Autoescape is on for every template and nothing is marked safe, so whatever comes
from a run (names, params, tags, labels, paths, notes) is escaped where it is written; the
plot's JSON goes through Jinja2's ``tojson``, which escapes ``<``, ``>``, ``&`` and ``'``.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import functools
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.plots import class_colours_hex, plot_curves, save_png
from pipelines.tasks import task_of_record
from pipelines.tracking import shown_uri

if TYPE_CHECKING:
    import jinja2
    from matplotlib.figure import Figure

#: Context of a template or one of its sections.
_Context = dict[str, Any]


@dataclass(frozen=True)
class _Image:
    """A PNG for ``<img>``: ``src`` is a ``data:image/png;base64,...`` URI."""

    src: str
    alt: str


@dataclass(frozen=True)
class _Cell:
    """A table cell: display text and its CSS classes (``""`` for none)."""

    text: str
    css: str


@dataclass(frozen=True)
class _Table:
    """A table for the ``table`` macro of ``macros.html.j2``."""

    headers: list[str]
    rows: list[list[_Cell]]


@functools.cache
def _environment() -> jinja2.Environment:
    """The template environment (Jinja2 is imported here, so importing the package stays cheap).

    ``PackageLoader`` reads the templates through the package's loader, so they are also
    found when the wheel is imported from a zip file.
    """
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipelines.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_page(template: str, title: str, context: _Context) -> str:
    """One of the package's Jinja2 templates rendered as a whole page, stamped with the time."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return _environment().get_template(template).render(title=title, generated=stamp, **context)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e12:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def _img(path: Path, alt: str) -> _Image:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return _Image(f"data:image/png;base64,{data}", alt)


def figure_img(fig: Figure, alt: str) -> _Image:
    """A matplotlib figure as an image embedded in a page (a PNG data URI)."""
    with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
        path = Path(tmp) / "figure.png"
        save_png(fig, path)
        return _img(path, alt)


def html_table(
    headers: Sequence[Any], rows: Sequence[Sequence[Any]], classes: Sequence[Sequence[str]] = ()
) -> _Table:
    """Format the cells: numbers right-aligned (``num``), plus any extra class per cell."""
    cells = []
    for r, row in enumerate(rows):
        line = []
        for c, value in enumerate(row):
            css = ["num"] if isinstance(value, int | float | np.number) else []
            if r < len(classes) and c < len(classes[r]) and classes[r][c]:
                css.append(classes[r][c])
            line.append(_Cell(_fmt(value), " ".join(css)))
        cells.append(line)
    return _Table([str(h) for h in headers], cells)


def _read_csv(path: Path) -> tuple[list[str], list[list[Any]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return [], []
    return rows[0], [[_number(v) for v in row] for row in rows[1:]]


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _when(millis: int | None) -> str:
    if not millis:
        return "-"
    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_page(
    run: Any,
    files: Mapping[str, Path],
    manifest: Mapping[str, Any] | None,
    tracking_uri: str,
    *,
    version: str | None,
    histories: Mapping[str, list[float]],
) -> str:
    """The HTML page of one run.

    Args:
        run: The MLflow run (``info`` and ``data``).
        files: The run's downloaded ``report/`` files by name (``tensorboard/`` when logged);
            empty for a run without report artifacts.
        manifest: The run's dataset manifest, or None.
        tracking_uri: Shown at the bottom of the page.
        version: The registered model version(s) of the run, e.g. ``digits version 3``.
        histories: Per-epoch values of each epoch metric, in step order.

    Returns:
        The whole HTML document.

    """
    from pipelines.registry import RUN_DECISION_TAG  # mlflow, only when a page is made

    info, data = run.info, run.data
    summary = json.loads(files["summary.json"].read_text()) if "summary.json" in files else {}
    seconds = (
        (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    )
    headline = (
        "test_accuracy",
        "test_loss",
        "test_reconstruction_error",
        "test_rows",
        "epochs_run",
        "seconds_training",
    )
    notes = summary.get("notes", {})
    tags = sorted((k, v) for k, v in data.tags.items() if k != "mlflow.log-model.history")
    context = {
        "run": {
            "name": info.run_name or info.run_id,
            "id": info.run_id,
            "status": info.status,
            "experiment_id": info.experiment_id,
            "started": _when(info.start_time),
            "duration": f"{seconds:,.0f} s" if seconds is not None else None,
            "version": version or "not registered",
            "decision": data.tags.get(RUN_DECISION_TAG),
            "error": data.tags.get("error"),
        },
        "no_artifacts": not any(name.endswith(".png") for name in files),
        "section_errors": list(summary.get("errors", {}).items()),
        "cards": [(key, _fmt(data.metrics[key])) for key in headline if key in data.metrics],
        "curves": _curves_section(files, histories, notes),
        "layer_stats": _layer_stats_section(files, summary, notes),
        "confusion": _confusion_section(files),
        "misclassified": _misclassified_section(files, notes),
        "reconstructions": _reconstructions_section(files),
        "filters": _filters_section(files, notes),
        "filters_topk": _filters_topk_section(files, notes),
        "attribution": _attribution_section(files, notes),
        "activations": _activations_section(files),
        "embeddings": _embeddings_section(files, summary, notes),
        "tensorboard": {"projector": bool(summary.get("projector"))}
        if "tensorboard/" in files
        else None,
        # The per-layer metrics (layer/<layer>/<stat>) have their own section.
        "metrics": html_table(
            ["metric", "last value"],
            sorted((k, v) for k, v in data.metrics.items() if not k.startswith("layer/")),
        ),
        "params": html_table(["param", "value"], sorted(data.params.items())),
        "manifest": _manifest_section(manifest),
        "tags": {"summary": f"{len(tags)} tags", "table": html_table(["tag", "value"], tags)},
        "tracking_uri": shown_uri(tracking_uri),
    }
    return render_page("run.html.j2", f"Run report {info.run_name or info.run_id}", context)


def _curves_section(
    files: Mapping[str, Path], histories: Mapping[str, list[float]], notes: Mapping[str, str]
) -> _Context:
    """The learning curves: the logged PNG, else drawn from the history, else a note."""
    section: _Context = {"image": None, "table": None, "note": None}
    if "learning_curves.png" in files:
        section["image"] = _img(files["learning_curves.png"], "learning curves")
    elif histories:
        epochs = max(len(v) for v in histories.values())
        fig = plot_curves([("", histories)], title=f"Learning curves ({epochs} epochs)")
        section["image"] = figure_img(fig, "learning curves from the metric history")
    else:
        section["note"] = notes.get("learning_curves", "no per-epoch metrics were logged")
        return section
    if histories:
        keys = list(histories)
        epochs = max(len(v) for v in histories.values())
        rows = [
            [e + 1, *(histories[k][e] if e < len(histories[k]) else None for k in keys)]
            for e in range(epochs)
        ]
        section["table"] = html_table(["epoch", *keys], rows)
    return section


def _confusion_section(files: Mapping[str, Path]) -> _Context | None:
    if "confusion_matrix.png" not in files:
        return None
    scores = None
    if "classification_report.json" in files:
        report = json.loads(files["classification_report.json"].read_text())
        rows: list[list[Any]] = [
            [c["label"], c["precision"], c["recall"], c["f1"], c["support"]]
            for c in report["per_class"]
        ]
        for name in ("macro_avg", "weighted_avg"):
            avg = report[name]
            label = name.replace("_", " ")
            rows.append([label, avg["precision"], avg["recall"], avg["f1"], report["total"]])
        scores = {
            "accuracy": f"{report['accuracy']:.2%}",
            "correct": f"{report['correct']:,}",
            "total": f"{report['total']:,}",
            "table": html_table(["class", "precision", "recall", "F1", "support"], rows),
        }
    return {"image": _img(files["confusion_matrix.png"], "confusion matrix"), "scores": scores}


def _misclassified_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> _Context | None:
    if "misclassified.png" not in files:
        return None
    section: _Context = {
        "image": _img(files["misclassified.png"], "most confidently misclassified images"),
        "note": notes.get("misclassified"),
        "summary": None,
        "table": None,
    }
    if "misclassified.csv" in files:
        header, rows = _read_csv(files["misclassified.csv"])
        if rows:
            section.update(summary=f"{len(rows)} rows", table=html_table(header, rows))
    return section


def _reconstructions_section(files: Mapping[str, Path]) -> _Context | None:
    if "reconstructions.png" not in files:
        return None
    table = None
    if "reconstructions.csv" in files:
        table = html_table(*_read_csv(files["reconstructions.csv"]))
    return {
        "image": _img(files["reconstructions.png"], "originals and reconstructions"),
        "table": table,
    }


def _filters_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> _Context | None:
    if "filters_layer1.json" not in files:
        return None
    data = json.loads(files["filters_layer1.json"].read_text())
    section: _Context = {
        "note": data.get("note") or notes.get("filters_layer1"),
        "image": None,
        "summary": None,
        "table": None,
    }
    if "filters_layer1.png" in files:
        rows = [[f["index"], f["min"], f["max"], f["mean"], f["l2_norm"]] for f in data["filters"]]
        section.update(
            image=_img(files["filters_layer1.png"], "first-layer filters"),
            summary=f"{data['layer']}: kernel {tuple(data['kernel_shape'])}",
            table=html_table(["filter", "min", "max", "mean", "L2 norm"], rows),
        )
    return section


def _layer_stats_section(
    files: Mapping[str, Path], summary: Mapping[str, Any], notes: Mapping[str, str]
) -> _Context | None:
    """Per-layer norms, update ratio and activations per epoch; vanishing/exploding warnings."""
    stats = summary.get("layer_stats")
    if stats is None:
        return None
    section: _Context = {
        "image": _img(files["layer_stats.png"], "per-layer statistics per epoch")
        if "layer_stats.png" in files
        else None,
        "warnings": [warning["message"] for warning in stats.get("warnings", [])],
        "layers": len(stats.get("layers", [])),
        "epochs": stats.get("epochs", 0),
        "histograms": bool(stats.get("histograms")),
        "table": None,
        "note": notes.get("layer_stats"),
    }
    if "layer_stats.csv" in files:
        section["table"] = html_table(*_read_csv(files["layer_stats.csv"]))
    return section


def _filters_topk_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> _Context | None:
    """Per conv layer, the top-k images of each filter cropped to its receptive field."""
    if "filters_topk.json" not in files:
        return None
    data = json.loads(files["filters_topk.json"].read_text())
    layers = []
    for layer in data["layers"]:
        name = f"filters_topk_{layer['name']}.png"
        field = layer["receptive_field"]
        layers.append(
            {
                "name": layer["name"],
                "summary": (
                    f"{layer['filters']} filters ({layer['drawn']} drawn), receptive field "
                    f"{field['size'][0]}x{field['size'][1]} px, stride "
                    f"{field['stride'][0]}x{field['stride'][1]}"
                ),
                "image": _img(files[name], f"top images of {layer['name']}")
                if name in files
                else None,
            }
        )
    return {
        "k": data["k"],
        "images": data["images"],
        "layers": layers,
        "note": notes.get("filters_topk"),
    }


def _attribution_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> _Context | None:
    """Saliency and Grad-CAM of the most confident mistakes and as many correct images."""
    if "attribution.json" not in files:
        return None
    data = json.loads(files["attribution.json"].read_text())
    rows = [
        [
            entry["index"],
            entry["true"],
            entry["predicted"],
            entry["probability"],
            "yes" if entry["correct"] else "no",
            _peak(entry["saliency"]),
            _peak(entry["grad_cam"]),
        ]
        for entry in data["images"]
    ]
    header = [
        "index",
        "true",
        "predicted",
        "probability",
        "correct",
        "saliency peak",
        "Grad-CAM peak",
    ]
    return {
        "image": _img(files["attribution.png"], "saliency and Grad-CAM")
        if "attribution.png" in files
        else None,
        "layer": data.get("grad_cam_layer"),
        "score": data.get("score"),
        "mistakes": data["mistakes"],
        "correct": data["correct"],
        "table": html_table(header, rows) if rows else None,
        "note": data.get("note") or notes.get("attribution"),
    }


def _peak(summary: Mapping[str, Any] | None) -> str:
    """A map's peak as ``(row, col)``; ``-`` for no map or a map that is zero everywhere."""
    peak = (summary or {}).get("peak")
    return f"({peak[0]}, {peak[1]})" if peak else "-"


def _activations_section(files: Mapping[str, Path]) -> _Context | None:
    if "activations.json" not in files:
        return None
    data = json.loads(files["activations.json"].read_text())
    image = (
        _img(files["activations.png"], "activation maps") if "activations.png" in files else None
    )
    section: _Context = {"note": data.get("note"), "image": image, "samples": None, "table": None}
    if data["layers"]:
        rows = [
            [
                layer["name"],
                layer["type"],
                " x ".join(map(str, layer["output_shape"])),
                layer["min"],
                layer["max"],
            ]
            for layer in data["layers"]
        ]
        section.update(
            samples=", ".join(f"#{s['index']} ({s['label']})" for s in data["samples"]),
            table=html_table(
                ["layer", "type", "output shape", "min activation", "max activation"], rows
            ),
        )
    return section


def _embeddings_section(
    files: Mapping[str, Path], summary: Mapping[str, Any], notes: Mapping[str, str]
) -> _Context | None:
    if "embeddings.png" not in files:
        return None
    section: _Context = {
        "image": _img(files["embeddings.png"], "2-D projection of the embeddings"),
        "projection": None,
        "note": notes.get("embeddings"),
        "explorer": _embeddings_explorer(files, summary),
    }
    emb = summary.get("embedding")
    if emb:
        ratio = emb.get("pca_explained_variance_ratio", [0, 0])
        section["projection"] = {
            "layer": emb["layer"],
            "dimensions": emb["dimensions"],
            "methods": ", ".join(emb["methods"]),
            "explained": [f"{ratio[0]:.1%}", f"{ratio[1]:.1%}"],
            "predicts_labels": task_of_record(summary).uses_labels,
        }
    return section


#: Display names of the projections in ``embeddings.csv`` (``<key>_1``, ``<key>_2``).
_PROJECTIONS = {"pca": "PCA", "tsne": "t-SNE"}


def _embeddings_explorer(files: Mapping[str, Path], summary: Mapping[str, Any]) -> _Context | None:
    """The interactive plot's context: the sampled rows of ``embeddings.csv`` and thumbnails.

    The points are the rows named by ``embeddings_sprite.json``'s ``indices``, in that order
    (the order of the thumbnails in ``embeddings_sprite.png``); None when a file is missing
    (a run logged before the plot existed), and the page keeps the static figure only.
    """
    needed = ("embeddings.csv", "embeddings_sprite.png", "embeddings_sprite.json")
    if not all(name in files for name in needed):
        return None
    meta = json.loads(files["embeddings_sprite.json"].read_text())
    with files["embeddings.csv"].open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        by_index = {int(row["index"]): row for row in reader}
    rows = [by_index[i] for i in meta["indices"]]
    names = [str(n) for n in summary.get("label_names") or []]
    for row in by_index.values():  # a label outside the manifest's names (see numeric.class_name)
        for key in ("label", "predicted"):
            if key in row and row[key] not in names:
                names.append(row[key])
    classes = {name: k for k, name in enumerate(names)}
    classifier = "predicted" in header
    methods = [m for m in _PROJECTIONS if f"{m}_1" in header]
    colours = class_colours_hex(len(names))
    data = {
        "classes": names,
        "colours": colours,
        "classifier": classifier,
        "methods": [_axis_labels(m, summary) for m in methods],
        "index": [int(row["index"]) for row in rows],
        "path": [row["path"] for row in rows],
        "true": [classes[row["label"]] for row in rows],
        "predicted": [classes[row["predicted"]] for row in rows] if classifier else [],
        "probability": [_float(row.get("probability")) for row in rows] if classifier else [],
        "coords": {
            m: [[float(row[f"{m}_1"]), float(row[f"{m}_2"])] for row in rows] for m in methods
        },
        "sprite": {
            "src": _img(files["embeddings_sprite.png"], "thumbnails").src,
            "tile": meta["tile"],
            "columns": meta["columns"],
        },
    }
    return {
        "data": data,
        "methods": data["methods"],
        "classifier": classifier,
        "legend": list(zip(names, colours, strict=True)),
        "legend_title": "true class" if classifier else "dataset label",
        "caption": _sample_caption(by_index, rows, classifier),
    }


def _axis_labels(method: str, summary: Mapping[str, Any]) -> dict[str, str]:
    if method == "pca":
        ratio = (summary.get("embedding") or {}).get("pca_explained_variance_ratio", [0, 0])
        x, y = (f"PC {k + 1} ({ratio[k]:.0%} of variance)" for k in range(2))
    else:
        x, y = f"{_PROJECTIONS[method]} 1", f"{_PROJECTIONS[method]} 2"
    return {"key": method, "name": _PROJECTIONS[method], "x": x, "y": y}


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _sample_caption(
    by_index: Mapping[int, Mapping[str, str]], rows: Sequence[Mapping[str, str]], classifier: bool
) -> str:
    """Which points the plot shows: all of them, or how many of how many and which."""
    total, shown = len(by_index), len(rows)
    if shown == total:
        return f"All {total:,} images of the evaluation split are shown."
    text = f"Showing {shown:,} of {total:,} images"
    if not classifier:
        return f"{text} (a fixed random sample)."
    wrong = sum(row["label"] != row["predicted"] for row in by_index.values())
    wrong_shown = sum(row["label"] != row["predicted"] for row in rows)
    if wrong_shown == wrong:
        return f"{text}: all {wrong:,} misclassified ones and a fixed random sample of the rest."
    return f"{text}: {wrong_shown:,} of the {wrong:,} misclassified ones, a fixed random sample."


def _manifest_section(manifest: Mapping[str, Any] | None) -> _Context | None:
    if manifest is None:
        return None
    rows = []
    for key, value in manifest.items():
        text = value if isinstance(value, str | int | float) else json.dumps(value)
        if isinstance(text, str) and len(text) > 160:
            text = text[:157] + "..."
        rows.append([key, text])
    return {"table": html_table(["field", "value"], rows), "text": json.dumps(manifest, indent=2)}


def comparison_page(
    runs: Sequence[Any],
    labels: Sequence[str],
    differing: Sequence[str],
    histories: Sequence[Mapping[str, list[float]]],
    figures: Sequence[Path | None],
    tracking_uri: str,
) -> str:
    """The HTML page comparing runs: overlaid learning curves and a metrics table.

    Args:
        runs: The MLflow runs, in the order of the columns.
        labels: One label per run (name and the params that differ).
        differing: Param keys whose values differ between the runs.
        histories: Per-epoch metric values of each run.
        figures: Each run's confusion matrix (or reconstructions) PNG, or None.
        tracking_uri: Shown at the bottom of the page.

    Returns:
        The whole HTML document.

    """
    curves = None
    if any(histories):
        fig = plot_curves(list(zip(labels, histories, strict=True)), title="Learning curves")
        curves = figure_img(fig, "overlaid learning curves")

    rows: list[list[Any]] = [["status", *(run.info.status for run in runs)]]
    rows += [[key, *(run.data.params.get(key, "-") for run in runs)] for key in differing]
    classes: list[list[str]] = [[] for _ in rows]
    metric_keys = sorted(
        {key for run in runs for key in run.data.metrics},
        key=lambda k: (not k.startswith("test_"), not k.startswith("val_"), k),
    )
    for key in metric_keys:
        values = [run.data.metrics.get(key) for run in runs]
        rows.append([key, *values])
        classes.append(["", *_best_marks(key, values)])

    per_run = None
    if any(figures):
        per_run = [
            (label, _img(figure, f"figure of {label}") if figure else None)
            for label, figure in zip(labels, figures, strict=True)
        ]
    context = {
        "run_ids": [run.info.run_id for run in runs],
        "curves": curves,
        "identical_params": not differing,
        "table": html_table(["", *labels], rows, classes),
        "per_run": per_run,
        "tracking_uri": shown_uri(tracking_uri),
    }
    return render_page("comparison.html.j2", f"Comparison of {len(runs)} runs", context)


def _best_marks(key: str, values: Sequence[float | None]) -> list[str]:
    """Mark the best value of a metric whose direction is known (accuracy up, loss/error down)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2 or len(set(finite)) == 1:
        return ["" for _ in values]
    if "accuracy" in key:
        best = max(finite)
    elif "loss" in key or "error" in key:
        best = min(finite)
    else:
        return ["" for _ in values]
    return ["best" if v == best else "" for v in values]
