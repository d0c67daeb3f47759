"""Readers of the array-based source formats, and detection of a source's format.

In: a path given as an ingest source: a folder of class sub-folders of image files, MNIST IDX
files (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally gzipped, as
published for MNIST, Fashion-MNIST and EMNIST), or CIFAR-10 python batches (``data_batch_1``
to ``data_batch_5``, ``test_batch``, ``batches.meta``).
Out: :func:`detect_format` names the format; :func:`read_mnist_idx` and :func:`read_cifar10`
return :class:`ArrayPart` objects, in-memory uint8 images with integer labels, one per file pair
or batch. Folders of image files are ingest's to read, not this module's.

Anything malformed raises :class:`SourceError`, a one-line message naming the file and the fault.
The writers (:func:`write_idx`, :func:`write_cifar10_batch`, :func:`write_cifar10_meta`) produce
the same formats for test fixtures and benchmarks.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.errors import UserError

#: The formats :func:`detect_format` can name.
SourceFormat = Literal["folder", "mnist-idx", "cifar10"]

#: Class names of CIFAR-10, by label index, used when ``batches.meta`` is absent.
CIFAR10_LABEL_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# IDX data type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# "train-images-idx3-ubyte.gz" -> stem "train-images", dimensions "3".
_IDX_NAME = re.compile(r"^(?P<stem>.*?)[-.]?idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$")
_IDX_KIND_SUFFIX = re.compile(r"[-._](images|labels)$")
_CIFAR_BATCH_NAME = re.compile(r"^(data_batch_(?P<number>\d+)|test_batch)$")
_CIFAR_META_NAME = "batches.meta"
_CIFAR_SIDE = 32

# Everything a CIFAR batch pickle may reference: numpy array reconstruction (old and new numpy
# module paths, pickle protocols 2 to 5) and the bytes helper protocol-2 pickles use. Refusing
# the rest means a crafted "batch" cannot run code when it is loaded.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class SourceError(UserError, ValueError):
    """A source is missing, empty or malformed; the message names the path and the fault."""


@dataclass(frozen=True)
class ArrayPart:
    """One file pair or batch of an array-based source, fully in memory.

    Attributes:
        name: The part's name: the IDX prefix (``train``, ``t10k``) or the CIFAR batch file name.
        images: uint8 pixels, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB.
        labels: ``(N,)`` int64 label indices into ``label_names``.
        label_names: ``label_names[i]`` is the class name of label index ``i``; the same list
            for every part of one source.

    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]


