"""What one scoring batch looks like, beside what the model was trained on.

In: the batch as written (read back from the table, so the numbers are the table's), the
confidence threshold (``score.low_confidence_below``) and the class distribution of the
model's training split (from the dataset manifest its run logged). Out: a
:class:`BatchSummary`, with rows, errors, mean probability, the share of low-confidence
predictions, the predicted-class distribution and its total-variation distance from the
training split's; :func:`log_batch_summary` records it as an MLflow run of its own.

The batch is aggregated per predicted class (at most one row per class reaches the driver):
with pyarrow from the partition's files of a local Parquet table, else by a Spark job.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.store import MANIFEST_ARTIFACT, ScoringTable

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipelines.store import Store

log = logging.getLogger(__name__)

#: The columns a batch is summarised from.
SUMMARY_COLUMNS = ("predicted_label", "error", "probability", "reconstruction_error")


@dataclass(frozen=True)
class ClassGroup:
    """The rows of a batch with one predicted label (None: errors and label-less models).

    Attributes:
        label: The predicted label.
        rows: Rows.
        errors: Rows with ``error`` set.
        probabilities: Rows with a probability.
        probability_sum: Their probabilities' sum.
        low: Rows whose probability is below the threshold.
        reconstructions: Rows with a reconstruction error.
        reconstruction_sum: Their errors' sum.
    """

    label: str | None
    rows: int = 0
    errors: int = 0
    probabilities: int = 0
    probability_sum: float = 0.0
    low: int = 0
    reconstructions: int = 0
    reconstruction_sum: float = 0.0


@dataclass(frozen=True)
class BatchSummary:
    """One scoring batch at a glance.

    Attributes:
        rows: Rows written (one per file).
        scored: Rows with a prediction.
        errors: Rows with ``error`` set (unreadable or undecodable files).
        mean_probability: Mean probability of the predicted class (None without any).
        low_confidence_below: The threshold of ``low_confidence_share``.
        low_confidence_share: Share of predictions whose probability is below it.
        predicted_classes: Rows per predicted class, every training class listed.
        training_classes: Rows per class in the model's training split (empty when unknown).
        class_tvd: Total-variation distance between the predicted-class distribution and
            the training split's: half the sum of the absolute differences of the shares,
            0 (alike) to 1 (disjoint); None when either is unknown or empty.
        mean_reconstruction_error: A reconstruction model's mean error (None otherwise).
        notes: Why a number is missing.
    """

    rows: int
    scored: int
    errors: int
    mean_probability: float | None
    low_confidence_below: float
    low_confidence_share: float | None
    predicted_classes: dict[str, int]
    training_classes: dict[str, int]
    class_tvd: float | None
    mean_reconstruction_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict."""
        return asdict(self)


def summarize(
    groups: Iterable[ClassGroup],
    training: Mapping[str, int],
    low_confidence_below: float,
    notes: Iterable[str] = (),
) -> BatchSummary:
    """The summary of a batch from its per-class aggregates.

    Args:
        groups: The batch's rows grouped by predicted label (groups of one label add up).
        training: Rows per class in the training split ({} when unknown).
        low_confidence_below: The threshold the groups' ``low`` counts were taken at.
        notes: Why a number is missing, carried into the summary.
    """
    merged: dict[str | None, ClassGroup] = {}
    for group in groups:
        old = merged.get(group.label)
        merged[group.label] = group if old is None else _add(old, group)
    rows = sum(g.rows for g in merged.values())
    errors = sum(g.errors for g in merged.values())
    probabilities = sum(g.probabilities for g in merged.values())
    reconstructions = sum(g.reconstructions for g in merged.values())
    predicted = {str(name): 0 for name in training}
    for label, group in merged.items():
        if label is not None:
            predicted[label] = predicted.get(label, 0) + group.rows - group.errors
    return BatchSummary(
        rows=rows,
        scored=rows - errors,
        errors=errors,
        mean_probability=(
            sum(g.probability_sum for g in merged.values()) / probabilities
            if probabilities
            else None
        ),
        low_confidence_below=low_confidence_below,
        low_confidence_share=(
            sum(g.low for g in merged.values()) / probabilities if probabilities else None
        ),
        predicted_classes=predicted,
        training_classes={str(k): int(v) for k, v in training.items()},
        class_tvd=total_variation(predicted, training),
        mean_reconstruction_error=(
            sum(g.reconstruction_sum for g in merged.values()) / reconstructions
            if reconstructions
            else None
        ),
        notes=list(notes),
    )


