"""The Task: streaming evaluation equal to the whole split's, a bounded sample, its columns."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipelines import schema
from pipelines.images import normalise
from pipelines.report.numeric import confusion_matrix
from pipelines.tasks import (
    CLASSIFICATION,
    RECONSTRUCTION,
    TASKS,
    macro_f1,
    task_for_model,
    task_named,
    task_of_record,
)
from pipelines.train.feed import SplitArrays

NAMES = ["a", "b", "c"]


def _split(n: int, seed: int = 0) -> tuple[SplitArrays, np.ndarray]:
    """``n`` random images with labels, and made-up class probabilities (some wrong)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 4, 4, 1)).astype(np.uint8)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    paths = [f"/d/{i:05d}.png" for i in range(n)]
    return SplitArrays(images, labels, paths, NAMES), probabilities.astype(np.float32)


def _stream(task, arrays: SplitArrays, outputs: np.ndarray, batch: int, limit: int):
    evaluator = task.evaluator(NAMES, limit=limit, seed=3)
    for start in range(0, len(arrays), batch):
        part = slice(start, start + batch)
        evaluator.update(
            arrays.images[part], arrays.labels[part], arrays.paths[part], outputs[part]
        )
    return evaluator.result()


def test_streamed_classification_metrics_are_the_whole_splits() -> None:
    arrays, outputs = _split(1000)
    result = _stream(CLASSIFICATION, arrays, outputs, batch=64, limit=50)
    predicted = outputs.argmax(axis=1)
    picked = outputs[np.arange(1000), arrays.labels]
    assert result.rows == 1000 and result.metrics["test_rows"] == 1000.0
    assert result.metrics["test_accuracy"] == pytest.approx(np.mean(predicted == arrays.labels))
    assert result.metrics["test_loss"] == pytest.approx(np.mean(-np.log(picked)), rel=1e-6)
    expected = confusion_matrix(arrays.labels, predicted, 3)
    np.testing.assert_array_equal(result.summary["confusion_matrix"], expected)
    assert result.summary["errors"] == int(np.sum(predicted != arrays.labels))


def test_streamed_macro_f1_is_scikit_learns_over_the_classes_seen() -> None:
    from sklearn.metrics import f1_score

    arrays, outputs = _split(1000)
    result = _stream(CLASSIFICATION, arrays, outputs, batch=64, limit=50)
    predicted = outputs.argmax(axis=1)
    expected = f1_score(arrays.labels, predicted, average="macro")
    assert result.metrics["test_macro_f1"] == pytest.approx(expected)
    # A class with no test rows that is never predicted is no class of the mean (as sklearn).
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    labels, guesses = [0] * 6 + [1] * 5, [0] * 5 + [1] + [0] * 2 + [1] * 3
    assert macro_f1(confusion) == pytest.approx(f1_score(labels, guesses, average="macro"))
    assert macro_f1(np.zeros((3, 3))) == 0.0


def test_the_promotion_metric_follows_registry_metric_except_for_reconstruction() -> None:
    assert CLASSIFICATION.promotion_metric("accuracy") == ("test_accuracy", True)
    assert CLASSIFICATION.promotion_metric("macro_f1") == ("test_macro_f1", True)
    assert CLASSIFICATION.promotion_metric("log_loss") == ("test_loss", False)
    for name in ("accuracy", "macro_f1", "log_loss"):
        assert RECONSTRUCTION.promotion_metric(name) == ("test_reconstruction_error", False)


def test_the_sample_is_bounded_holds_the_most_confident_mistakes_and_is_reproducible() -> None:
    arrays, outputs = _split(1000)
    result = _stream(CLASSIFICATION, arrays, outputs, batch=64, limit=50)
    assert len(result.sample) == 50 and result.sampled
    assert result.sample.paths == sorted(result.sample.paths)
    predicted = outputs.argmax(axis=1)
    confidence = outputs.max(axis=1)
    wrong = np.flatnonzero(predicted != arrays.labels)
    most_confident = {arrays.paths[i] for i in wrong[np.argsort(-confidence[wrong])][:50]}
    assert set(result.sample.paths) == most_confident  # more mistakes than room: mistakes only
    index = {path: i for i, path in enumerate(arrays.paths)}
    rows = [index[p] for p in result.sample.paths]
    np.testing.assert_array_equal(result.sample.images, arrays.images[rows])
    np.testing.assert_array_equal(result.outputs, outputs[rows])
    again = _stream(CLASSIFICATION, arrays, outputs, batch=100, limit=50)
    assert again.sample.paths == result.sample.paths


