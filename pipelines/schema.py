"""The contracts between stages.

In: the target image shape. Out: the Unischema of the prepared dataset (what ingest writes
and training reads) and the column names shared by ingest, training and scoring. Nothing
here touches data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from petastorm.unischema import Unischema

#: Splits of the prepared dataset, in the order they are reported.
SPLITS = ("train", "val", "test")

#: Column names of the prepared dataset.
IMAGE, LABEL, LABEL_NAME, PATH, SPLIT = "image", "label", "label_name", "path", "split"

#: Quarantine table columns: every rejected file, with why.
QUARANTINE_COLUMNS = ("path", "reason")

#: Sidecar files inside a prepared dataset. The leading underscore hides them from Parquet
#: readers (Petastorm's make_reader takes every visible file for a Parquet piece).
MANIFEST_FILE = "_manifest.json"
QUARANTINE_DIR = "_quarantine"

#: np.save writes a fixed 128-byte header for a fixed uint8 shape (NPY format 1.0), so the
#: feed can slice raw pixels out of a whole batch of encoded cells without parsing each one.
NPY_HEADER_BYTES = 128


def prepared_schema(height: int, width: int, channels: int) -> Unischema:
    """Unischema of the prepared dataset for images of one fixed shape.

    Images are uint8 ndarrays stored with Petastorm's own ``NdarrayCodec`` (the only kind
    plain Petastorm readers can decode; see ARCHITECTURE.md). ``split`` is the partition
    column, so one split can be read without touching the others.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        channels: 1 or 3.

    Returns:
        The ``PreparedImage`` Unischema.
    """
    import numpy as np
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import IntegerType, StringType

    return Unischema(
        "PreparedImage",
        [
            UnischemaField(IMAGE, np.uint8, (height, width, channels), NdarrayCodec(), False),
            UnischemaField(LABEL, np.int32, (), ScalarCodec(IntegerType()), False),
            UnischemaField(LABEL_NAME, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(PATH, np.str_, (), ScalarCodec(StringType()), False),
            UnischemaField(SPLIT, np.str_, (), ScalarCodec(StringType()), False),
        ],
    )


def split_path(dataset: str, split: str) -> str:
    """Location of one split inside a prepared dataset.

    Each split is a complete Petastorm dataset of its own (``make_reader`` shards by
    row-group index over the whole dataset, so a split must not share one with others),
    named ``split=<name>`` so that ``spark.read.parquet(dataset)`` also sees all splits.

    Args:
        dataset: The prepared dataset directory.
        split: One of :data:`SPLITS`.

    Returns:
        ``<dataset>/split=<split>``.
    """
    return f"{dataset.rstrip('/')}/{SPLIT}={split}"