def detect_format(source: Path) -> SourceFormat:
    """Name the format of an ingest source.

    Args:
        source: A directory, or a single MNIST IDX images file.

    Returns:
        ``"mnist-idx"`` for an IDX file or a directory holding IDX files, ``"cifar10"`` for a
        directory holding CIFAR-10 python batches, ``"folder"`` for any other directory.

    Raises:
        SourceError: The path does not exist, is an empty directory, or is a file of neither
            array format.

    """
    source = Path(source)
    if not source.exists():
        raise SourceError(f"source not found: {source}")
    if source.is_file():
        if _IDX_NAME.match(source.name):
            return "mnist-idx"
        raise SourceError(
            f"source is a file but not an MNIST IDX file (name like "
            f"train-images-idx3-ubyte[.gz]): {source}; pass a directory for other formats"
        )
    if not source.is_dir():
        raise SourceError(f"source is neither a file nor a directory: {source}")
    names = [path.name for path in source.iterdir() if not path.name.startswith(".")]
    if not names:
        raise SourceError(f"source is empty: {source}")
    if any(_IDX_NAME.match(name) for name in names):
        return "mnist-idx"
    if any(_CIFAR_BATCH_NAME.match(name) for name in names):
        return "cifar10"
    return "folder"


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gunzipped on the fly when its name ends in ``.gz``).

    Args:
        path: The IDX file.

    Returns:
        Its array, in native byte order, with the dimensions from the header.

    Raises:
        SourceError: The file cannot be read, is not IDX, or its data is shorter or longer
            than the header says.

    """
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: cannot read IDX file: {_one_line(exc)}") from exc
    if len(raw) < 4:
        raise SourceError(f"{path}: not an IDX file: {len(raw)} bytes, shorter than the header")
    if raw[0] != 0 or raw[1] != 0:
        raise SourceError(f"{path}: not an IDX file: magic number must start with two zero bytes")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file: unknown data type code 0x{code:02X}")
    if ndim == 0:
        raise SourceError(f"{path}: not an IDX file: zero dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise SourceError(
            f"{path}: truncated IDX header: expected {header_size} bytes, found {len(raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        raise SourceError(f"{path}: expected {expected} bytes of data, found {found}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_mnist_idx(source: Path) -> list[ArrayPart]:
    """Read MNIST-style IDX files: one images file and its labels file per part.

    ``<prefix>-images-idx3-ubyte`` pairs with ``<prefix>-labels-idx1-ubyte`` (``.`` instead of
    ``-`` before ``idx``, and ``.gz`` on either, are accepted). When a file exists both plain
    and gzipped, the plain one is read. Label names are ``"0"`` to ``"9"`` when every label of
    every part lies in 0..9; otherwise they are the distinct label values of all parts, sorted
    numerically, and labels are re-indexed to match.

    Args:
        source: A directory of IDX files, or one images file (its labels file is looked for
            beside it).

    Returns:
        One :class:`ArrayPart` per pair, sorted by prefix; images are ``(N, H, W)`` uint8.

    Raises:
        SourceError: No images file is found, an images file has no labels file (or the other
            way round), counts differ, a file is malformed or holds the wrong kind of array.

    """
    source = Path(source)
    if source.is_file():
        match = _IDX_NAME.match(source.name)
        if match is None or match["ndim"] != "3":
            raise SourceError(f"{source}: not an MNIST IDX images file (idx3-ubyte)")
        prefix = _idx_prefix(match["stem"])
        _, labels_files = _idx_pairs(source.parent)
        images_files = {prefix: source}
        labels_files = {prefix: labels_files[prefix]} if prefix in labels_files else {}
    else:
        images_files, labels_files = _idx_pairs(source)
    if not images_files:
        raise SourceError(f"{source}: no MNIST IDX images files (name like *-images-idx3-ubyte)")
    for prefix, labels_path in labels_files.items():
        if prefix not in images_files:
            raise SourceError(f"{labels_path}: labels file without an images file")

    loaded: list[tuple[str, np.ndarray, np.ndarray]] = []
    for prefix in sorted(images_files):
        images_path = images_files[prefix]
        if prefix not in labels_files:
            raise SourceError(
                f"{images_path}: no labels file beside it "
                f"(expected {prefix}-labels-idx1-ubyte or .gz)"
            )
        labels_path = labels_files[prefix]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise SourceError(
                f"{images_path}: expected uint8 images of shape (N, H, W), "
                f"found {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise SourceError(
                f"{labels_path}: expected integer labels of shape (N,), "
                f"found {labels.dtype} {labels.shape}"
            )
        if len(images) != len(labels):
            raise SourceError(
                f"{images_path}: {len(images)} images but {labels_path.name} has "
                f"{len(labels)} labels"
            )
        loaded.append((prefix, images, labels.astype(np.int64)))

    values = np.unique(np.concatenate([labels for _, _, labels in loaded]))
    if values.size == 0 or (values.min() >= 0 and values.max() <= 9):
        values = np.arange(10)
    label_names = [str(value) for value in values]
    return [
        ArrayPart(prefix, images, np.searchsorted(values, labels).astype(np.int64), label_names)
        for prefix, images, labels in loaded
    ]


def read_cifar10(source: Path) -> list[ArrayPart]:
    """Read CIFAR-10 python batches.

    Args:
        source: The directory holding ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``
            (any subset), and optionally ``batches.meta`` with the class names.

    Returns:
        One :class:`ArrayPart` per batch file, training batches in number order, then
        ``test_batch``; images are ``(N, 32, 32, 3)`` uint8 RGB.

    Raises:
        SourceError: No batch is found, or a batch or the meta file is unreadable or malformed.

    """
    source = Path(source)
    batches = sorted(
        (path for path in source.iterdir() if _CIFAR_BATCH_NAME.match(path.name)),
        key=_cifar_batch_order,
    )
    if not batches:
        raise SourceError(f"{source}: no CIFAR-10 batches (data_batch_1 ... test_batch)")
    meta_path = source / _CIFAR_META_NAME
    label_names = (
        _read_cifar_label_names(meta_path) if meta_path.exists() else list(CIFAR10_LABEL_NAMES)
    )
    return [_read_cifar_batch(path, label_names) for path in batches]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzipped when the name ends in ``.gz``.

    Args:
        path: The file to write; its parent directory must exist.
        array: Any array whose dtype IDX can hold (uint8, int8, int16, int32, float32, float64).

    Raises:
        ValueError: IDX cannot hold the array's dtype or it has no dimensions.

    """
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX holds 1 to 255 dimensions, got {array.ndim}")
    matches = [
        (code, dtype)
        for code, dtype in _IDX_DTYPES.items()
        if (dtype.kind, dtype.itemsize) == (array.dtype.kind, array.dtype.itemsize)
    ]
    if not matches:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    code, dtype = matches[0]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if Path(path).name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def write_cifar10_batch(
    path: Path,
    images: np.ndarray,
    labels: Sequence[int],
    filenames: Sequence[str] | None = None,
) -> None:
    """Write a CIFAR-10 python batch as the dataset ships it (pickle protocol 2, bytes keys).

    Args:
        path: The file to write, e.g. ``.../data_batch_1``.
        images: ``(N, 32, 32, 3)`` uint8 RGB.
        labels: ``N`` label indices.
        filenames: Optional ``N`` original file names.

    Raises:
        ValueError: Shapes or lengths disagree.

    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"expected uint8 images (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if len(labels) != len(images) or (filenames is not None and len(filenames) != len(images)):
        raise ValueError("images, labels and filenames must have the same length")
    # The dataset stores each image channel-major: 1024 red, 1024 green, 1024 blue values.
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    batch: dict[bytes, Any] = {
        b"batch_label": Path(path).name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": data,
    }
    if filenames is not None:
        batch[b"filenames"] = [name.encode() for name in filenames]
    with open(path, "wb") as stream:
        pickle.dump(batch, stream, protocol=2)


def write_cifar10_meta(path: Path, label_names: Sequence[str]) -> None:
    """Write a CIFAR-10 ``batches.meta`` file.

    Args:
        path: The file to write, normally ``.../batches.meta``.
        label_names: Class names by label index.

    """
    meta = {
        b"num_cases_per_batch": 10000,
        b"label_names": [name.encode() for name in label_names],
        b"num_vis": 3 * _CIFAR_SIDE * _CIFAR_SIDE,
    }
    with open(path, "wb") as stream:
        pickle.dump(meta, stream, protocol=2)


def _one_line(exc: BaseException) -> str:
    """Return an exception's message on one line (its class name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    """Open a file for reading, through gzip when its name ends in ``.gz``."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


