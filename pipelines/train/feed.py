"""The training feed: a prepared split to ``tf.data`` batches, sharded per Horovod rank.

In: the location of one split of a prepared dataset (``<dataset>/split=<name>``, a local
path or a URL Petastorm reads, e.g. ``file:///...``, ``hdfs://...``) and the image shape the
dataset was ingested at (``image_shape`` in ``_manifest.json``).
Out:

- :func:`make_dataset`: an infinite ``tf.data.Dataset`` of ``(images, labels)`` batches, float32
  images in [0, 1] of shape ``(B, H, W, C)`` and int32 labels ``(B,)`` (``(images, images)``
  when the task learns no labels), read by Petastorm from one shard of the split's row groups;
- :func:`iter_split`: a split one row group at a time, for streaming evaluation;
- :func:`read_split`: a whole split in memory (:class:`SplitArrays`), sorted by path, for
  tests and benchmarks;
- :func:`steps_per_epoch`: the step count every rank must run.

How the feed reads (ARCHITECTURE.md, "Why the stack is pinned"): images are stored with
Petastorm's ``NdarrayCodec``, so ``make_batch_reader`` hands back the ``np.save`` bytes of each
image. Every cell of a split has the same fixed 128-byte ``.npy`` header, so a whole row group
is decoded at once in TensorFlow by slicing the pixels out of the bytes
(``tf.strings.substr`` + ``tf.io.decode_raw``), with no per-row Python. Decoding row groups
before ``unbatch`` gave 1.4-2x the throughput of decoding single images after it. A dataset
stored as PNG or JPEG (``ingest.storage``) is decoded per row group too, by
:func:`pipelines.schema.decode_cells` on ``tf.data``'s parallel map threads.

Training reads never end (``num_epochs=None``): Horovod hangs unless every rank runs exactly
the same number of steps, so ranks bound their epochs with :func:`steps_per_epoch` instead of
reading to the end of their (possibly uneven) shard. That also sidesteps a Petastorm race at
the end of finite thread-pool reads, which sometimes returns no rows at all; finite reads
(:func:`read_split`) therefore use the single-threaded ``dummy`` pool.

TensorFlow is imported inside the functions that need it; importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import schema
from pipelines.errors import UserError
from pipelines.store import DatasetDir, local_path, to_url
from pipelines.tasks import CLASSIFICATION, Task
from pipelines.train.streams import GENERATOR_WORK, RowGroupStream, close_readers_at_exit, closing

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

#: Row groups a reader keeps decoded ahead of training. Petastorm's default (50) would hold
#: 50 x 128 images per reader, a lot for large images; a few keep the pipeline busy.
_RESULTS_QUEUE_ROW_GROUPS = 8


class SplitNotFoundError(UserError, FileNotFoundError):
    """The split directory does not exist (the split may be empty and was not written)."""


class ImageShapeError(UserError, ValueError):
    """The stored images do not have the shape the caller expects."""


@dataclass(frozen=True, eq=False)
class SplitArrays:
    """A whole split in memory, sorted by path (compared by identity: it holds arrays).

    Attributes:
        images: uint8 pixels, shape ``(N, H, W, C)``.
        labels: int32 class indexes, shape ``(N,)``.
        paths: Source path of each image, ascending.
        label_names: Class name of each label index (from the dataset's manifest).
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def steps_per_epoch(rows: int, shard_count: int, batch_size: int) -> int:
    """Steps each rank runs per epoch so that all ranks together see about one pass.

    Every rank must run exactly this many steps (Horovod hangs otherwise), whatever the size of
    its own shard; the infinite datasets of :func:`make_dataset` make that possible.

    Args:
        rows: Rows in the split.
        shard_count: Number of ranks reading it.
        batch_size: Batch size per rank.

    Returns:
        ``max(1, ceil(rows / (shard_count * batch_size)))``.

    Raises:
        ValueError: A negative row count, or a shard count or batch size below 1.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if shard_count < 1 or batch_size < 1:
        raise ValueError(
            f"shard_count and batch_size must be >= 1, got {shard_count} and {batch_size}"
        )
    return max(1, math.ceil(rows / (shard_count * batch_size)))


@dataclass(frozen=True)
class Augmentation:
    """Random changes to each training image, new every epoch, the same for the same seed.

    Shift and rotation are Keras layers; the photo changes (crop, flip, brightness,
    contrast) are :func:`pipelines.train.augment.photo_changes`, applied before them.

    Attributes:
        shift: Largest translation, as a fraction of height and width (0: none).
        rotation_deg: Largest rotation either way, in degrees (0: none).
        flip: Mirror half of the images left to right.
        crop_scale: Smallest area fraction of a random resized crop (1: none).
        brightness: Largest brightness offset either way, on the [0, 1] scale (0: none).
        contrast: Largest contrast factor offset either way (0: none).
    """

    shift: float = 0.0
    rotation_deg: float = 0.0
    flip: bool = False
    crop_scale: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0

    @property
    def active(self) -> bool:
        """Whether it changes anything."""
        photo = self.flip or self.crop_scale < 1 or self.brightness > 0 or self.contrast > 0
        return self.shift > 0 or self.rotation_deg > 0 or photo


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
    shuffle_buffer: int = 2048,
    reader_workers: int = 1,
    augment: Augmentation | None = None,
) -> tf.data.Dataset:
    """An infinite dataset of training batches read by Petastorm from one shard of a split.

    Petastorm shards by row group: this rank reads the row groups whose index is
    ``cur_shard`` modulo ``shard_count``, so the ranks' shards are disjoint and together cover
    the split. A split with fewer row groups than ``shard_count`` cannot be sharded; then every
    rank reads the whole split (correct, since metrics are averaged across ranks, just less
    efficient) and a warning is logged. The first row group is read here, so a wrong
    ``image_shape`` or a missing split fails at once rather than inside ``fit``.

    Each iterator of the returned dataset starts its own reader: a daemon thread that pulls row
    groups from a Petastorm thread-pool reader (``reader_workers`` more daemon threads) into a
    small queue. The reader stops when the iterator is destroyed (Keras destroys its iterators
    when ``fit``/``evaluate`` return) and, at the latest, when the process exits.

    Args:
        url: The split, e.g. ``DatasetDir(root).split("train")``; a path or a URL.
        image_shape: ``(height, width, channels)`` the dataset was ingested at.
        batch_size: Images per batch; every batch is full.
        cur_shard: This rank (``hvd.rank()``).
        shard_count: Number of ranks (``hvd.size()``).
        shuffle: Shuffle the row-group order and, through a buffer, the images. Without it the
            order is the stored one (sorted by path within each row group) and every new
            iterator starts from the beginning, so evaluation sees the same rows each time.
        seed: Seed of both shuffles. Petastorm takes ``0`` as "unseeded": the row-group order
            is then random, the image shuffle still seeded.
        task: What the model learns: its :meth:`~pipelines.tasks.Task.targets` pair the
            images with their labels, or with themselves (reconstruction).
        shuffle_buffer: Images in the shuffle buffer.
        reader_workers: Petastorm reader threads; one keeps up with training on two cores.
        augment: Random shifts and rotations of the scaled images (training only; the
            target of a reconstruction is the augmented image too). None or inactive: none.

    Returns:
        A ``tf.data.Dataset`` of ``(float32 (B, H, W, C) in [0, 1], int32 (B,))`` batches
        that never ends; bound it with ``steps_per_epoch``.

    Raises:
        SplitNotFoundError: The split does not exist.
        ImageShapeError: The stored images are not ``image_shape`` uint8 arrays.
        ValueError: A bad shape, batch size, shard or buffer size.
    """
    import tensorflow as tf

    shape = check_image_shape(image_shape)
    if batch_size < 1 or shuffle_buffer < 1 or reader_workers < 1:
        raise ValueError(
            "batch_size, shuffle_buffer and reader_workers must be >= 1, got "
            f"{batch_size}, {shuffle_buffer} and {reader_workers}"
        )
    if not 0 <= cur_shard < shard_count:
        raise ValueError(f"cur_shard must be in [0, {shard_count}), got {cur_shard}")
    url = to_url(url)
    _require_split(url)
    shard, storage = _usable_shard(url, shape, cur_shard, shard_count, seed)
    reader_args = {
        "num_epochs": None,
        "schema_fields": [schema.IMAGE, schema.LABEL],
        "shuffle_row_groups": shuffle,
        "seed": seed,
        "reader_pool_type": "thread",
        "workers_count": reader_workers,
        "results_queue_size": _RESULTS_QUEUE_ROW_GROUPS,
        **shard,
    }

    close_readers_at_exit()

    def row_groups() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Runs on tf.data threads. Every stretch of work is inside GENERATOR_WORK so that the
        # exit hook can wait until no tf.data thread is inside this generator (streams.py).
        with GENERATOR_WORK:
            if closing():
                return
            stream = RowGroupStream(url, reader_args)
        try:
            while True:
                with GENERATOR_WORK:
                    item = stream.get()
                    if item is None:  # the process is exiting
                        return
                    cells, labels = item
                    if len(cells):
                        _check_cell(cells[0], url, shape)
                yield cells, labels
        finally:
            stream.close()

    pixels = int(np.prod(shape))

    def decode(cells: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if storage == "raw":
            # One op per row group: drop each cell's .npy header, reinterpret the rest.
            raw = tf.io.decode_raw(
                tf.strings.substr(cells, schema.NPY_HEADER_BYTES, pixels), tf.uint8
            )
        else:
            # PNG/JPEG: the contract's own batch decoder, on tf.data's parallel map threads
            # (Pillow releases the GIL while it decodes).
            raw = tf.numpy_function(
                lambda batch: schema.decode_cells(list(batch), shape), [cells], tf.uint8
            )
        return tf.reshape(raw, (-1, *shape)), labels

    data = tf.data.Dataset.from_generator(
        row_groups,
        output_signature=(
            tf.TensorSpec(shape=(None,), dtype=tf.string),
            tf.TensorSpec(shape=(None,), dtype=tf.int32),
        ),
    )
    # The reader never ends; repeat() declares the dataset infinite to tf.data and Keras (and
    # ends it at exit, when the generator returns at once).
    data = data.repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return finish_batches(data, batch_size, shuffle, shuffle_buffer, seed, task, augment)


def iter_split(
    url: str, image_shape: tuple[int, int, int]
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """A split's rows one row group at a time, in stored order: memory of one row group.

    Uses Petastorm's single-threaded ``dummy`` pool, as :func:`read_split` does.

    Args:
        url: The split, e.g. ``DatasetDir(root).split("test")``; a path or a URL.
        image_shape: ``(height, width, channels)`` the dataset was ingested at.

    Yields:
        ``(images, labels, paths)``: uint8 ``(N, H, W, C)``, int32 ``(N,)``, N paths.

    Raises:
        SplitNotFoundError: The split does not exist.
        ImageShapeError: The stored images are not ``image_shape`` uint8 arrays.
    """
    if _keras_stack():
        from pipelines.train import numpy_feed

        yield from numpy_feed.iter_split(url, image_shape)
        return
    from petastorm import make_batch_reader

    shape = check_image_shape(image_shape)
    url = to_url(url)
    _require_split(url)
    _quiet_petastorm()
    reader = make_batch_reader(
        url,
        num_epochs=1,
        schema_fields=[schema.IMAGE, schema.LABEL, schema.PATH],
        shuffle_row_groups=False,
        reader_pool_type="dummy",
    )
    try:
        for batch in reader:
            images = _decode_cells(batch.image, url, shape)
            yield images, batch.label.astype(np.int32), [str(p) for p in batch.path]
    finally:
        reader.stop()
        reader.join()


def read_split(url: str, image_shape: tuple[int, int, int]) -> SplitArrays:
    """Read a whole split into memory, sorted by path.

    Uses Petastorm's single-threaded ``dummy`` pool: finite reads with the thread pool
    sometimes return no rows (a race at the end of the read).

    Args:
        url: The split, e.g. ``DatasetDir(root).split("test")``; a path or a URL.
        image_shape: ``(height, width, channels)`` the dataset was ingested at.

    Returns:
        Every image, label and path of the split, and the dataset's label names (from
        ``_manifest.json`` next to the split; from the rows when there is none).

    Raises:
        SplitNotFoundError: The split does not exist.
        ImageShapeError: The stored images are not ``image_shape`` uint8 arrays.
    """
    if _keras_stack():
        from pipelines.train import numpy_feed

        return numpy_feed.read_split(url, image_shape)
    from petastorm import make_batch_reader

    shape = check_image_shape(image_shape)
    url = to_url(url)
    _require_split(url)
    _quiet_petastorm()
    cells: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[np.ndarray] = []
    paths: list[np.ndarray] = []
    reader = make_batch_reader(
        url,
        num_epochs=1,
        schema_fields=[schema.IMAGE, schema.LABEL, schema.LABEL_NAME, schema.PATH],
        shuffle_row_groups=False,
        reader_pool_type="dummy",
    )
    try:
        for batch in reader:
            cells.append(batch.image)
            labels.append(batch.label)
            names.append(batch.label_name)
            paths.append(batch.path)
    finally:
        reader.stop()
        reader.join()

    all_paths = np.concatenate(paths) if paths else np.array([], dtype=object)
    order = np.argsort(all_paths, kind="stable")
    all_labels = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)
    images = _decode_cells(np.concatenate(cells) if cells else [], url, shape)
    label_names = manifest_label_names(url)
    if label_names is None:
        all_names = np.concatenate(names) if names else []
        by_label = dict(zip(all_labels.tolist(), (str(n) for n in all_names), strict=True))
        label_names = [by_label.get(i, str(i)) for i in range(max(by_label, default=-1) + 1)]
    return SplitArrays(
        images=images[order],
        labels=all_labels[order],
        paths=[str(p) for p in all_paths[order]],
        label_names=label_names,
    )


# --- helpers ---------------------------------------------------------------------------------


def finish_batches(
    data: tf.data.Dataset,
    batch_size: int,
    shuffle: bool,
    shuffle_buffer: int,
    seed: int,
    task: Task,
    augment: Augmentation | None = None,
) -> tf.data.Dataset:
    """Shuffle single images, batch, scale to [0, 1], augment and prefetch.

    The end of every feed: the training feed's and the feed benchmark's in-memory baseline.
    """
    import tensorflow as tf

    if shuffle:
        data = data.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size, drop_remainder=True)
    changes = _augmenter(augment, seed) if augment and augment.active else None

    def scale(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Exactly pipelines.images.normalise: float32 x / 255 (a division, not * (1/255)).
        x = tf.cast(images, tf.float32) / tf.constant(255.0, tf.float32)
        return task.targets(x, labels)

    def change(x: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = changes(x)
        return task.targets(x, target)

    data = data.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
    if changes is not None:
        # Not parallel: the random layers draw from one generator, and calls racing for it
        # would make a seeded run's images differ from one run to the next.
        data = data.map(change)
    data = data.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Batch order stays reproducible for a seed (parallel maps keep their input order).
    options.deterministic = True
    # Sharding is Petastorm's job (one shard per rank); a tf.distribute strategy must not
    # shard the batches again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return data.with_options(options)


def _augmenter(augment: Augmentation, seed: int) -> Any:
    """The batch function of ``augment``: photo changes, then Keras' shift and rotation.

    Shift and rotation are Keras' random translation and rotation layers, filling uncovered
    pixels with 0.
    """
    from pipelines.keras_api import is_keras3, keras
    from pipelines.train.augment import photo_changes

    photo_keys = augment.flip or augment.crop_scale < 1 or augment.brightness or augment.contrast
    if photo_keys and is_keras3():
        # The photo changes are TensorFlow ops; the Keras 3 stack has no TensorFlow.
        raise UserError(
            "train.augment_flip, augment_crop_scale, augment_brightness and augment_contrast "
            "run on the default (TensorFlow) stack only; turn them off on the Keras 3 stack"
        )
    photo = photo_changes(
        flip=augment.flip,
        crop_scale=augment.crop_scale,
        brightness=augment.brightness,
        contrast=augment.contrast,
        seed=seed,
    )
    layers = keras().layers
    steps = []
    if augment.shift > 0:
        steps.append(
            layers.RandomTranslation(augment.shift, augment.shift, fill_mode="constant", seed=seed)
        )
    if augment.rotation_deg > 0:
        steps.append(
            layers.RandomRotation(augment.rotation_deg / 360, fill_mode="constant", seed=seed)
        )
    geometric = keras().Sequential(steps, name="augment") if steps else None

    def changes(images: Any, training: bool = True) -> Any:
        if photo is not None:
            images = photo(images)
        return geometric(images, training=True) if geometric is not None else images

    return changes


def _keras_stack() -> bool:
    """The Keras stack has no Petastorm: its plain-pyarrow reader reads the same files."""
    from pipelines.keras_api import is_keras3

    return is_keras3()


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate ``(height, width, channels)`` and return it as a tuple of ints."""
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"image_shape must be (height, width, channels) > 0, got {tuple(image_shape)}"
        )
    return shape  # type: ignore[return-value]


