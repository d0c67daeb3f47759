"""Feed benchmark: training fed by Petastorm through tf.data against in-memory tensors.

In: a :class:`~pipelines.config.Config` (Spark session and row-group size for the cached
dataset), a number of generated images and repeats. Out: two
:class:`~pipelines.bench.stats.Measurement` records for the same fixed model, the
steady-state epoch time (target: Petastorm at most 1.1x the in-memory epoch) and the
images/s it implies.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np

from pipelines.bench.data import DATASET_IMAGES, prepared_dataset
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes, epoch_timer, interleaved
from pipelines.config import Config, TrainConfig
from pipelines.tasks import CLASSIFICATION, Task
from pipelines.train.feed import SplitArrays, finish_batches

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger("pipelines.bench")

#: The fixed model and batch size of the feed (and train) benchmarks: the Keras MNIST
#: convnet on 28x28 grey images.
BENCH_MODEL = "mnist_cnn"
BENCH_BATCH_SIZE = 32
BENCH_SEED = 0
#: Target: the Petastorm epoch takes at most this many times the in-memory epoch.
FEED_TARGET_RATIO = 1.1
#: Untimed epochs at the start of every fit (the iterator starts, the shuffle buffer fills).
WARMUP_EPOCHS = 1
#: Steps of the untimed fit that traces each model's train function before any timing.
_TRACE_STEPS = 20


def bench_model_config() -> TrainConfig:
    """The fixed model of the feed and train benchmarks (Keras MNIST convnet, Adam)."""
    return TrainConfig(
        model=BENCH_MODEL, batch_size=BENCH_BATCH_SIZE, seed=BENCH_SEED, warmup_epochs=1
    )


def bench_feed(
    config: Config, *, images: int = DATASET_IMAGES, repeats: int = 3
) -> list[Measurement]:
    """Epoch time of a fixed model fed by Petastorm, against the same model fed from memory.

    On the cached benchmark dataset (``images`` generated JPEGs ingested at 28x28 grey, see
    :func:`~pipelines.bench.data.prepared_dataset`), the Keras MNIST convnet
    (``mnist_cnn``, Adam, batch 32) trains on the training split in this process, one rank:

    - measured ``petastorm -> tf.data``: batches from
      :func:`pipelines.train.feed.make_dataset` (a Petastorm batch reader, one reader
      thread, row-group decode in TensorFlow, shuffle buffer), exactly what training uses;
    - baseline ``in-memory tensors``: the same split read into memory beforehand
      (:func:`~pipelines.train.feed.read_split`) and served by
      :func:`in_memory_dataset` (``from_tensor_slices``, shuffled).

    Each feed has its own model (same seeded initial weights), whose train function is
    traced by a short untimed fit first. A run is then one ``fit`` of
    ``1 + WARMUP_EPOCHS`` epochs of ``ceil(train rows / 32)`` steps on a fresh iterator; only
    the last epoch is timed (the steady state: the reader running, the shuffle buffer full),
    by a Keras callback from the start to the end of the epoch. Runs alternate between the
    two feeds ``repeats`` times; the medians are reported. Images/s is
    ``steps * 32 / epoch seconds``.

    Args:
        config: Spark session and ``ingest.rows_per_row_group`` for the cached dataset.
        images: Number of generated source images (about 80 % land in the training split).
        repeats: Measured epochs of each feed.

    Returns:
        Two measurements: epoch seconds (target ``<= 1.1``), and images/s (informative).

    Raises:
        UserError: ``images`` or ``repeats`` is below 1, or no training rows.
    """
    check_sizes("feed", images, repeats)
    data = prepared_dataset(config, images)

    from pipelines.keras_api import keras
    from pipelines.models import build_model
    from pipelines.train.feed import make_dataset, read_split, steps_per_epoch

    url = data.split("train")
    shape = data.image_shape
    arrays = read_split(url, shape)
    cfg = bench_model_config()
    batch = cfg.batch_size
    steps = steps_per_epoch(len(arrays), 1, batch)
    feeds = {
        "petastorm": make_dataset(url, image_shape=shape, batch_size=batch, seed=cfg.seed),
        "memory": in_memory_dataset(arrays, batch_size=batch, seed=cfg.seed),
    }
    models = {name: build_model(cfg, shape, len(data.label_names)) for name in feeds}

    def run(name: str) -> float:
        timer = epoch_timer()
        models[name].fit(
            feeds[name],
            epochs=WARMUP_EPOCHS + 1,
            steps_per_epoch=steps,
            callbacks=[timer],
            verbose=0,
        )
        return timer.seconds[-1]

    try:
        log.info("bench feed: tracing the models (%d rows, %d steps/epoch)", len(arrays), steps)
        for name, model in models.items():
            model.fit(feeds[name], epochs=1, steps_per_epoch=min(steps, _TRACE_STEPS), verbose=0)
        seconds = interleaved(
            "feed", {name: functools.partial(run, name) for name in feeds}, repeats
        )
    finally:
        models.clear()
        feeds.clear()  # the readers stop with their iterators
        keras().backend.clear_session()

    details = {
        "images": images,
        "repeats": repeats,
        **data.describe(),
        "train_rows": len(arrays),
        "model": cfg.model,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "warmup_epochs_per_run": WARMUP_EPOCHS,
        "reader": "make_batch_reader, thread pool, 1 worker, row-group decode in TF",
        "measures": "wall seconds of one steady-state epoch per run (after warm-up epochs)",
    }
    rates = {name: [steps * batch / s for s in runs] for name, runs in seconds.items()}
    return [
        pair(
            "feed",
            "petastorm -> tf.data epoch",
            seconds["petastorm"],
            "in-memory tensors epoch",
            seconds["memory"],
            unit="s/epoch",
            target=f"<= {FEED_TARGET_RATIO}",
            details=details,
        ),
        pair(
            "feed",
            "petastorm -> tf.data",
            rates["petastorm"],
            "in-memory tensors",
            rates["memory"],
            unit="images/s",
            details=details,
        ),
    ]


def in_memory_dataset(
    arrays: SplitArrays,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    task: Task = CLASSIFICATION,
) -> tf.data.Dataset:
    """The batches of :func:`~pipelines.train.feed.make_dataset`, served from arrays in memory.

    The baseline of the feed benchmark: what the feed would cost if the split sat in memory.
    With ``shuffle`` every pass is a fresh permutation of all images.

    Args:
        arrays: A split read by :func:`read_split`.
        batch_size: Images per batch; every batch is full (batches run across passes).
        shuffle: Shuffle the images, anew on every pass.
        seed: Seed of the shuffle.
        task: What the model learns (see :func:`~pipelines.train.feed.make_dataset`).

    Returns:
        An infinite ``tf.data.Dataset`` of ``(float32 (B, H, W, C) in [0, 1], int32 (B,))``.

    Raises:
        ValueError: The split is empty or the batch size is below 1.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(arrays.images) == 0:
        raise ValueError("in_memory_dataset: the split is empty")
    data = tf.data.Dataset.from_tensor_slices(
        (arrays.images, np.asarray(arrays.labels, dtype=np.int32))
    )
    if shuffle:
        data = data.shuffle(len(arrays.images), seed=seed, reshuffle_each_iteration=True)
    return finish_batches(data.repeat(), batch_size, False, 0, seed, task)