def _idx_prefix(stem: str) -> str:
    """``train-images`` -> ``train``: the part name shared by an images and a labels file."""
    return _IDX_KIND_SUFFIX.sub("", stem)


def _idx_pairs(directory: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Find IDX images (idx3) and labels (idx1) files in a directory, keyed by prefix.

    A plain file wins over its gzipped twin, so a directory with both reads one copy.
    """
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(directory.iterdir()):
        match = _IDX_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        key = (match["ndim"], _idx_prefix(match["stem"]))
        if key not in found or (found[key].name.endswith(".gz") and not match["gz"]):
            found[key] = path
    images = {prefix: path for (ndim, prefix), path in found.items() if ndim == "3"}
    labels = {prefix: path for (ndim, prefix), path in found.items() if ndim == "1"}
    return images, labels


def _cifar_batch_order(path: Path) -> tuple[int, int]:
    """Sort key: data batches by number, then the test batch."""
    match = _CIFAR_BATCH_NAME.match(path.name)
    number = match["number"] if match else None
    return (0, int(number)) if number is not None else (1, 0)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a CIFAR batch needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[Any, Any]:
    """Load a CIFAR pickle (Python 2 byte strings stay bytes) into a dict."""
    try:
        raw = path.read_bytes()
        loaded = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle raises almost anything on a damaged file
        raise SourceError(f"{path}: unreadable CIFAR-10 pickle: {_one_line(exc)}") from exc
    if not isinstance(loaded, dict):
        raise SourceError(f"{path}: expected a pickled dict, found {type(loaded).__name__}")
    return loaded


def _get(batch: dict[Any, Any], key: str) -> Any:
    """Look up a key stored as bytes (the dataset as shipped) or as str (re-pickled copies)."""
    return batch.get(key.encode(), batch.get(key))


def _read_cifar_label_names(path: Path) -> list[str]:
    """Class names from ``batches.meta``."""
    names = _get(_load_pickle(path), "label_names")
    if not isinstance(names, list) or not names:
        raise SourceError(f"{path}: no label_names list")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _read_cifar_batch(path: Path, label_names: list[str]) -> ArrayPart:
    """One batch file -> ArrayPart with (N, 32, 32, 3) images."""
    batch = _load_pickle(path)
    data, labels = _get(batch, "data"), _get(batch, "labels")
    pixels = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise SourceError(f"{path}: 'data' must be a uint8 array of shape (N, {pixels})")
    if data.shape[1] != pixels:
        raise SourceError(f"{path}: 'data' rows hold {data.shape[1]} values, expected {pixels}")
    if labels is None:
        raise SourceError(f"{path}: no 'labels' entry")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.shape != (len(data),):
        raise SourceError(f"{path}: {len(data)} images but {label_array.size} labels")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(label_names)):
        raise SourceError(
            f"{path}: labels must lie in 0..{len(label_names) - 1}, found "
            f"{label_array.min()}..{label_array.max()}"
        )
    images = data.reshape(len(data), 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return ArrayPart(path.name, np.ascontiguousarray(images), label_array, list(label_names))
