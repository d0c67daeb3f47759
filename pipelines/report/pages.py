"""HTML building for run reports: one self-contained page per run or per comparison.

In: what :mod:`pipelines.report.render` fetched from MLflow (the run objects, the run's
downloaded ``report/`` files by name, the dataset manifest, per-epoch metric histories, the
registered model version). Out: the page as a string: images embedded as base64 data URIs,
CSS inline, no JavaScript and no external references, so it opens offline from the file
system. Curves missing from the artifacts are drawn with :mod:`pipelines.report.plots`.
Nothing here talks to MLflow or writes the page.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.plots import plot_curves, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0; color: #1f2328; background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px 0; }
h2 { font-size: 1.2em; margin: 0 0 12px 0; border-bottom: 1px solid #d0d7de; padding-bottom: 6px; }
section { background: white; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px;
          margin: 16px 0; }
.sub { color: #59636e; margin: 0 0 8px 0; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; font-size: 0.85em;
         font-weight: 600; color: white; background: #59636e; vertical-align: middle; }
.badge.FINISHED { background: #1a7f37; } .badge.FAILED, .badge.KILLED { background: #cf222e; }
.badge.RUNNING { background: #9a6700; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 16px; min-width: 130px; }
.card .v { font-size: 1.4em; font-weight: 600; } .card .k { color: #59636e; font-size: 0.85em; }
.note { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px;
        margin: 8px 0; }
.error { background: #ffebe9; border: 1px solid #cf222e; border-radius: 6px; padding: 8px 12px;
         margin: 8px 0; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #dafbe1; font-weight: 600; }
.good { color: #1a7f37; } .bad { color: #cf222e; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
details > summary { cursor: pointer; color: #0969da; margin: 6px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 12px; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; }
footer { color: #59636e; font-size: 0.8em; margin: 24px 0; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


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


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _figure_img(fig: Figure, alt: str) -> str:
    with tempfile.TemporaryDirectory(prefix="dlpipe-report-") as tmp:
        path = Path(tmp) / "figure.png"
        save_png(fig, path)
        return _img(path, alt)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[Sequence[str]] = ()
) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            css = ["num"] if isinstance(value, int | float | np.number) else []
            if r < len(classes) and c < len(classes[r]) and classes[r][c]:
                css.append(classes[r][c])
            attr = f' class="{" ".join(css)}"' if css else ""
            cells.append(f"<td{attr}>{_esc(_fmt(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def _section(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{_esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{_esc(title)}</h2>{body}</section>"


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_esc(summary)}</summary>{body}</details>"


def _page(title: str, body: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}<footer>Generated by dlpipe report at {_esc(stamp)}. "
        "Self-contained: no scripts, no external resources.</footer></main></body></html>\n"
    )


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
    info, data = run.info, run.data
    summary = json.loads(files["summary.json"].read_text()) if "summary.json" in files else {}
    seconds = (
        (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    )
    parts = [
        f"<h1>{_esc(info.run_name or info.run_id)} "
        f'<span class="badge {_esc(info.status)}">{_esc(info.status)}</span></h1>',
        f'<p class="sub">run <code>{_esc(info.run_id)}</code> &middot; experiment '
        f"{_esc(info.experiment_id)} &middot; started {_esc(_when(info.start_time))}"
        + (f" &middot; {seconds:,.0f} s" if seconds is not None else "")
        + "</p>",
        f'<p class="sub">model: {_esc(version or "not registered")}'
        + (
            f" &middot; {_esc(data.tags['registry.decision'])}"
            if data.tags.get("registry.decision")
            else ""
        )
        + "</p>",
    ]
    if data.tags.get("error"):
        parts.append(f'<div class="error">Error: {_esc(data.tags["error"])}</div>')
    if not any(name.endswith(".png") for name in files):
        parts.append(
            '<div class="note">This run has no report artifacts (it may have failed or been '
            "trained before reports existed): showing its params and metrics only.</div>"
        )
    for section, message in summary.get("errors", {}).items():
        parts.append(
            f'<div class="error">Report section {_esc(section)} failed: {_esc(message)}</div>'
        )

    headline = [
        key
        for key in (
            "test_accuracy",
            "test_loss",
            "test_reconstruction_error",
            "test_rows",
            "epochs_run",
            "seconds_training",
        )
        if key in data.metrics
    ]
    if headline:
        cards = "".join(
            f'<div class="card"><div class="v">{_esc(_fmt(data.metrics[key]))}</div>'
            f'<div class="k">{_esc(key)}</div></div>'
            for key in headline
        )
        parts.append(_section("Results", f'<div class="cards">{cards}</div>'))

    notes = summary.get("notes", {})
    parts.append(_curves_section(files, histories, notes))
    parts += [
        _confusion_section(files),
        _misclassified_section(files, notes),
        _reconstructions_section(files),
        _filters_section(files, notes),
        _activations_section(files, notes),
        _embeddings_section(files, summary, notes),
    ]
    if "tensorboard/" in files:
        parts.append(
            _section(
                "TensorBoard",
                "<p>Scalars and the model graph are logged as the artifact "
                "<code>report/tensorboard</code>. To browse them:</p>"
                f"<pre>mlflow artifacts download -r {_esc(info.run_id)} -a report/tensorboard "
                f"-d tb\ntensorboard --logdir tb</pre>",
            )
        )
    parts.append(_metrics_section(data.metrics))
    parts.append(_section("Parameters", _table(["param", "value"], sorted(data.params.items()))))
    parts.append(_manifest_section(manifest))
    tags = sorted((k, v) for k, v in data.tags.items() if k != "mlflow.log-model.history")
    parts.append(_section("Tags", _details(f"{len(tags)} tags", _table(["tag", "value"], tags))))
    parts.append(f'<p class="sub">Tracking URI: <code>{_esc(tracking_uri)}</code></p>')
    return _page(f"Run report {info.run_name or info.run_id}", "".join(p for p in parts if p))


def _curves_section(
    files: Mapping[str, Path], histories: Mapping[str, list[float]], notes: Mapping[str, str]
) -> str:
    if "learning_curves.png" in files:
        body = _img(files["learning_curves.png"], "learning curves")
    elif histories:
        epochs = max(len(v) for v in histories.values())
        fig = plot_curves([("", histories)], title=f"Learning curves ({epochs} epochs)")
        body = _figure_img(fig, "learning curves from the metric history")
    else:
        note = notes.get("learning_curves", "no per-epoch metrics were logged")
        return _section("Learning curves", f'<p class="note">{_esc(note)}</p>')
    if histories:
        keys = list(histories)
        epochs = max(len(v) for v in histories.values())
        rows = [
            [e + 1, *(histories[k][e] if e < len(histories[k]) else None for k in keys)]
            for e in range(epochs)
        ]
        body += _details("per-epoch values", _table(["epoch", *keys], rows))
    return _section("Learning curves", body, "curves")


def _confusion_section(files: Mapping[str, Path]) -> str:
    if "confusion_matrix.png" not in files:
        return ""
    body = _img(files["confusion_matrix.png"], "confusion matrix")
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
        body += (
            f"<p>Accuracy <b>{report['accuracy']:.2%}</b>: {report['correct']:,} of "
            f"{report['total']:,} images correct.</p>"
            + _table(["class", "precision", "recall", "F1", "support"], rows)
        )
    return _section("Confusion matrix and per-class scores", body, "confusion")


def _misclassified_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> str:
    if "misclassified.png" not in files:
        return ""
    body = _img(files["misclassified.png"], "most confidently misclassified images")
    if notes.get("misclassified"):
        body += f'<p class="good">{_esc(notes["misclassified"])}</p>'
    if "misclassified.csv" in files:
        header, rows = _read_csv(files["misclassified.csv"])
        if rows:
            body += _details(f"{len(rows)} rows", _table(header, rows))
    return _section("Most confident mistakes", body, "misclassified")


def _reconstructions_section(files: Mapping[str, Path]) -> str:
    if "reconstructions.png" not in files:
        return ""
    body = _img(files["reconstructions.png"], "originals and reconstructions")
    if "reconstructions.csv" in files:
        header, rows = _read_csv(files["reconstructions.csv"])
        body += _details("per-image errors", _table(header, rows))
    return _section("Reconstructions", body, "reconstructions")


def _filters_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> str:
    if "filters_layer1.json" not in files:
        return ""
    data = json.loads(files["filters_layer1.json"].read_text())
    body = ""
    if data.get("note") or notes.get("filters_layer1"):
        body += f'<p class="note">{_esc(data.get("note") or notes["filters_layer1"])}</p>'
    if "filters_layer1.png" in files:
        body += _img(files["filters_layer1.png"], "first-layer filters")
        rows = [[f["index"], f["min"], f["max"], f["mean"], f["l2_norm"]] for f in data["filters"]]
        body += _details(
            f"{data['layer']}: kernel {tuple(data['kernel_shape'])}",
            _table(["filter", "min", "max", "mean", "L2 norm"], rows),
        )
    return _section("First-layer filters", body, "filters")


def _activations_section(files: Mapping[str, Path], notes: Mapping[str, str]) -> str:
    if "activations.json" not in files:
        return ""
    data = json.loads(files["activations.json"].read_text())
    body = ""
    if data.get("note"):
        body += f'<p class="note">{_esc(data["note"])}</p>'
    if "activations.png" in files:
        body += _img(files["activations.png"], "activation maps")
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
        samples = ", ".join(f"#{s['index']} ({s['label']})" for s in data["samples"])
        body += f"<p>Sample images: {_esc(samples)}</p>" + _table(
            ["layer", "type", "output shape", "min activation", "max activation"], rows
        )
    return _section("Activations per layer", body, "activations")


def _embeddings_section(
    files: Mapping[str, Path], summary: Mapping[str, Any], notes: Mapping[str, str]
) -> str:
    if "embeddings.png" not in files:
        return ""
    body = _img(files["embeddings.png"], "2-D projection of the embeddings")
    emb = summary.get("embedding")
    if emb:
        ratio = emb.get("pca_explained_variance_ratio", [0, 0])
        body += (
            f"<p>Layer <code>{_esc(emb['layer'])}</code> ({emb['dimensions']} dimensions), "
            f"methods: {_esc(', '.join(emb['methods']))}; the first two principal components "
            f"explain {ratio[0]:.1%} and {ratio[1]:.1%} of the variance. Points marked "
            "with a cross are misclassified.</p>"
        )
    if notes.get("embeddings"):
        body += f'<p class="note">{_esc(notes["embeddings"])}</p>'
    return _section("Embeddings", body, "embeddings")


def _metrics_section(metrics: Mapping[str, float]) -> str:
    rows = sorted(metrics.items())
    return _section("Final metrics", _table(["metric", "last value"], rows), "metrics")


def _manifest_section(manifest: Mapping[str, Any] | None) -> str:
    if manifest is None:
        return _section("Dataset", '<p class="note">No dataset manifest was logged.</p>')
    rows = []
    for key, value in manifest.items():
        text = value if isinstance(value, str | int | float) else json.dumps(value)
        if isinstance(text, str) and len(text) > 160:
            text = text[:157] + "..."
        rows.append([key, text])
    body = _table(["field", "value"], rows) + _details(
        "_manifest.json", f"<pre>{_esc(json.dumps(manifest, indent=2))}</pre>"
    )
    return _section("Dataset manifest", body, "dataset")


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
    parts = [
        f"<h1>Comparison of {len(runs)} runs</h1>",
        '<p class="sub">'
        + " &middot; ".join(f"<code>{_esc(run.info.run_id)}</code>" for run in runs)
        + "</p>",
    ]
    if any(histories):
        fig = plot_curves(list(zip(labels, histories, strict=True)), title="Learning curves")
        parts.append(_section("Learning curves", _figure_img(fig, "overlaid learning curves")))
    else:
        parts.append(_section("Learning curves", '<p class="note">No per-epoch metrics.</p>'))

    headers = ["", *labels]
    rows: list[list[Any]] = [["status", *(run.info.status for run in runs)]]
    if not differing:
        parts.append('<div class="note">These runs have identical params.</div>')
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
    parts.append(_section("Params that differ, and final metrics", _table(headers, rows, classes)))
    if any(figures):
        cells = "".join(
            f"<div><p><b>{_esc(label)}</b></p>"
            + (_img(figure, f"figure of {label}") if figure else "<p>no report figure</p>")
            + "</div>"
            for label, figure in zip(labels, figures, strict=True)
        )
        parts.append(_section("Per run", f'<div class="grid">{cells}</div>'))
    parts.append(f'<p class="sub">Tracking URI: <code>{_esc(tracking_uri)}</code></p>')
    return _page(f"Comparison of {len(runs)} runs", "".join(parts))


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