def _require_split(url: str) -> None:
    """Fail with the path when a local split directory is missing."""
    path = local_path(url)
    if path is not None and not os.path.isdir(path):
        raise SplitNotFoundError(
            f"split not found: {path} (an empty split is not written; check the dataset "
            "path and run ingest first)"
        )


def _usable_shard(
    url: str, shape: tuple[int, int, int], cur_shard: int, shard_count: int, seed: int
) -> tuple[dict[str, Any], str]:
    """Reader arguments for this shard (none when the split has too few row groups).

    Opens the shard with the single-threaded pool and checks the first row group's images,
    so that bad input fails here and not inside a ``tf.data`` iterator.

    Returns:
        The reader arguments, and the cells' storage (``raw``, ``png`` or ``jpeg``).
    """
    from petastorm import NoDataAvailableError, make_batch_reader

    _quiet_petastorm()
    shard: dict[str, Any] = {"cur_shard": cur_shard, "shard_count": shard_count}
    if shard_count == 1:
        shard = {}
    fields = [schema.IMAGE]
    try:
        reader = make_batch_reader(
            url, num_epochs=1, schema_fields=fields, reader_pool_type="dummy", seed=seed, **shard
        )
    except NoDataAvailableError:
        log.warning(
            "feed: %s has fewer row groups than the %d ranks; every rank reads the whole "
            "split (re-ingest with a smaller ingest.rows_per_row_group to shard it)",
            url,
            shard_count,
        )
        shard = {}
        reader = make_batch_reader(
            url, num_epochs=1, schema_fields=fields, reader_pool_type="dummy", seed=seed
        )
    try:
        first = next(iter(reader), None)
    finally:
        reader.stop()
        reader.join()
    storage = schema.DEFAULT_STORAGE
    if first is not None and len(first.image):
        _check_cell(first.image[0], url, shape)
        storage = schema.cell_storage(first.image[0]) or storage
    return shard, storage


