"""The contracts between stages: the one place each hand-over is typed.

- The prepared dataset (ingest writes, training, the feed and the bench read): its columns
  (:data:`PREPARED_COLUMNS`, as a Unischema and an Arrow schema), the image-cell codec
  (:func:`encode_cell`, :func:`decode_cells`) and its :class:`Manifest`. Where its files
  lie is :class:`pipelines.store.DatasetDir`'s.
- The scoring table (scoring writes): the model's output columns (:data:`MODEL_OUTPUTS`,
  which serving's signature follows) and the table's own columns around them.

Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from petastorm.unischema import Unischema

#: Splits of the prepared dataset, in the order they are reported.
SPLITS = ("train", "val", "test")

#: Column names of the prepared dataset.
IMAGE, LABEL, LABEL_NAME, PATH, SPLIT = "image", "label", "label_name", "path", "split"

#: Columns of the prepared dataset's files, in the Unischema's order, with their Arrow types.
PREPARED_COLUMNS: dict[str, str] = {
    IMAGE: "binary",
    LABEL: "int32",
    LABEL_NAME: "string",
    PATH: "string",
    SPLIT: "string",
}

#: Quarantine table columns: every rejected file, with why.
QUARANTINE_COLUMNS = ("path", "reason")

#: np.save writes a fixed 128-byte header for a fixed uint8 shape (NPY format 1.0), so the
#: feed can slice raw pixels out of a whole batch of encoded cells without parsing each one.
NPY_HEADER_BYTES = 128

#: The first bytes of every ``.npy`` cell.
NPY_MAGIC = b"\x93NUMPY"


def prepared_schema(height: int, width: int, channels: int, storage: str = "raw") -> Unischema:
    """Unischema of the prepared dataset for images of one fixed shape.

    Raw images are uint8 ndarrays stored with Petastorm's own ``NdarrayCodec`` (the only
    image kind plain Petastorm readers decode without OpenCV; see ARCHITECTURE.md). PNG and
    JPEG cells are declared as what they are to Petastorm, binary scalars (the file's bytes;
    its ``CompressedImageCodec`` would need OpenCV, which this stack does not install); this
    project's readers decode every kind with :func:`decode_cells`, and the image shape is the
    manifest's. ``split`` is the partition column, so one split can be read without touching
    the others.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        channels: 1 or 3.
        storage: One of :data:`STORAGES`.

    Returns:
        The ``PreparedImage`` Unischema.
    """
    import numpy as np
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    scalars = {"int32": (np.int32, IntegerType()), "string": (np.str_, StringType())}
    if storage == "raw":
        image = UnischemaField(IMAGE, np.uint8, (height, width, channels), NdarrayCodec(), False)
    else:
        image = UnischemaField(IMAGE, np.bytes_, (), ScalarCodec(BinaryType()), False)
    return Unischema(
        "PreparedImage",
        [image]
        + [
            UnischemaField(name, scalars[kind][0], (), ScalarCodec(scalars[kind][1]), False)
            for name, kind in PREPARED_COLUMNS.items()
            if name != IMAGE
        ],
    )


def prepared_arrow_schema() -> pa.Schema:
    """Arrow schema of the prepared dataset's files (as Spark would write them)."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in PREPARED_COLUMNS.items()])


# --- the image cell: one uint8 array, as np.save writes it or as a PNG or JPEG file -------

#: How an image cell can be encoded (``ingest.storage``): ``raw`` is ``np.save``'s uint8
#: pixels (what plain Petastorm's ``NdarrayCodec`` reads; every dataset written before the
#: choice existed), ``png`` lossless, ``jpeg`` lossy at ``ingest.jpeg_quality``.
STORAGES = ("raw", "png", "jpeg")

#: The storage of datasets whose manifest records none.
DEFAULT_STORAGE = "raw"

#: The first bytes of a PNG file and of a JPEG file.
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class CellError(ValueError):
    """An encoded image is not a uint8 image of the expected shape."""

    def __init__(self, cell: bytes) -> None:
        """Keep the offending cell, for the caller's message.

        Args:
            cell: The first cell that does not match.
        """
        super().__init__(f"cell of {len(cell)} bytes does not match the expected shape")
        self.cell = cell


