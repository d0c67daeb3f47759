"""Reading a prepared split with plain pyarrow, sharded by row group as Petastorm shards it.

In: the location of one split of a prepared dataset (``DatasetDir(root).split(name)``, a
local path or a URL pyarrow reads: ``file://``, ``hdfs://``, ``s3://``, ...). Out: the rows of
this rank's row groups, one :class:`RowGroupRows` per row group: int32 labels, and the image
cells as stored (``np.save`` bytes) or decoded to uint8 ``(N, H, W, C)``, optionally the paths.

Why: Petastorm 0.13.1 cannot run on pyarrow >= 15 or numpy 2 (see ARCHITECTURE.md), while the
datasets it reads are plain Parquet. This reader needs only pyarrow (14 and later) and numpy (1
and 2), and gives each rank exactly the rows Petastorm's
``make_batch_reader(url, cur_shard=r, shard_count=n, shuffle_row_groups=False)`` gives it
(``tests/unit/test_arrow_reader.py`` holds the two side by side):

- the row groups ("pieces") of a split are listed as Petastorm 0.13.1 lists them
  (``etl/dataset_metadata.load_row_groups``): the data files of the folder tree, without the
  files and folders pyarrow's legacy ``ParquetDataset`` skips (hidden, ``_``-prefixed, ``.crc``,
  ``_SUCCESS``, ``*_metadata``), sorted by path; each file contributes the row-group count the
  dataset's ``_common_metadata`` records for it (the key ingest writes), else the count in
  ``_metadata``, else the count in its own footer. (With the recorded counts Petastorm sorts
  the files by path; without them it keeps the legacy listing's order, which is the sorted
  order for a flat folder such as a split.)
- rank ``r`` of ``n`` reads the pieces whose index ``i`` in that list has ``i % n == r``, in
  list order, and fails when there are fewer pieces than ranks (Petastorm's
  ``NoDataAvailableError``; here :class:`TooFewRowGroupsError`). Petastorm given a ``seed``
  also permutes the order within the shard; this reader does not.

Row-group shuffling, when asked for, draws a new order of this shard's pieces every epoch from
``(seed, epoch)``, so a seeded read is reproducible. Decoding slices the pixels out of the
column's value buffer in one step: every cell of a split has the same fixed 128-byte ``.npy``
header (``schema.NPY_HEADER_BYTES``); PNG and JPEG cells (``ingest.storage``) are decoded by
:func:`pipelines.schema.decode_cells`, as the Petastorm feed decodes them.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines import schema
from pipelines.errors import UserError
from pipelines.store import DatasetDir
from pipelines.store import filesystem as file_system
from pipelines.train.feed import ImageShapeError, SplitNotFoundError, check_image_shape

if TYPE_CHECKING:
    import pyarrow as pa
    from pyarrow import fs as pafs

#: Petastorm's key in ``_common_metadata``: JSON of ``{relative file path: row groups}``.
ROW_GROUPS_PER_FILE_KEY = b"dataset-toolkit.num_row_groups_per_file.v1"

#: Files a legacy ``ParquetDataset`` (which Petastorm lists with) never takes as data.
_EXCLUDED_NAMES = ("_SUCCESS",)


class TooFewRowGroupsError(ValueError):
    """The split has fewer row groups than shards: some shard would be empty."""


class SplitReadError(UserError):
    """A split's folder holds no readable prepared dataset (no data file, stale metadata).

    A missing split raises the feed's :class:`~pipelines.train.feed.SplitNotFoundError`, and
    cells of another shape its :class:`~pipelines.train.feed.ImageShapeError`, as on the
    pinned stack.
    """


@dataclass(frozen=True)
class Piece:
    """One row group of one file: the unit Petastorm (and this reader) shards by.

    Attributes:
        path: The file's path in its file system.
        row_group: The row group's index in the file.
    """

    path: str
    row_group: int


@dataclass(frozen=True, eq=False)
class RowGroupRows:
    """The rows of one row group (compared by identity: it holds arrays).

    Attributes:
        piece: Where they were read from.
        epoch: The pass over the shard they belong to (0-based).
        labels: int32 class indexes, shape ``(N,)``.
        images: uint8 pixels ``(N, H, W, C)`` when decoding, else None.
        cells: The stored ``np.save`` bytes of each image when not decoding, else None.
        paths: Each image's source path, when asked for, else None.
    """

    piece: Piece
    epoch: int
    labels: np.ndarray
    images: np.ndarray | None = None
    cells: list[bytes] | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def list_pieces(url: str) -> list[Piece]:
    """Every row group of a split, in the order Petastorm 0.13.1 numbers them.

    Args:
        url: The split's location.

    Returns:
        The pieces; their index in this list is what shards are cut by.

    Raises:
        SplitNotFoundError: The split does not exist.
        SplitReadError: It holds no data file, or its metadata misses one.
    """
    filesystem, base = file_system(url)
    files = _data_files(filesystem, base, url)
    if not files:
        raise SplitReadError(f"no Parquet data file in {url}; run ingest first")
    recorded, source = _recorded_row_groups(filesystem, base)
    pieces = []
    for path in sorted(files):
        relative = posixpath.relpath(path, base)
        if source is None:
            count = _footer_row_groups(filesystem, path)
        elif relative in recorded:
            count = recorded[relative]
        elif source == DatasetDir.PETASTORM_METADATA:  # Petastorm fails here too (a KeyError)
            raise SplitReadError(
                f"{url}: {relative} is not in the row-group counts of _common_metadata "
                "(a file added after ingest?); re-run ingest"
            )
        else:  # a file the summary does not list has no row groups for Petastorm
            count = 0
        pieces.extend(Piece(path, index) for index in range(count))
    return pieces


def shard_pieces(pieces: Sequence[Piece], cur_shard: int, shard_count: int) -> list[Piece]:
    """This shard's pieces: those whose index modulo ``shard_count`` is ``cur_shard``.

    Raises:
        ValueError: A bad shard.
        TooFewRowGroupsError: Fewer pieces than shards.
    """
    if shard_count < 1 or not 0 <= cur_shard < shard_count:
        raise ValueError(f"cur_shard must be in [0, {shard_count}), got {cur_shard}")
    if len(pieces) < shard_count:
        raise TooFewRowGroupsError(
            f"{len(pieces)} row groups cannot be shared by {shard_count} shards"
        )
    return [piece for index, piece in enumerate(pieces) if index % shard_count == cur_shard]


class SplitReader:
    """The row groups of one shard of a split, for one or more passes (or forever).

    Iterating yields one :class:`RowGroupRows` per row group; every new iteration starts
    from the first pass again. Reads happen in the iterating thread.

    Args:
        url: The split, e.g. ``DatasetDir(root).split("train")``; a path or a URL.
        cur_shard: This rank.
        shard_count: The number of ranks.
        image_shape: ``(height, width, channels)``: decode the cells to uint8 images of this
            shape; None: hand the stored cells back as bytes.
        with_paths: Also read each row's source path.
        shuffle_row_groups: Read the shard's row groups in a new random order every pass.
        seed: Seed of that order (None: unseeded).
        num_epochs: Passes over the shard; None: never stop.

    Raises:
        SplitNotFoundError: The split does not exist.
        SplitReadError: It holds no data file, or its metadata misses one.
        TooFewRowGroupsError: Fewer row groups than shards.
        ValueError: A bad shard, image shape or number of passes.

    Reading raises :class:`~pipelines.train.feed.ImageShapeError` for cells that are not
    uint8 images of ``image_shape``.
    """

    def __init__(
        self,
        url: str,
        *,
        cur_shard: int = 0,
        shard_count: int = 1,
        image_shape: Sequence[int] | None = None,
        with_paths: bool = False,
        shuffle_row_groups: bool = False,
        seed: int | None = None,
        num_epochs: int | None = 1,
    ) -> None:
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.url = url
        self.pieces = shard_pieces(list_pieces(url), cur_shard, shard_count)
        self.image_shape = check_image_shape(image_shape) if image_shape is not None else None
        self.with_paths = with_paths
        self.shuffle_row_groups = shuffle_row_groups
        self.seed = seed
        self.num_epochs = num_epochs
        self._filesystem, _ = file_system(url)
        self._columns = [schema.IMAGE, schema.LABEL] + ([schema.PATH] if with_paths else [])

    def order(self, epoch: int) -> list[Piece]:
        """The pieces in the order pass ``epoch`` reads them."""
        if not self.shuffle_row_groups:
            return list(self.pieces)
        entropy = None if self.seed is None else [self.seed, epoch]
        permutation = np.random.default_rng(entropy).permutation(len(self.pieces))
        return [self.pieces[i] for i in permutation]

    def __iter__(self) -> Iterator[RowGroupRows]:
        epoch = 0
        opened: tuple[str, Any] | None = None
        while self.num_epochs is None or epoch < self.num_epochs:
            for piece in self.order(epoch):
                if opened is None or opened[0] != piece.path:
                    opened = (piece.path, self._open(piece.path))
                table = opened[1].read_row_group(piece.row_group, columns=self._columns)
                yield self._rows(piece, epoch, table)
            epoch += 1

    def _open(self, path: str) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self._filesystem.open_input_file(path))

    def _rows(self, piece: Piece, epoch: int, table: pa.Table) -> RowGroupRows:
        images = table.column(schema.IMAGE)
        labels = table.column(schema.LABEL).to_numpy().astype(np.int32, copy=False)
        paths = table.column(schema.PATH).to_pylist() if self.with_paths else None
        if self.image_shape is None:
            return RowGroupRows(piece, epoch, labels, cells=images.to_pylist(), paths=paths)
        decoded = decode_column(images, self.image_shape, self.url)
        return RowGroupRows(piece, epoch, labels, images=decoded, paths=paths)


def decode_column(
    column: pa.ChunkedArray | pa.Array, shape: Sequence[int], where: str = "the split"
) -> np.ndarray:
    """Decode a column of image cells of one uint8 shape into ``(N, *shape)``.

    Raw (``np.save``) cells: the pixels are sliced out of the column's value buffer at once
    (no per-row Python), after checking that every cell has the length and the very header
    of a uint8 array of ``shape``. PNG and JPEG cells: :func:`pipelines.schema.decode_cells`.

    Raises:
        ImageShapeError: A cell is not an ``np.save`` of a uint8 array of ``shape``.
        SplitReadError: A cell is null.
    """
    import pyarrow as pa

    shape = check_image_shape(shape)
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows = len(array)
    if rows == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    if array.null_count:
        raise SplitReadError(f"{where} holds {array.null_count} null image cells")
    if schema.cell_storage(array[0].as_py()) in ("png", "jpeg"):
        try:
            return schema.decode_cells(array.to_pylist(), shape)
        except schema.CellError as exc:
            raise ImageShapeError(_shape_message(exc.cell, where, shape)) from None
    width = schema.cell_size(shape)
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    _, offsets_buffer, values_buffer = array.buffers()
    start = array.offset  # a sliced array starts inside its buffers
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[start : start + rows + 1]
    values = np.frombuffer(values_buffer, dtype=np.uint8)
    wrong = np.flatnonzero(np.diff(offsets) != width)
    if wrong.size:
        raise ImageShapeError(_shape_message(array[int(wrong[0])].as_py(), where, shape))
    raw = values[offsets[0] : offsets[-1]].reshape(rows, width)
    first = raw[0, : schema.NPY_HEADER_BYTES]
    if not schema.cell_matches(raw[0].tobytes(), shape):
        raise ImageShapeError(_shape_message(raw[0].tobytes(), where, shape))
    bad_rows = np.flatnonzero((raw[:, : schema.NPY_HEADER_BYTES] != first).any(axis=1))
    if bad_rows.size:
        raise ImageShapeError(_shape_message(raw[int(bad_rows[0])].tobytes(), where, shape))
    return raw[:, schema.NPY_HEADER_BYTES :].reshape(rows, *shape).copy()


# --- helpers ---------------------------------------------------------------------------------


def _shape_message(cell: bytes, where: str, shape: tuple[int, int, int]) -> str:
    stored = schema.stored_array(cell)
    found = (
        f"{stored[1]} images of shape {stored[0]}"
        if stored
        else f"cells of {len(cell)} bytes that are not .npy arrays, PNG or JPEG"
    )
    return (
        f"{where} holds {found}, expected uint8 images of shape {shape}; re-ingest at the "
        "image size and channels "
        "the training config uses, or train with the dataset's image_shape from _manifest.json"
    )


def _skipped_file(name: str) -> bool:
    """Whether a legacy ``ParquetDataset`` leaves this file out of the data files."""
    return (
        name.endswith((".crc", "_$folder$", "_metadata"))
        or name.startswith((".", "_"))
        or name in _EXCLUDED_NAMES
    )


def _skipped_folder(name: str) -> bool:
    """Whether a legacy ``ParquetDataset`` leaves this folder out ("private" folders)."""
    return name.startswith(("_", ".")) and "=" not in name


def _data_files(filesystem: pafs.FileSystem, base: str, url: str) -> list[str]:
    """The data files below ``base``, as a legacy ``ParquetDataset`` walks them."""
    from pyarrow import fs as pafs

    info = filesystem.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise SplitNotFoundError(
            f"split not found: {url} (an empty split is not written; check the dataset "
            "path and run ingest first)"
        )
    found: list[str] = []
    pending = [base]
    while pending:
        folder = pending.pop()
        entries = filesystem.get_file_info(pafs.FileSelector(folder))
        names = {entry.path: posixpath.basename(entry.path) for entry in entries}
        files = [
            e.path
            for e in entries
            if e.type == pafs.FileType.File and not _skipped_file(names[e.path])
        ]
        folders = [
            e.path
            for e in entries
            if e.type == pafs.FileType.Directory and not _skipped_folder(names[e.path])
        ]
        if files and folders:
            raise SplitReadError(f"{url}: found files in an intermediate folder {folder}")
        found.extend(files)
        pending.extend(folders)
    return found


def _recorded_row_groups(
    filesystem: pafs.FileSystem, base: str
) -> tuple[dict[str, int], str | None]:
    """Row groups per data file (relative path) as the dataset's metadata records them.

    Returns:
        The counts and the file they came from: ``_common_metadata`` (Petastorm's own key,
        which ingest writes), else ``_metadata`` (a summary file), else ``({}, None)``.
    """
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    common = posixpath.join(base, DatasetDir.PETASTORM_METADATA)
    if filesystem.get_file_info(common).type == pafs.FileType.File:
        with filesystem.open_input_file(common) as handle:
            recorded = pq.read_schema(handle).metadata or {}
        if ROW_GROUPS_PER_FILE_KEY in recorded:
            counts = json.loads(recorded[ROW_GROUPS_PER_FILE_KEY].decode())
            return {str(name): int(n) for name, n in counts.items()}, DatasetDir.PETASTORM_METADATA
    summary = posixpath.join(base, DatasetDir.PARQUET_SUMMARY)
    if filesystem.get_file_info(summary).type == pafs.FileType.File:
        with filesystem.open_input_file(summary) as handle:
            metadata = pq.read_metadata(handle)
        counts = {}
        for index in range(metadata.num_row_groups):
            name = metadata.row_group(index).column(0).file_path
            counts[name] = counts.get(name, 0) + 1
        if counts:
            return counts, DatasetDir.PARQUET_SUMMARY
    return {}, None


def _footer_row_groups(filesystem: pafs.FileSystem, path: str) -> int:
    """The row groups of one data file, from its own footer."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(path) as handle:
        return pq.read_metadata(handle).num_row_groups
