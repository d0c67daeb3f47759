"""Reader benchmark: Petastorm's reader on our dataset against pyarrow reading the same Parquet.

In: a :class:`~pipelines.config.Config` (Spark session and row-group size for the cached
dataset), a number of generated images and repeats. Out: one
:class:`~pipelines.bench.stats.Measurement`, rows/s of a Petastorm batch reader configured
as the training feed configures it, over rows/s of pyarrow; informative, no target.
"""

from __future__ import annotations

import functools
import logging
import warnings

from pipelines import schema
from pipelines.bench.data import DATASET_IMAGES, prepared_dataset
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes, interleaved, timed
from pipelines.config import Config

log = logging.getLogger("pipelines.bench")

#: Columns both readers read: what the training feed reads.
_COLUMNS = [schema.IMAGE, schema.LABEL]


def bench_reader(
    config: Config, *, images: int = DATASET_IMAGES, repeats: int = 3
) -> list[Measurement]:
    """Rows/s of one pass over the training split: Petastorm against plain pyarrow.

    On the cached benchmark dataset (see :func:`~pipelines.bench.data.prepared_dataset`),
    the ``image`` (``np.save`` bytes) and ``label`` columns of every row of the training
    split, in stored order, to numpy arrays in this process; nothing is decoded further:

    - measured ``petastorm make_batch_reader``: opened as the training feed opens it
      (thread pool with one worker, results queue of 8 row groups, endless epochs) and
      iterated until one pass of rows has arrived, then stopped; the time includes opening
      the dataset (metadata, pool start) and stopping the reader;
    - baseline ``pyarrow dataset``: ``pyarrow.dataset.dataset(split).to_batches(columns)``
      and each batch's columns to numpy, including opening the dataset.

    One untimed pass of each first warms the page cache and imports; then ``repeats``
    interleaved passes, medians reported. Informative only (no target): the feed
    benchmark says whether reading keeps up with training.

    Args:
        config: Spark session and ``ingest.rows_per_row_group`` for the cached dataset.
        images: Number of generated source images.
        repeats: Measured passes of each.

    Returns:
        One measurement, Petastorm rows/s over pyarrow rows/s.

    Raises:
        UserError: ``images`` or ``repeats`` is below 1, or no training rows.
        RuntimeError: A reader returned another number of rows than the split holds.
    """
    check_sizes("reader", images, repeats)
    data = prepared_dataset(config, images)
    from pipelines.store import to_url

    url = to_url(data.split("train"))
    rows = data.rows["train"]
    readers = {"petastorm": _petastorm_pass, "pyarrow": _pyarrow_pass}

    def run(name: str) -> float:
        seconds, seen = timed(functools.partial(readers[name], url, rows))
        if seen != rows:
            raise RuntimeError(f"bench reader: {name} read {seen} of {rows} rows")
        return rows / seconds

    for name in readers:
        run(name)
    rates = interleaved("reader", {name: functools.partial(run, name) for name in readers}, repeats)
    details = {
        "images": images,
        "repeats": repeats,
        **data.describe(),
        "columns": _COLUMNS,
        "petastorm": "make_batch_reader, thread pool, 1 worker, results_queue_size 8",
        "measures": "rows of one pass over the training split / wall seconds, open included",
    }
    return [
        pair(
            "reader",
            "petastorm make_batch_reader",
            rates["petastorm"],
            "pyarrow dataset",
            rates["pyarrow"],
            unit="rows/s",
            details=details,
        )
    ]


def _petastorm_pass(url: str, rows: int) -> int:
    """Rows read by a feed-like Petastorm batch reader until one pass has arrived."""
    from petastorm import make_batch_reader

    with warnings.catch_warnings():
        # Petastorm's own use of old pyarrow APIs, and its advice to use make_reader.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Please use make_reader")
        warnings.filterwarnings("ignore", message="schema_fields behavior has changed")
        reader = make_batch_reader(
            url,
            num_epochs=None,
            schema_fields=_COLUMNS,
            shuffle_row_groups=False,
            reader_pool_type="thread",
            workers_count=1,
            results_queue_size=8,
        )
    seen = 0
    try:
        for batch in reader:
            seen += len(batch.label)
            if seen >= rows:
                break
    finally:
        reader.stop()
        reader.join()
    return seen


def _pyarrow_pass(url: str, rows: int) -> int:
    """Rows of one pass of pyarrow over the split, columns converted to numpy."""
    import pyarrow.dataset as ds

    seen = 0
    for batch in ds.dataset(url.removeprefix("file://"), format="parquet").to_batches(
        columns=_COLUMNS
    ):
        cells = batch.column(0).to_numpy(zero_copy_only=False)
        labels = batch.column(1).to_numpy()
        seen += min(len(cells), len(labels))
    return seen