def encode_cell(array: np.ndarray, storage: str = DEFAULT_STORAGE, quality: int = 90) -> bytes:
    """Encode one uint8 ``(H, W, C)`` image as ``storage`` says.

    ``raw`` is Petastorm's ``NdarrayCodec`` (``np.save``), readable by plain Petastorm; ``png``
    and ``jpeg`` are image files written by Pillow (JPEG with its default 4:2:0 chroma
    subsampling, as cameras write photos).

    Args:
        array: uint8 pixels ``(H, W, 1)`` or ``(H, W, 3)``.
        storage: One of :data:`STORAGES`.
        quality: JPEG quality, 1-95 (unused otherwise).

    Raises:
        ValueError: An unknown storage.
    """
    import numpy as np

    if storage == "raw":
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    from PIL import Image

    pixels = np.asarray(array)
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    if storage == "png":
        # Level 1: measured on 224-pixel generated photos, 9 % larger than level 6 and 3.5x
        # faster to write (5 ms against 18 ms an image).
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cell_storage(cell: bytes) -> str | None:
    """The storage of one encoded cell, from its first bytes; None when it is none of them."""
    if cell.startswith(NPY_MAGIC):
        return "raw"
    if cell.startswith(PNG_MAGIC):
        return "png"
    if cell.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def cell_size(shape: Sequence[int]) -> int:
    """Bytes of one raw (``np.save``) uint8 image of ``shape``: the fixed header and the pixels."""
    import numpy as np

    return NPY_HEADER_BYTES + int(np.prod(shape))


def stored_array(cell: bytes) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of an encoded cell (from its header alone), None when it is none."""
    import numpy as np

    storage = cell_storage(cell)
    if storage in ("png", "jpeg"):
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(cell))
        except (OSError, ValueError):
            return None
        channels = {"L": 1, "RGB": 3}.get(image.mode, len(image.getbands()))
        return (image.height, image.width, channels), np.dtype(np.uint8)
    try:
        stream = io.BytesIO(cell[: NPY_HEADER_BYTES * 4])
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, SyntaxError):
        return None
    return tuple(shape), np.dtype(dtype)


def cell_matches(cell: bytes, shape: tuple[int, int, int]) -> bool:
    """Whether one encoded cell holds a uint8 image of ``shape`` (raw, PNG or JPEG)."""
    import numpy as np

    if cell_storage(cell) == "raw" and len(cell) != cell_size(shape):
        return False
    return stored_array(cell) == (tuple(shape), np.dtype(np.uint8))


def decode_cells(cells: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    """Decode many cells of one uint8 shape into one ``(N, *shape)`` array.

    The storage is read from the first cell: raw (``np.save``) cells are sliced out of one
    joined buffer at once; PNG and JPEG cells are decoded one by one with Pillow into one
    preallocated array (Pillow releases the GIL while decoding, so threads decode in parallel).

    Raises:
        CellError: A cell is not a uint8 image of ``shape`` in the first cell's storage.
    """
    import numpy as np

    if len(cells) == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    storage = cell_storage(cells[0])
    if storage in ("png", "jpeg"):
        return _decode_images(cells, shape)
    if not cell_matches(cells[0], shape):
        raise CellError(cells[0])
    width = cell_size(shape)
    for cell in cells:
        if len(cell) != width:
            raise CellError(cell)
    raw = np.frombuffer(b"".join(cells), dtype=np.uint8).reshape(len(cells), width)
    headers = raw[:, :NPY_HEADER_BYTES]
    bad = np.flatnonzero((headers != headers[0]).any(axis=1))
    if bad.size:
        raise CellError(cells[int(bad[0])])
    return raw[:, NPY_HEADER_BYTES:].reshape(len(cells), *shape).copy()


def _decode_images(cells: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    """Decode PNG or JPEG cells of one shape with Pillow, into one ``(N, *shape)`` array."""
    import numpy as np
    from PIL import Image

    height, width, channels = shape
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(cells), *shape), dtype=np.uint8)
    view = out[..., 0] if channels == 1 else out
    for i, cell in enumerate(cells):
        try:
            image = Image.open(io.BytesIO(cell))
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise CellError(cell) from exc
        if image.size != (width, height) or image.mode != mode:
            raise CellError(cell)
        view[i] = np.asarray(image)
    return out


# --- the manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset's ``_manifest.json``: counts, classes, label order, image shape.

    Attributes:
        source: The source, in display form.
        format: The source format (``folder``, ``mnist``, ``cifar10``).
        files_seen: Files listed (ingested, quarantined and skipped).
        ingested: Rows written.
        quarantined: Records rejected, with why, in ``_quarantine/``.
        skipped: Files skipped as not images.
        splits: Rows per split.
        classes: Rows per class name.
        split_classes: Rows per class name in each split (empty in manifests written
            before 2026-12); what a scoring batch's predictions are compared with.
        label_names: Class names; a label is an index into this list.
        image_shape: ``[height, width, channels]`` of every image.
        resize: How each image was made square (``stretch``, ``crop`` or ``pad``;
            ``stretch`` in manifests written before the choice existed).
        storage: How each image cell is encoded (``raw`` ``np.save`` pixels, ``png`` or
            ``jpeg``; ``raw`` in manifests written before the choice existed).
        started_at: ISO time the ingest started.
        finished_at: ISO time the ingest finished.
    """

    source: str = ""
    format: str = ""
    files_seen: int = 0
    ingested: int = 0
    quarantined: int = 0
    skipped: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    split_classes: dict[str, dict[str, int]] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    image_shape: list[int] = field(default_factory=list)
    resize: str = "stretch"
    storage: str = DEFAULT_STORAGE
    started_at: str = ""
    finished_at: str = ""

    #: Keys every reader needs; a file without one of them is not a manifest.
    REQUIRED = ("splits", "label_names", "image_shape")

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest's text; keys it does not know are ignored.

        Raises:
            ValueError: Not JSON.
            KeyError: One of :attr:`REQUIRED` is missing.
            TypeError: A value has the wrong kind.
        """
        data: Mapping[str, Any] = json.loads(text)
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise KeyError(f"manifest lacks {', '.join(missing)}")
        values = {f.name: data[f.name] for f in fields(Manifest) if f.name in data}
        values["splits"] = {str(k): int(v) for k, v in data["splits"].items()}
        values["label_names"] = [str(name) for name in data["label_names"]]
        values["image_shape"] = [int(d) for d in data["image_shape"]]
        values["split_classes"] = {
            str(split): {str(k): int(v) for k, v in counts.items()}
            for split, counts in (data.get("split_classes") or {}).items()
        }
        return cls(**values)

    def class_distribution(self, split: str = "train") -> dict[str, int]:
        """Rows per class in ``split``; every split's together for an older manifest."""
        return dict(self.split_classes.get(split) or self.classes)

    def manifest_dict(self) -> dict[str, Any]:
        """The manifest's keys and values only (not those a subclass adds)."""
        return {f.name: getattr(self, f.name) for f in fields(Manifest)}

    def to_json(self) -> str:
        """The manifest file's text (sorted keys, so the bytes are stable)."""
        return json.dumps(self.manifest_dict(), indent=2, sort_keys=True) + "\n"


