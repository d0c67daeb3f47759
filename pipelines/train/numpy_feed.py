"""The Keras stack's training feed: a prepared split to numpy batches, sharded per rank.

In: the location of one split (``DatasetDir(root).split(name)``, a path or a URL) and
the image shape it was ingested at. Out:

- :func:`make_feed`: a :class:`BatchFeed`, an endless iterator of full batches
  ``(float32 images in [0, 1] (B, H, W, C), int32 labels (B,))`` (``(images, images)`` for an
  autoencoder) read with :mod:`~pipelines.train.arrow_reader` from this rank's row groups;
- :func:`keras_dataset`: the same as a ``keras.utils.PyDataset`` that starts a new feed at
  batch 0, so that every evaluation of an unshuffled split sees the same rows (what to give
  ``fit``/``evaluate``: Keras 3 takes a PyDataset or a generator, not any iterator);
- :func:`read_split`: a whole split in memory (:class:`~pipelines.train.feed.SplitArrays`),
  sorted by path, for evaluation and reports;
- :func:`steps_per_epoch`: the step count every rank must run (the pinned stack's own).

It is the numpy twin of :mod:`pipelines.train.feed` (which feeds ``tf.data`` from Petastorm),
with the same contract: the same shard per rank, reads that never end so that every rank runs
exactly :func:`steps_per_epoch` steps whatever the size of its shard, a seeded shuffle of the
row-group order (new every pass) and of the images (through a buffer), images scaled exactly as
``pipelines.images.normalise`` does (``float32 x / 255``), and the whole split read by every
rank, with a warning, when it has fewer row groups than ranks.

Memory stays bounded: one background thread reads and decodes one row group at a time into
the shuffle buffer (``shuffle_buffer`` images plus one row group) and keeps at most
``prefetch_batches`` finished batches ahead of training. The thread stops when the feed is
closed (:meth:`BatchFeed.close`, or leaving its ``with`` block), when the feed is garbage
collected, and, being a daemon, at exit; it never blocks for longer than a queue wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipelines import schema
from pipelines.store import filesystem
from pipelines.train.arrow_reader import (
    SplitReader,
    TooFewRowGroupsError,
    list_pieces,
)
from pipelines.train.feed import SplitArrays, manifest_label_names, steps_per_epoch

__all__ = [
    "BatchFeed",
    "iter_split",
    "keras_dataset",
    "make_feed",
    "read_split",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

#: Seconds between checks for a stop request while waiting on the batch queue.
_POLL_S = 0.05

#: How long :meth:`BatchFeed.close` waits for the reader thread to end.
_JOIN_TIMEOUT_S = 10.0


def make_feed(
    url: str,
    *,
    image_shape: Sequence[int],
    batch_size: int,
    cur_shard: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    autoencoder: bool = False,
    shuffle_buffer: int = 2048,
    prefetch_batches: int = 2,
) -> BatchFeed:
    """An endless feed of training batches from one shard of a split.

    The split is opened and its first row group read here, so a missing split or a wrong
    ``image_shape`` fails at once rather than inside ``fit``.

    Args:
        url: The split, e.g. ``DatasetDir(root).split("train")``; a path or a URL.
        image_shape: ``(height, width, channels)`` the dataset was ingested at.
        batch_size: Images per batch; every batch is full.
        cur_shard: This rank.
        shard_count: The number of ranks.
        shuffle: Shuffle the row-group order every pass and the images through a buffer.
            Without it the order is the stored one, the same for every new feed.
        seed: Seed of both shuffles.
        autoencoder: Yield ``(images, images)`` instead of ``(images, labels)``.
        shuffle_buffer: Images in the shuffle buffer.
        prefetch_batches: Finished batches kept ready ahead of training.

    Returns:
        A started :class:`BatchFeed`; close it (or use it in a ``with`` block) when done.

    Raises:
        SplitNotFoundError: The split does not exist.
        ImageShapeError: The stored images are not ``image_shape`` uint8 arrays.
        ValueError: A bad shape, batch size, shard or buffer size.
    """
    if batch_size < 1 or shuffle_buffer < 1 or prefetch_batches < 1:
        raise ValueError(
            "batch_size, shuffle_buffer and prefetch_batches must be >= 1, got "
            f"{batch_size}, {shuffle_buffer} and {prefetch_batches}"
        )
    if not 0 <= cur_shard < shard_count:
        raise ValueError(f"cur_shard must be in [0, {shard_count}), got {cur_shard}")
    options: dict[str, Any] = {
        "image_shape": image_shape,
        "shuffle_row_groups": shuffle,
        "seed": seed,
        "num_epochs": None,
    }
    try:
        reader = SplitReader(url, cur_shard=cur_shard, shard_count=shard_count, **options)
    except TooFewRowGroupsError:
        log.warning(
            "feed: %s has fewer row groups than the %d ranks; every rank reads the whole "
            "split (re-ingest with a smaller ingest.rows_per_row_group to shard it)",
            url,
            shard_count,
        )
        reader = SplitReader(url, **options)
    # Fail here, not in the reader thread: read (and decode) one row group now.
    next(iter(SplitReader(url, image_shape=image_shape)))
    return BatchFeed(
        reader,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer if shuffle else 0,
        seed=seed,
        autoencoder=autoencoder,
        prefetch_batches=prefetch_batches,
    )


class BatchFeed:
    """Full batches from a :class:`~pipelines.train.arrow_reader.SplitReader`, read ahead.

    An iterator (``next(feed)`` gives the next batch) and a context manager. Iterating a
    closed feed stops; an error in the reader thread is raised by the next ``next()``.

    Args:
        reader: The rows to batch, decoded (``image_shape`` set); normally endless.
        batch_size: Images per batch.
        shuffle_buffer: Images in the shuffle buffer; 0 keeps the reader's order.
        seed: Seed of the image shuffle.
        autoencoder: Yield ``(images, images)``.
        prefetch_batches: Finished batches kept ready.
    """

    def __init__(
        self,
        reader: SplitReader,
        *,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        autoencoder: bool = False,
        prefetch_batches: int = 2,
    ) -> None:
        if reader.image_shape is None:
            raise ValueError("BatchFeed needs a reader that decodes (image_shape set)")
        self._producer = _Producer(
            reader, batch_size, shuffle_buffer, seed, autoencoder, prefetch_batches
        )
        self._thread = threading.Thread(
            target=self._producer.run, name="dlpipe-numpy-feed", daemon=True
        )
        self._thread.start()
        # The thread holds the producer, never this feed: dropping the feed stops it.
        self._finalizer = weakref.finalize(self, _stop, self._producer, self._thread)

    def __iter__(self) -> BatchFeed:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            if self._producer.stopping.is_set():
                raise StopIteration
            try:
                item = self._producer.batches.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._producer.batches.empty():
                    raise RuntimeError("the feed's reader thread ended unexpectedly") from None
                continue
            if isinstance(item, BaseException):
                self.close()
                raise item
            return item

    @property
    def running(self) -> bool:
        """Whether the reader thread is alive."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the reader thread and wait for it (bounded); idempotent."""
        self._finalizer()

    def __enter__(self) -> BatchFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keras_dataset(make: Callable[[], BatchFeed]) -> Any:
    """A ``keras.utils.PyDataset`` over feeds from ``make``: batch 0 starts a new feed.

    Keras asks for batches 0, 1, 2, ... in order and starts again from 0 for every new
    iteration (each ``evaluate``, or ``fit`` without ``steps_per_epoch``); with
    ``steps_per_epoch`` one ``fit`` keeps one iteration across its epochs. Starting a new
    feed at 0 gives an unshuffled split the same batches every time, as the pinned stack's
    ``tf.data`` iterators do. ``close()`` stops the current feed.

    Args:
        make: Starts a feed, e.g. ``functools.partial(make_feed, url, image_shape=...)``.
    """
    import keras

    class FeedDataset(keras.utils.PyDataset):
        """Batches of the current feed; index 0 starts the next one."""

        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self._feed: BatchFeed | None = None
            self._next = 0

        @property
        def num_batches(self) -> None:
            return None  # endless

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            if index == 0 or self._feed is None:
                self.close()
                self._feed, self._next = make(), 0
            if index != self._next:
                raise IndexError(f"batches are read in order: asked {index}, next {self._next}")
            self._next += 1
            return next(self._feed)

        def close(self) -> None:
            if self._feed is not None:
                self._feed.close()
                self._feed = None

    return FeedDataset()