def total_variation(counts: Mapping[str, int], reference: Mapping[str, int]) -> float | None:
    """Total-variation distance of two count distributions: ``0.5 * sum |p(c) - q(c)|``.

    Classes missing from one side count as 0 there. None when either side is empty.
    """
    total, reference_total = sum(counts.values()), sum(reference.values())
    if total <= 0 or reference_total <= 0:
        return None
    classes = set(counts) | set(reference)
    return 0.5 * sum(
        abs(counts.get(c, 0) / total - reference.get(c, 0) / reference_total) for c in classes
    )


def _add(a: ClassGroup, b: ClassGroup) -> ClassGroup:
    return ClassGroup(
        a.label,
        a.rows + b.rows,
        a.errors + b.errors,
        a.probabilities + b.probabilities,
        a.probability_sum + b.probability_sum,
        a.low + b.low,
        a.reconstructions + b.reconstructions,
        a.reconstruction_sum + b.reconstruction_sum,
    )


# --- aggregating a written batch ------------------------------------------------------------


def batch_groups(
    spark: SparkSession, table: ScoringTable, batch_id: str, low_confidence_below: float
) -> list[ClassGroup]:
    """The batch's rows grouped by predicted label, read back from the table.

    A local Parquet partition is read with pyarrow on the driver, a file and four columns
    at a time (a Spark job cost about a sixth of a small batch's scoring time); any other
    table is aggregated by Spark, whose result is one row per class.
    """
    folder = table.local_partition(batch_id)
    if folder is not None:
        return _groups_of_files(sorted(folder.glob("*.parquet")), low_confidence_below)
    return _groups_by_spark(spark, table, batch_id, low_confidence_below)


def _groups_of_files(files: list, low_confidence_below: float) -> list[ClassGroup]:
    import pyarrow.parquet as pq

    groups = []
    for part in files:
        names = pq.ParquetFile(part).schema_arrow.names
        frame = pq.read_table(part, columns=[c for c in SUMMARY_COLUMNS if c in names])
        groups += _groups_of_frame(frame.to_pandas(), low_confidence_below)
    return groups


def _groups_of_frame(frame: Any, low_confidence_below: float) -> list[ClassGroup]:
    """Per-label aggregates of one pandas frame of :data:`SUMMARY_COLUMNS`."""
    import pandas as pd

    for name in SUMMARY_COLUMNS:
        if name not in frame.columns:
            frame[name] = None
    frame = frame.assign(
        probability=pd.to_numeric(frame.probability),
        reconstruction_error=pd.to_numeric(frame.reconstruction_error),
    )
    groups = []
    for label, part in frame.groupby("predicted_label", dropna=False, sort=False):
        probability = part.probability.dropna()
        reconstruction = part.reconstruction_error.dropna()
        groups.append(
            ClassGroup(
                label=None if pd.isna(label) else str(label),
                rows=len(part),
                errors=int(part.error.notna().sum()),
                probabilities=len(probability),
                probability_sum=float(probability.sum()),
                low=int((probability < low_confidence_below).sum()),
                reconstructions=len(reconstruction),
                reconstruction_sum=float(reconstruction.sum()),
            )
        )
    return groups