def test_a_small_split_is_kept_whole_mistakes_and_all() -> None:
    arrays, outputs = _split(120)
    result = _stream(CLASSIFICATION, arrays, outputs, batch=7, limit=2000)
    assert not result.sampled and result.sample.paths == arrays.paths
    with_room = _stream(CLASSIFICATION, arrays, outputs, batch=7, limit=100)
    wrong = {arrays.paths[i] for i in np.flatnonzero(outputs.argmax(1) != arrays.labels)}
    assert len(with_room.sample) == 100 and wrong <= set(with_room.sample.paths)


def test_evaluate_keeps_an_in_memory_split_whole_in_its_order() -> None:
    arrays, outputs = _split(30)
    order = np.argsort([-i for i in range(30)])
    reversed_ = SplitArrays(
        arrays.images[order], arrays.labels[order], [arrays.paths[i] for i in order], NAMES
    )
    result = CLASSIFICATION.evaluate(reversed_, outputs[order])
    assert result.sample.paths == reversed_.paths
    np.testing.assert_array_equal(result.outputs, outputs[order])


def test_streamed_reconstruction_error_is_the_mean_over_all_pixels() -> None:
    arrays, _ = _split(300)
    x = normalise(arrays.images)
    reconstructions = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)
    result = _stream(RECONSTRUCTION, arrays, reconstructions.astype(np.float32), 32, limit=40)
    expected = float(np.mean(np.abs(reconstructions - x)))
    assert result.metrics["test_reconstruction_error"] == pytest.approx(expected, rel=1e-5)
    assert len(result.sample) == 40 and result.summary == {}


def test_output_values_fill_the_tasks_columns() -> None:
    arrays, outputs = _split(4)
    values = CLASSIFICATION.output_values(outputs, normalise(arrays.images), NAMES)
    assert set(values) | {"error"} == set(CLASSIFICATION.output_columns)
    assert values["predicted_label"] == [NAMES[k] for k in outputs.argmax(axis=1)]
    assert values["probability"] == pytest.approx(outputs.max(axis=1).tolist())
    x = normalise(arrays.images)
    errors = RECONSTRUCTION.output_values(x * 0.5, x, NAMES)[schema.RECONSTRUCTION_ERROR]
    assert errors == pytest.approx((x * 0.5).reshape(4, -1).mean(axis=1).tolist())


def test_every_tasks_columns_are_in_the_scoring_table() -> None:
    for task in TASKS.values():
        assert set(task.output_columns) <= set(schema.SCORED_ROW)
        for name, kind in task.output_columns.items():
            assert schema.SCORED_ROW[name] == kind
    assert set(schema.SCORED_ROW) == {schema.PATH}.union(
        *(task.output_columns for task in TASKS.values())
    )


def test_tasks_are_one_object_each_across_a_pickle_and_by_every_name() -> None:
    assert pickle.loads(pickle.dumps(RECONSTRUCTION)) is RECONSTRUCTION
    assert task_named("classification") is CLASSIFICATION
    assert task_for_model("autoencoder") is RECONSTRUCTION
    assert task_for_model("mnist_cnn") is CLASSIFICATION
    assert CLASSIFICATION.test_metric == "test_accuracy" and CLASSIFICATION.higher_is_better
    assert RECONSTRUCTION.test_metric == "test_reconstruction_error"
    assert not RECONSTRUCTION.higher_is_better
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        task_named("regression")


def test_records_written_before_tasks_existed_still_name_their_task() -> None:
    assert task_of_record({"task": "reconstruction"}) is RECONSTRUCTION
    assert task_of_record({"autoencoder": True}) is RECONSTRUCTION
    assert task_of_record({"autoencoder": False}) is CLASSIFICATION
    assert task_of_record({}) is CLASSIFICATION
