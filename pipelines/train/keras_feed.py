"""The Keras stack's training feed with the pinned stack's signature (``feed.make_dataset``).

In: what :func:`pipelines.train.feed.make_dataset` takes. Out: a ``keras.utils.PyDataset``
of full batches (:func:`~pipelines.train.numpy_feed.keras_dataset` over
:func:`~pipelines.train.numpy_feed.make_feed`: plain pyarrow, the same row-group shards as
Petastorm's), with the task's targets and, for training, the same random shifts and
rotations as the pinned stack (Keras' own layers, seeded), so the worker calls one function
on either stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np

from pipelines.tasks import CLASSIFICATION, Task
from pipelines.train.feed import Augmentation, _augmenter
from pipelines.train.numpy_feed import BatchFeed, keras_dataset, make_feed


def make_dataset(
    url: str,
    *,
    image_shape: tuple[int, int, int],
    batch_size: int,
    cur_shard: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    task: Task = CLASSIFICATION,
    augment: Augmentation | None = None,
) -> Any:
    """An endless ``PyDataset`` of ``(float32 images, targets)`` batches of one shard.

    See :func:`pipelines.train.feed.make_dataset` for the arguments; the split is opened
    (and its first row group read) at the first batch.
    """
    start = partial(
        make_feed,
        url,
        image_shape=image_shape,
        batch_size=batch_size,
        cur_shard=cur_shard,
        shard_count=shard_count,
        shuffle=shuffle,
        seed=seed,
    )
    changes = _augmenter(augment, seed) if augment and augment.active else None
    # Fail now, as the pinned stack does, not inside fit: a missing split or a wrong shape.
    start(prefetch_batches=1).close()
    return keras_dataset(lambda: _Targets(start(), task, changes))


class _Targets:
    """A feed's batches, augmented (training) and paired with the task's targets."""

    def __init__(self, feed: BatchFeed, task: Task, changes: Any) -> None:
        self.feed, self.task, self.changes = feed, task, changes

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = next(self.feed)
        if self.changes is not None:
            images = np.asarray(self.changes(images, training=True))
        return self.task.targets(images, labels)

    def close(self) -> None:
        self.feed.close()