def iter_split(
    url: str, image_shape: Sequence[int]
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """A split's rows one row group at a time, in stored order (the pinned ``iter_split``).

    Yields:
        ``(images, labels, paths)``: uint8 ``(N, H, W, C)``, int32 ``(N,)``, N paths.
    """
    for rows in SplitReader(url, image_shape=image_shape, with_paths=True):
        yield rows.images, rows.labels, list(rows.paths or [])


def read_split(url: str, image_shape: Sequence[int]) -> SplitArrays:
    """Read a whole split into memory, sorted by path (the pinned stack's ``read_split``).

    Returns:
        Every image, label and path of the split, and the label names from the dataset's
        ``_manifest.json`` (from the rows' ``label_name`` when there is none).

    Raises:
        SplitNotFoundError: The split does not exist.
        ImageShapeError: The stored images are not ``image_shape`` uint8 arrays.
    """
    import pyarrow.parquet as pq

    images, labels, paths = [], [], []
    for rows in SplitReader(url, image_shape=image_shape, with_paths=True):
        images.append(rows.images)
        labels.append(rows.labels)
        paths.extend(rows.paths or [])
    shape = tuple(int(d) for d in image_shape)
    all_images = np.concatenate(images) if images else np.zeros((0, *shape), np.uint8)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    order = np.argsort(np.asarray(paths, dtype=object), kind="stable")
    names = manifest_label_names(url)
    if names is None:
        files, _ = filesystem(url)
        by_label: dict[int, str] = {}
        for piece in list_pieces(url):
            with files.open_input_file(piece.path) as handle:
                table = pq.ParquetFile(handle).read_row_group(
                    piece.row_group, columns=[schema.LABEL, schema.LABEL_NAME]
                )
            pairs = zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)
            by_label.update(pairs)
        names = [by_label.get(i, str(i)) for i in range(max(by_label, default=-1) + 1)]
    return SplitArrays(
        images=all_images[order],
        labels=all_labels[order],
        paths=[paths[i] for i in order],
        label_names=names,
    )