# --- the scoring table -----------------------------------------------------------------------

#: Output columns of the pyfunc model (a classifier), in order, with their Spark types; every
#: one may be null. Serving's signature and the scoring table both follow this.
MODEL_OUTPUTS: dict[str, str] = {
    "predicted_label": "string",
    "probability": "double",
    "probabilities": "array<double>",
    "error": "string",
}

#: What a reconstruction model (the autoencoder) outputs besides: each image's mean absolute
#: reconstruction error (its classifier columns are null).
RECONSTRUCTION_ERROR = "reconstruction_error"
RECONSTRUCTION_OUTPUTS: dict[str, str] = {RECONSTRUCTION_ERROR: "double"}

#: What scoring derives from a classifier's ``probabilities`` for readers of SQL alone: the
#: ``score.top_k`` most probable class names and their probabilities, most probable first.
TOP_K_OUTPUTS: dict[str, str] = {
    "top_labels": "array<string>",
    "top_probabilities": "array<double>",
}

#: What identifies the scored file, so that a later run can skip it (``score.only_new``): its
#: size and modification time, and its content's SHA-256 where ``score.identity`` asks for it
#: (null otherwise, and in batches written before these columns existed).
FILE_IDENTITY: dict[str, str] = {
    "file_size": "bigint",
    "file_modified": "timestamp",
    "file_sha256": "string",
}

#: What scoring adds after the model's outputs: where the prediction came from, and when.
SCORING_PROVENANCE: dict[str, str] = {
    "model_name": "string",
    "model_version": "string",
    "model_uri": "string",
    "scored_at": "timestamp",
    "batch_id": "string",
}

#: The image's path and every task's model outputs (null where a model has no such output).
SCORED_ROW: dict[str, str] = {PATH: "string", **MODEL_OUTPUTS, **RECONSTRUCTION_OUTPUTS}
#: The scoring table, in column order: the scored row, the top classes, the file's identity,
#: provenance. One schema for every batch of a table; columns added after a batch was
#: written read as null in it (Parquet is read with ``mergeSchema``, Delta written with it).
SCORING_TABLE: dict[str, str] = {
    **SCORED_ROW,
    **TOP_K_OUTPUTS,
    **FILE_IDENTITY,
    **SCORING_PROVENANCE,
}


def ddl(columns: Mapping[str, str]) -> str:
    """Spark DDL (``"name type, ..."``) for a column mapping."""
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())