def _groups_by_spark(
    spark: SparkSession, table: ScoringTable, batch_id: str, low_confidence_below: float
) -> list[ClassGroup]:
    from pyspark.sql import functions as F

    from pipelines.score_table import read_table

    frame = read_table(spark, table.location, table.format).where(
        F.col(ScoringTable.PARTITION_COLUMN) == batch_id
    )
    probability, reconstruction = F.col("probability"), F.col("reconstruction_error")
    rows = (
        frame.groupBy("predicted_label")
        .agg(
            F.count("*").alias("rows"),
            F.count("error").alias("errors"),
            F.count(probability).alias("probabilities"),
            F.coalesce(F.sum(probability), F.lit(0.0)).alias("probability_sum"),
            F.count(F.when(probability < low_confidence_below, 1)).alias("low"),
            F.count(reconstruction).alias("reconstructions"),
            F.coalesce(F.sum(reconstruction), F.lit(0.0)).alias("reconstruction_sum"),
        )
        .collect()
    )
    return [
        ClassGroup(
            label=row["predicted_label"],
            rows=row["rows"],
            errors=row["errors"],
            probabilities=row["probabilities"],
            probability_sum=float(row["probability_sum"]),
            low=row["low"],
            reconstructions=row["reconstructions"],
            reconstruction_sum=float(row["reconstruction_sum"]),
        )
        for row in rows
    ]


# --- the training split's classes, and MLflow ------------------------------------------------


def training_classes(run_id: str | None, tracking_uri: str) -> tuple[dict[str, int], str | None]:
    """Rows per class of the training split the run ``run_id`` trained on.

    Read from the dataset manifest the training run logged (:data:`MANIFEST_ARTIFACT`).

    Returns:
        The counts, and why they are missing when they are ({} then).
    """
    if not run_id:
        return {}, "the model has no training run: no training class distribution"
    import tempfile
    from pathlib import Path

    import mlflow

    from pipelines.schema import Manifest

    try:
        with tempfile.TemporaryDirectory() as folder:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=MANIFEST_ARTIFACT,
                dst_path=folder,
                tracking_uri=tracking_uri,
            )
            text = Path(local).read_text()
        return Manifest.from_json(text).class_distribution("train"), None
    except Exception as exc:  # noqa: BLE001 - a summary without it beats no summary
        return {}, f"no dataset manifest in run {run_id}: {type(exc).__name__}: {exc}"[:300]


#: Characters MLflow accepts in a metric name; others become ``_``.
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def log_batch_summary(
    store: Store,
    experiment: str,
    summary: BatchSummary,
    *,
    tags: Mapping[str, str],
    counts: Mapping[str, int],
) -> str:
    """Record a batch's summary as a finished MLflow run of ``experiment``; its id.

    Named after the batch, with ``tags`` (batch id, table, model), every number of the
    summary as a metric (``class_share/<label>`` per class, ``counts`` besides), and the
    whole summary as ``batch_summary.json``.
    """
    from mlflow.entities import Metric, RunTag

    from pipelines import tracking

    client = tracking.client(store.tracking_uri)
    experiment_id = tracking.experiment_id(store, experiment)
    run = client.create_run(
        experiment_id, run_name=str(tags.get("batch_id", "")), tags={"stage": "score", **tags}
    )
    run_id = run.info.run_id
    try:
        now = int(run.info.start_time)
        values: dict[str, float] = {key: float(value) for key, value in counts.items()}
        values.update(rows=summary.rows, scored=summary.scored, errors=summary.errors)
        for key in ("mean_probability", "low_confidence_share", "class_tvd"):
            if getattr(summary, key) is not None:
                values[key] = float(getattr(summary, key))
        if summary.mean_reconstruction_error is not None:
            values["mean_reconstruction_error"] = summary.mean_reconstruction_error
        scored = sum(summary.predicted_classes.values())
        for label, count in summary.predicted_classes.items():
            values[f"class_share/{_METRIC_NAME.sub('_', label)}"] = count / scored if scored else 0
        metrics = [Metric(key, value, now, 0) for key, value in values.items()]
        client.log_batch(
            run_id,
            metrics=metrics,
            tags=[RunTag("low_confidence_below", str(summary.low_confidence_below))],
        )
        client.log_text(run_id, json.dumps(summary.to_dict(), indent=2), "batch_summary.json")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
