"""The numbers behind a run report: pure numpy (scikit-learn only for t-SNE).

In: class labels, predicted classes or class probabilities, and feature matrices, as numpy
arrays. Out: numpy arrays and plain dicts (confusion matrix, per-class scores, the indexes of
the most confident errors and of sample images, 2-D projections). Nothing here draws, writes
files or touches Keras or MLflow; scikit-learn is imported inside :func:`tsne_2d` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Count true x predicted classes.

    Args:
        labels: True class indexes, shape ``(N,)``.
        predicted: Predicted class indexes, shape ``(N,)``.
        num_classes: Number of classes K.

    Returns:
        int64 ``(K, K)``: row = true class, column = predicted class.

    Raises:
        ValueError: Shapes differ or an index is outside ``[0, K)``.

    """
    true = np.asarray(labels, dtype=np.int64).ravel()
    pred = np.asarray(predicted, dtype=np.int64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"labels {true.shape} and predictions {pred.shape} differ in length")
    for what, values in (("label", true), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"a {what} is outside [0, {num_classes})")
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def classification_report(cm: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from a confusion matrix.

    Agrees with scikit-learn's ``classification_report(..., labels=range(K), zero_division=0)``:
    a class never predicted has precision 0, a class absent from the split recall 0, and
    the macro average runs over all K classes.

    Args:
        cm: ``(K, K)`` counts, row = true class, column = predicted class.
        label_names: K class names.

    Returns:
        ``per_class`` (a list of ``{label, precision, recall, f1, support}``), ``accuracy``,
        ``correct``, ``total``, ``macro_avg`` and ``weighted_avg``.

    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    total = int(cm.sum())
    correct = int(tp.sum())

    def average(weights: np.ndarray) -> dict[str, float]:
        scale = float(weights.sum())
        return {
            name: float(np.dot(values, weights) / scale) if scale else 0.0
            for name, values in (("precision", precision), ("recall", recall), ("f1", f1))
        }

    return {
        "per_class": [
            {
                "label": str(label_names[k]),
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k in range(len(tp))
        ],
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "macro_avg": average(np.ones_like(tp)),
        "weighted_avg": average(support),
    }


def most_confident_errors(labels: np.ndarray, probabilities: np.ndarray, top: int) -> np.ndarray:
    """Indexes of the misclassified rows, most confident (highest predicted probability) first.

    Args:
        labels: True class indexes ``(N,)``.
        probabilities: Class probabilities ``(N, K)``.
        top: At most this many indexes are returned.

    Returns:
        int64 indexes into the rows; ties keep row order.

    """
    probs = np.asarray(probabilities)
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(len(probs)), predicted]
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    order = np.argsort(-confidence[wrong], kind="stable")
    return wrong[order][: max(0, top)].astype(np.int64)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (numpy SVD).

    Signs are fixed so that each component's largest loading is positive, which makes the
    projection deterministic.

    Args:
        features: ``(N, ...)`` array; everything after the first axis is flattened.

    Returns:
        ``(N, 2)`` coordinates and the ``(2,)`` explained-variance ratios (zero-padded when
        there are fewer than two components).

    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    coords = np.zeros((len(x), 2))
    ratio = np.zeros(2)
    if len(x) < 2 or x.shape[1] == 0:
        return coords, ratio
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    coords[:, :k] = centred @ components.T
    variance = singular**2
    if variance.sum() > 0:
        ratio[:k] = variance[:k] / variance.sum()
    return coords, ratio


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """Embed rows in 2-D with scikit-learn's t-SNE (PCA initialisation, fixed seed).

    Args:
        features: ``(N, ...)`` array with N >= 4; flattened after the first axis.
        seed: Random state.

    Returns:
        ``(N, 2)`` coordinates.

    Raises:
        ValueError: Fewer than 4 rows.

    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(x) < 4:
        raise ValueError(f"t-SNE needs at least 4 rows, got {len(x)}")
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    )
    return tsne.fit_transform(x)


def pick_samples(labels: np.ndarray, count: int) -> np.ndarray:
    """Pick ``count`` row indexes, one per class first (in row order), then the next rows.

    Args:
        labels: Class index of each row.
        count: How many rows to pick.

    Returns:
        Sorted int64 indexes, at most ``len(labels)``.

    """
    labels = np.asarray(labels)
    count = max(0, min(count, len(labels)))
    _, first = np.unique(labels, return_index=True)
    picked = list(np.sort(first)[:count])
    for i in range(len(labels)):
        if len(picked) >= count:
            break
        if i not in picked:
            picked.append(i)
    return np.array(sorted(picked), dtype=np.int64)


def class_name(names: Sequence[str], index: Any) -> str:
    """The class name of a label index, or the index itself when the names do not cover it."""
    k = int(index)
    return names[k] if 0 <= k < len(names) else str(k)


def jsonable(value: Any) -> Any:
    """Turn numpy values into plain Python and non-finite floats into None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