def _check_cell(cell: bytes, url: str, shape: tuple[int, int, int]) -> None:
    """Check that one encoded image is a uint8 image of ``shape`` (raw, PNG or JPEG)."""
    if not schema.cell_matches(cell, shape):
        raise ImageShapeError(_shape_message(cell, url, shape))


def _shape_message(cell: bytes, url: str, shape: tuple[int, int, int]) -> str:
    stored = schema.stored_array(cell)
    found = (
        f"{stored[1]} images of shape {stored[0]}"
        if stored
        else f"cells of {len(cell)} bytes that are not .npy arrays, PNG or JPEG"
    )
    return (
        f"{url} holds {found}, expected uint8 images of shape {shape}; re-ingest at the "
        "image size and channels "
        "the training config uses, or train with the dataset's image_shape from _manifest.json"
    )


def _decode_cells(cells: Sequence[bytes], url: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode many cells of one uint8 shape into one ``(N, *shape)`` array."""
    try:
        return schema.decode_cells(cells, shape)
    except schema.CellError as exc:
        raise ImageShapeError(_shape_message(exc.cell, url, shape)) from None


def manifest_label_names(url: str) -> list[str] | None:
    """Label names from the manifest of the split's dataset, None when it cannot be read."""
    try:
        return DatasetDir.of_split(url).read_manifest().label_names
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _quiet_petastorm() -> None:
    """Silence Petastorm's warnings about its own (known, harmless) use of old pyarrow APIs.

    Process-wide and narrow (``warnings.catch_warnings`` is not thread-safe, and Petastorm
    warns from its reader threads too); re-installed on every read, in case a caller's
    ``catch_warnings`` block reset the filters (``filterwarnings`` never adds duplicates).
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    # make_batch_reader over a Petastorm dataset is deliberate: it gives the raw cells.
    warnings.filterwarnings("ignore", message=r"Please use make_reader", category=UserWarning)
    # "label" also matches "label_name" as a prefix in old Petastorm; names here are exact.
    warnings.filterwarnings(
        "ignore", message=r"schema_fields behavior has changed", category=UserWarning
    )
