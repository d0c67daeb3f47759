"""What a model is trained to do: the one owner of everything that depends on it.

In: the model zoo's name (``train.model``), or the label sidecar of a logged model. Out: a
:class:`Task`, which owns

- the loss and metrics a model is compiled with, and what the feed gives it as targets;
- the model's output columns (:mod:`pipelines.schema` holds each task's column contract;
  the pyfunc's signature and the scoring table follow it) and how raw outputs become them;
- evaluation: metrics computed batch by batch over a split (:class:`Evaluator`), with
  driver memory independent of the split's size, and a bounded, stated sample of the
  split's images with the model's outputs for the report;
- which metric decides promotion and whether higher is better;
- which report sections apply, and the layer whose outputs are the embedding.

Two tasks today: :data:`CLASSIFICATION` (a softmax over the dataset's classes) and
:data:`RECONSTRUCTION` (the autoencoder, trained on images alone). A multi-label or a
regression task is a new :class:`Task` here, its columns in :mod:`pipelines.schema`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import schema

if TYPE_CHECKING:
    from pipelines.train.feed import SplitArrays

#: At most this many images of an evaluated split are kept for the report (mistakes first).
REPORT_SAMPLE_IMAGES = 2000
#: ... and at most this many bytes of them, with the model's outputs (large images).
REPORT_SAMPLE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Evaluation:
    """A model's evaluation on one split.

    Attributes:
        metrics: ``test_<metric>`` values and ``test_rows`` (the whole split's).
        sample: The images kept for the report (at most :data:`REPORT_SAMPLE_IMAGES`, the
            mistakes first), sorted by path.
        outputs: The model's outputs on ``sample``: class probabilities ``(N, K)``, or
            reconstructions ``(N, H, W, C)`` in [0, 1].
        rows: Rows of the whole split.
        summary: What the task's report sections need of the whole split (a
            classifier's ``confusion_matrix`` and ``errors``).
        example_png: One image of the split as a PNG file (the model's input example).
    """

    metrics: dict[str, float]
    sample: SplitArrays
    outputs: np.ndarray
    rows: int
    summary: dict[str, Any] = field(default_factory=dict)
    example_png: bytes = b""

    @property
    def sampled(self) -> bool:
        """Whether the report sees fewer images than the split holds."""
        return len(self.sample) < self.rows


class Evaluator:
    """Metrics of a split, batch by batch, and the report's bounded sample of it.

    Args:
        task: The task whose outputs are evaluated.
        label_names: Class name of each label index.
        limit: Most images kept for the report.
        seed: Seed of the sample's reservoir (the sample is reproducible).
    """

    def __init__(self, task: Task, label_names: Sequence[str], limit: int, seed: int = 0) -> None:
        self.task = task
        self.label_names = [str(name) for name in label_names]
        self.limit = limit
        self.rows = 0
        self._rng = np.random.default_rng(seed)
        self._kept: list[_Row] = []  # a seeded reservoir of the other rows
        self._preferred: list[tuple[float, int, _Row]] = []  # a heap of the preferred rows
        self._seen_for_reservoir = 0
        self._count = 0
        self._example: np.ndarray | None = None
        self._state: dict[str, Any] = task.start_metrics(self.label_names)

    def update(
        self, images: np.ndarray, labels: np.ndarray, paths: Sequence[str], outputs: np.ndarray
    ) -> None:
        """Add one batch: its uint8 images, labels, paths and the model's outputs on them."""
        if not len(images):
            return
        if self._example is None:
            self._example = images[0].copy()
        self.rows += len(images)
        self.task.add_metrics(self._state, images, labels, outputs)
        self._limit_to_budget(images, outputs)
        preferred = self.task.preferred(labels, outputs)
        for i in range(len(images)):
            self._count += 1
            row = _Row(
                str(paths[i]), int(labels[i]), images[i].copy(), outputs[i].copy(), self._count
            )
            if preferred[i] is not None:
                self._keep_preferred(row, preferred[i])
            else:
                self._keep_sampled(row)

    def result(self, by_path: bool = True) -> Evaluation:
        """The metrics of every batch added, and the sample.

        Args:
            by_path: Sort the sample by path (as a split is read); else rows keep the order
                they were added in.
        """
        from pipelines.images import encode_png
        from pipelines.train.feed import SplitArrays

        chosen = sorted(self._chosen(), key=lambda row: row.path if by_path else row.order)
        if chosen:
            images = np.stack([row.image for row in chosen])
            outputs = np.stack([row.output for row in chosen])
        else:
            images, outputs = np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.float32)
        sample = SplitArrays(
            images=images,
            labels=np.asarray([row.label for row in chosen], dtype=np.int32),
            paths=[row.path for row in chosen],
            label_names=self.label_names,
        )
        metrics, summary = self.task.finish_metrics(self._state, self.rows)
        first = images[0] if len(chosen) else self._example
        example = encode_png(first) if first is not None else b""
        return Evaluation(metrics, sample, outputs, self.rows, summary, example)

    # The sample: rows the task prefers (a classifier's mistakes, most confident first) are
    # kept ahead of the others, which fill the rest through a seeded reservoir.

    def _keep_preferred(self, row: _Row, priority: float) -> None:
        entry = (priority, -row.order, row)  # ties: the earlier row stays
        preferred = self._preferred
        if len(preferred) < self.limit:
            heapq.heappush(preferred, entry)
        elif priority > preferred[0][0]:
            heapq.heapreplace(preferred, entry)

    def _keep_sampled(self, row: _Row) -> None:
        seen = self._seen_for_reservoir
        self._seen_for_reservoir += 1
        if len(self._kept) < self.limit:
            self._kept.append(row)
            return
        slot = int(self._rng.integers(0, seen + 1))
        if slot < self.limit:
            self._kept[slot] = row

    def _chosen(self) -> list[_Row]:
        preferred = [row for _, _, row in sorted(self._preferred, reverse=True)]
        return preferred + self._kept[: max(0, self.limit - len(preferred))]

    def _limit_to_budget(self, images: np.ndarray, outputs: np.ndarray) -> None:
        row_bytes = images[0].nbytes + outputs[0].nbytes
        self.limit = max(1, min(self.limit, REPORT_SAMPLE_BYTES // max(1, row_bytes)))
        del self._kept[self.limit :]
        while len(self._preferred) > self.limit:
            heapq.heappop(self._preferred)


@dataclass
class _Row:
    """One evaluated row kept for the report."""

    path: str
    label: int
    image: np.ndarray
    output: np.ndarray
    order: int  # when it was added


class Task:
    """What a model is trained to do; see the module docstring for what it owns.

    Attributes:
        name: ``classification`` or ``reconstruction``.
        uses_labels: The model learns the labels (a classifier); else only the images.
        metric: The compiled metric (``history`` key, ``val_<metric>``, ``test_<metric>``).
        higher_is_better: Whether a higher :attr:`metric` is a better model.
        output_columns: The model's output columns (name -> Spark type), in order.
        embedding_layer: The layer whose outputs the report projects as embeddings.
        report_sections: The report sections that apply, besides those every model gets.
        label_caption: How a report names the labels beside its points.
    """

    name: str
    uses_labels: bool
    metric: str
    higher_is_better: bool
    output_columns: dict[str, str]
    embedding_layer: str
    report_sections: tuple[str, ...]
    label_caption: str

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # One instance per task, also across a pickle (ranks, executors).
        return task_named, (self.name,)

    @property
    def test_metric(self) -> str:
        """The task's own logged metric on the test split: ``test_<metric>``."""
        return f"test_{self.metric}"

    def promotion_metric(self, name: str) -> tuple[str, bool]:
        """The logged metric that decides promotion for ``registry.metric`` = ``name``.

        Returns:
            ``(test metric, higher is better)``; a task without such a metric keeps its own.
        """
        return self.test_metric, self.higher_is_better

    def compile(self, model: Any, optimizer: Any, k: Any) -> None:
        """Compile ``model`` with this task's loss and metric."""
        raise NotImplementedError

    def targets(self, images: Any, labels: Any) -> tuple[Any, Any]:
        """What the feed gives ``fit`` for a batch: ``(images, labels)`` or ``(images, images)``."""
        return (images, labels) if self.uses_labels else (images, images)

    def evaluator(
        self, label_names: Sequence[str], limit: int = REPORT_SAMPLE_IMAGES, seed: int = 0
    ) -> Evaluator:
        """A streaming evaluator of this task's outputs on a split."""
        return Evaluator(self, label_names, limit, seed)

    def evaluate(self, arrays: SplitArrays, outputs: np.ndarray) -> Evaluation:
        """Evaluate outputs computed for a whole split in memory: all of it the sample, in order."""
        evaluator = self.evaluator(arrays.label_names, limit=max(1, len(arrays)))
        evaluator.update(arrays.images, arrays.labels, arrays.paths, np.asarray(outputs))
        return evaluator.result(by_path=False)

    def start_metrics(self, label_names: list[str]) -> dict[str, Any]:
        """The empty state of this task's metrics over a split."""
        raise NotImplementedError

    def add_metrics(
        self, state: dict[str, Any], images: np.ndarray, labels: np.ndarray, outputs: np.ndarray
    ) -> None:
        """Add one batch (uint8 images, labels, the model's outputs) to the metrics' state."""
        raise NotImplementedError

    def finish_metrics(
        self, state: dict[str, Any], rows: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The logged metrics (``test_<metric>``, ``test_rows``, ...) and the report's summary."""
        raise NotImplementedError

    def preferred(self, labels: np.ndarray, outputs: np.ndarray) -> list[float | None]:
        """Per row, its priority for the report's sample (None: sampled at random)."""
        return [None] * len(labels)

    def output_values(
        self, outputs: np.ndarray, images: np.ndarray, label_names: Sequence[str]
    ) -> dict[str, list[Any]]:
        """This task's output columns for a batch, besides ``error`` which every task has.

        Args:
            outputs: The model's outputs on ``images``.
            images: The batch, float32 in [0, 1].
            label_names: Class name of each label index.
        """
        raise NotImplementedError


class Classification(Task):
    """A softmax over the dataset's classes, trained on integer labels."""

    name = "classification"
    uses_labels = True
    metric = "accuracy"
    higher_is_better = True
    output_columns = dict(schema.MODEL_OUTPUTS)
    embedding_layer = "embedding"
    report_sections = ("confusion_matrix", "misclassified", "attribution")
    label_caption = "true class"

    def compile(self, model: Any, optimizer: Any, k: Any) -> None:
        """Sparse categorical cross-entropy on integer labels, metric ``accuracy``."""
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )

    def start_metrics(self, label_names: list[str]) -> dict[str, Any]:
        """A confusion matrix and the summed log loss."""
        k = len(label_names)
        return {"confusion": np.zeros((k, k), np.int64), "log_loss": 0.0}

    def add_metrics(
        self, state: dict[str, Any], images: np.ndarray, labels: np.ndarray, outputs: np.ndarray
    ) -> None:
        """Count the batch into the confusion matrix; add its log loss."""
        from pipelines.report.numeric import confusion_matrix

        labels = np.asarray(labels, dtype=np.int64)
        predicted = outputs.argmax(axis=1)
        state["confusion"] += confusion_matrix(labels, predicted, len(state["confusion"]))
        picked = outputs[np.arange(len(labels)), labels]
        state["log_loss"] += float(np.sum(-np.log(np.clip(picked, 1e-7, 1.0))))

    #: ``registry.metric`` -> the logged metric and whether higher is better.
    PROMOTION_METRICS = {
        "accuracy": ("test_accuracy", True),
        "macro_f1": ("test_macro_f1", True),
        "log_loss": ("test_loss", False),  # the mean cross-entropy of the true class
    }

    def promotion_metric(self, name: str) -> tuple[str, bool]:
        """``test_accuracy``, ``test_macro_f1`` or ``test_loss`` (the log loss), by name."""
        return self.PROMOTION_METRICS[name]

    def finish_metrics(
        self, state: dict[str, Any], rows: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """``test_accuracy``, ``test_macro_f1``, ``test_loss``; the confusion matrix, errors."""
        confusion = state["confusion"]
        correct = int(np.trace(confusion))
        metrics = {
            "test_accuracy": correct / rows if rows else 0.0,
            "test_macro_f1": macro_f1(confusion),
            "test_loss": state["log_loss"] / rows if rows else 0.0,
            "test_rows": float(rows),
        }
        return metrics, {"confusion_matrix": confusion, "errors": rows - correct}

    def preferred(self, labels: np.ndarray, outputs: np.ndarray) -> list[float | None]:
        """Mistakes first, the most confident first: what the report's mistake sections show."""
        predicted = outputs.argmax(axis=1)
        confidence = outputs[np.arange(len(outputs)), predicted]
        return [
            float(c) if p != y else None
            for c, p, y in zip(confidence, predicted, labels, strict=True)
        ]

    def output_values(
        self, outputs: np.ndarray, images: np.ndarray, label_names: Sequence[str]
    ) -> dict[str, list[Any]]:
        """The most probable class's name and probability, and every class's probability."""
        scores = outputs.astype(np.float64)
        best = scores.argmax(axis=1)
        return {
            "predicted_label": [label_names[k] for k in best],
            "probability": scores[np.arange(len(scores)), best].tolist(),
            "probabilities": scores.tolist(),
        }


class Reconstruction(Task):
    """The autoencoder: the model reproduces its input; labels are never seen."""

    name = "reconstruction"
    uses_labels = False
    metric = "reconstruction_error"
    higher_is_better = False
    output_columns = {**schema.MODEL_OUTPUTS, **schema.RECONSTRUCTION_OUTPUTS}
    embedding_layer = "latent"
    report_sections = ("reconstructions",)
    label_caption = "dataset label (not used for training)"

    def compile(self, model: Any, optimizer: Any, k: Any) -> None:
        """Mean squared error, metric the mean absolute error as ``reconstruction_error``."""
        model.compile(
            optimizer=optimizer,
            loss="mse",
            metrics=[k.metrics.MeanAbsoluteError(name="reconstruction_error")],
        )

    def start_metrics(self, label_names: list[str]) -> dict[str, Any]:
        """The summed per-row mean absolute errors."""
        return {"absolute_error": 0.0}

    def add_metrics(
        self, state: dict[str, Any], images: np.ndarray, labels: np.ndarray, outputs: np.ndarray
    ) -> None:
        """Add the batch's per-row errors."""
        state["absolute_error"] += float(row_errors(images, outputs).sum())

    def finish_metrics(
        self, state: dict[str, Any], rows: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """``test_reconstruction_error``, the mean absolute error over all pixels.

        Every row has as many pixels, so the mean of the rows' means is that mean.
        """
        error = state["absolute_error"] / rows if rows else 0.0
        return {"test_reconstruction_error": error, "test_rows": float(rows)}, {}

    def output_values(
        self, outputs: np.ndarray, images: np.ndarray, label_names: Sequence[str]
    ) -> dict[str, list[Any]]:
        """Each image's mean absolute reconstruction error."""
        return {schema.RECONSTRUCTION_ERROR: row_errors(images, outputs).tolist()}


def macro_f1(confusion: np.ndarray) -> float:
    """The mean F1 score of the classes in a confusion matrix (rows: true, columns: predicted).

    F1 of a class is ``2 TP / (2 TP + FP + FN)``. A class neither present nor predicted
    (no test rows, no prediction) has no F1 and is left out of the mean; 0 for an empty
    matrix.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(matrix)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # = 2 TP + FP + FN
    seen = denominator > 0
    return float(np.mean(2 * tp[seen] / denominator[seen])) if seen.any() else 0.0


def row_errors(images: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Each row's mean absolute error between its image in [0, 1] and its reconstruction.

    Args:
        images: uint8 images, or float32 images already normalised to [0, 1].
        outputs: The reconstructions, as many values per row as the images have.
    """
    from pipelines.images import normalise

    x = normalise(images) if images.dtype == np.uint8 else images
    return np.abs(outputs.reshape(x.shape) - x).reshape(len(x), -1).mean(axis=1)


CLASSIFICATION = Classification()
RECONSTRUCTION = Reconstruction()


#: Every task, by name.
TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, RECONSTRUCTION)}


def task_named(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: No such task.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_for_model(model: str) -> Task:
    """The task of a zoo model (``train.model``)."""
    from pipelines.models import MODEL_TASKS

    return task_named(MODEL_TASKS.get(model, CLASSIFICATION.name))


def task_of_record(record: dict[str, Any]) -> Task:
    """The task a model's label sidecar or a report's summary records.

    Records written before tasks existed say ``"autoencoder": true`` instead.
    """
    if "task" in record:
        return task_named(str(record["task"]))
    return RECONSTRUCTION if record.get("autoencoder") else CLASSIFICATION


def task_of_image_model(python_model: Any) -> Task:
    """The task of a loaded ``ImageModel``, whichever version of the package logged it.

    Its class may come from the model's own copy of the package (``code_paths``); copies
    from before tasks existed have an ``autoencoder`` attribute instead.
    """
    if hasattr(python_model, "task"):
        return task_named(python_model.task.name)
    return task_of_record({"autoencoder": getattr(python_model, "autoencoder", False)})