# --- the reader thread -----------------------------------------------------------------------


class _Producer:
    """What the reader thread runs: rows → shuffle buffer → scaled batches → bounded queue."""

    def __init__(
        self,
        reader: SplitReader,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        autoencoder: bool,
        prefetch_batches: int,
    ) -> None:
        self.reader = reader
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.rng = np.random.default_rng(seed) if shuffle_buffer else None
        self.autoencoder = autoencoder
        self.batches: queue.Queue[Any] = queue.Queue(maxsize=prefetch_batches)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            for images, labels in self._batches():
                # Exactly pipelines.images.normalise: float32 x / 255 (a division).
                x = images.astype(np.float32) / np.float32(255.0)
                if not self._put((x, x) if self.autoencoder else (x, labels)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless asked to stop first; whether it was queued."""
        while not self.stopping.is_set():
            try:
                self.batches.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = _Pool()
        # Draw only from a full buffer (as tf.data's shuffle does once it has filled).
        threshold = max(self.shuffle_buffer, self.batch_size)
        for rows in self.reader:
            if self.stopping.is_set():
                return
            assert rows.images is not None
            pool.add(rows.images, rows.labels)
            while pool.size >= threshold:
                yield pool.take(self.batch_size, self.rng)


class _Pool:
    """Images and labels waiting to be batched, in preallocated arrays that grow as needed."""

    def __init__(self) -> None:
        self.images: np.ndarray | None = None
        self.labels = np.zeros(0, np.int32)
        self.size = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        end = self.size + len(images)
        if self.images is None or end > len(self.images):
            capacity = max(end, 2 * self.size)
            grown = np.empty((capacity, *images.shape[1:]), dtype=np.uint8)
            grown_labels = np.empty(capacity, dtype=np.int32)
            if self.images is not None:
                grown[: self.size] = self.images[: self.size]
                grown_labels[: self.size] = self.labels[: self.size]
            self.images, self.labels = grown, grown_labels
        self.images[self.size : end] = images
        self.labels[self.size : end] = labels
        self.size = end

    def take(self, count: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Remove ``count`` rows: the oldest, or (with ``rng``) a random draw."""
        assert self.images is not None and count <= self.size
        rest = self.size - count
        if rng is None:
            out = (self.images[:count].copy(), self.labels[:count].copy())
            self.images[:rest] = self.images[count : self.size]
            self.labels[:rest] = self.labels[count : self.size]
        else:
            chosen = rng.choice(self.size, size=count, replace=False)
            out = (self.images[chosen], self.labels[chosen])
            # Fill the holes below ``rest`` with the rows above it that stay.
            holes = chosen[chosen < rest]
            kept = np.setdiff1d(np.arange(rest, self.size), chosen, assume_unique=True)
            self.images[holes] = self.images[kept]
            self.labels[holes] = self.labels[kept]
        self.size = rest
        return out


def _stop(producer: _Producer, thread: threading.Thread) -> None:
    """Stop the reader thread and wait for it; the feed's finalizer (also run by close)."""
    producer.stopping.set()
    if thread is not threading.current_thread():
        thread.join(_JOIN_TIMEOUT_S)
    while not producer.batches.empty():  # release the batches it held
        try:
            producer.batches.get_nowait()
        except queue.Empty:
            break
