"""Unit tests for pipelines.sources: IDX and CIFAR-10 files written and read back."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipelines.sources import (
    CIFAR10_LABEL_NAMES,
    ArrayPart,
    SourceError,
    detect_format,
    read_cifar10,
    read_idx,
    read_mnist_idx,
    write_cifar10_batch,
    write_cifar10_meta,
    write_idx,
)

RNG = np.random.default_rng(7)


def _digits(count: int, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    images = RNG.integers(0, 256, (count, side, side), dtype=np.uint8)
    labels = RNG.integers(0, 10, count, dtype=np.uint8)
    return images, labels


def _write_mnist(folder: Path, prefix: str, count: int, gz: bool = False, dot: bool = False):
    images, labels = _digits(count)
    sep = "." if dot else "-"
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels)
    return images, labels


# --- IDX ------------------------------------------------------------------------------------


def test_idx_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "x-images-idx3-ubyte"
    write_idx(path, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    raw = path.read_bytes()
    # magic 00 00 08 03, then dims 2, 3, 4 big-endian, then the data.
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04"
    assert raw[16:] == bytes(range(24))


@pytest.mark.parametrize("dtype", ["u1", "i1", "<i2", "<i4", "<f4", "<f8"])
def test_idx_round_trip_every_dtype(tmp_path: Path, dtype: str) -> None:
    array = (np.arange(60) - 30).astype(dtype).reshape(3, 4, 5)
    if dtype == "u1":
        array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    path = tmp_path / "a.idx"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert np.array_equal(back, array)


def test_idx_big_endian_data_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "w.idx"
    write_idx(path, np.array([1, 258], dtype=np.int16))
    assert path.read_bytes()[4:] == b"\x00\x00\x00\x02" + b"\x00\x01\x01\x02"
    assert read_idx(path).tolist() == [1, 258]


def test_idx_gz_is_gunzipped(tmp_path: Path) -> None:
    images, _ = _digits(5)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, images)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    assert np.array_equal(read_idx(path), images)


def test_truncated_idx_names_file_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: 16 + 100])
    with pytest.raises(SourceError) as exc:
        read_idx(path)
    message = str(exc.value)
    assert str(path) in message and "\n" not in message
    assert "expected 7840 bytes of data, found 100" in message


def test_truncated_gz_idx_names_file(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SourceError) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_idx_with_trailing_bytes_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(SourceError, match="expected 4 bytes of data, found 9"):
        read_idx(path)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "shorter than the header"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "two zero bytes"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown data type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
    ],
)
def test_malformed_idx_header(tmp_path: Path, raw: bytes, problem: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(SourceError) as exc:
        read_idx(path)
    assert str(path) in str(exc.value) and problem in str(exc.value)


def test_read_mnist_idx_pairs_parts_and_reads_exactly(tmp_path: Path) -> None:
    train = _write_mnist(tmp_path, "train", 12)
    test = _write_mnist(tmp_path, "t10k", 5, gz=True)
    parts = read_mnist_idx(tmp_path)
    assert [part.name for part in parts] == ["t10k", "train"]
    for part, (images, labels) in zip(parts, [test, train], strict=True):
        assert isinstance(part, ArrayPart)
        assert part.images.dtype == np.uint8 and np.array_equal(part.images, images)
        assert part.labels.dtype == np.int64 and np.array_equal(part.labels, labels)
        assert part.label_names == [str(d) for d in range(10)]


def test_read_mnist_idx_dot_names_and_single_file(tmp_path: Path) -> None:
    images, labels = _write_mnist(tmp_path, "train", 4, dot=True)
    _write_mnist(tmp_path, "t10k", 3, dot=True)
    assert [part.name for part in read_mnist_idx(tmp_path)] == ["t10k", "train"]
    (part,) = read_mnist_idx(tmp_path / "train-images.idx3-ubyte")
    assert part.name == "train" and np.array_equal(part.images, images)
    assert np.array_equal(part.labels, labels)


def test_plain_file_wins_over_gz_twin(tmp_path: Path) -> None:
    images, labels = _write_mnist(tmp_path, "train", 4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), dtype=np.uint8))
    (part,) = read_mnist_idx(tmp_path)
    assert np.array_equal(part.images, images)


def test_labels_outside_0_to_9_are_reindexed_consistently(tmp_path: Path) -> None:
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([26, 1, 12], dtype=np.uint8))
    write_idx(tmp_path / "test-images-idx3-ubyte", images[:2])
    write_idx(tmp_path / "test-labels-idx1-ubyte", np.array([12, 12], dtype=np.uint8))
    test, train = read_mnist_idx(tmp_path)
    assert train.label_names == test.label_names == ["1", "12", "26"]
    assert train.labels.tolist() == [2, 0, 1]
    assert test.labels.tolist() == [1, 1]


def test_images_without_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError) as exc:
        read_mnist_idx(tmp_path)
    assert "train-images-idx3-ubyte" in str(exc.value) and "labels" in str(exc.value)


def test_labels_without_images(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 2)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(SourceError, match="t10k-labels-idx1-ubyte"):
        read_mnist_idx(tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4, 4), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(SourceError, match="3 images but train-labels-idx1-ubyte has 2 labels"):
        read_mnist_idx(tmp_path)


def test_images_file_of_wrong_shape(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 16), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(SourceError, match=r"shape \(N, H, W\)"):
        read_mnist_idx(tmp_path)


# --- CIFAR-10 -------------------------------------------------------------------------------


def _cifar_images(count: int) -> np.ndarray:
    return RNG.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_cifar_batch_layout_is_channel_major(tmp_path: Path) -> None:
    images = _cifar_images(2)
    path = tmp_path / "data_batch_1"
    write_cifar10_batch(path, images, [3, 9], ["a.png", "b.png"])
    with open(path, "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    assert batch[b"data"].shape == (2, 3072) and batch[b"data"].dtype == np.uint8
    # First 1024 values are the red plane, row by row; then green; then blue.
    assert np.array_equal(batch[b"data"][1, :1024], images[1, :, :, 0].ravel())
    assert np.array_equal(batch[b"data"][1, 1024:2048], images[1, :, :, 1].ravel())
    assert np.array_equal(batch[b"data"][1, 2048:], images[1, :, :, 2].ravel())
    assert batch[b"labels"] == [3, 9] and batch[b"filenames"] == [b"a.png", b"b.png"]


def test_read_cifar10_round_trip_in_batch_order(tmp_path: Path) -> None:
    written = {}
    for name in ("test_batch", "data_batch_10", "data_batch_2", "data_batch_1"):
        images = _cifar_images(4)
        labels = RNG.integers(0, 10, 4).tolist()
        write_cifar10_batch(tmp_path / name, images, labels)
        written[name] = (images, labels)
    parts = read_cifar10(tmp_path)
    assert [part.name for part in parts] == [
        "data_batch_1", "data_batch_2", "data_batch_10", "test_batch",
    ]  # fmt: skip
    for part in parts:
        images, labels = written[part.name]
        assert part.images.shape == (4, 32, 32, 3) and part.images.dtype == np.uint8
        assert np.array_equal(part.images, images)
        assert part.labels.tolist() == labels
        assert part.label_names == list(CIFAR10_LABEL_NAMES)


def test_cifar_label_names_from_meta(tmp_path: Path) -> None:
    write_cifar10_batch(tmp_path / "data_batch_1", _cifar_images(2), [0, 2])
    write_cifar10_meta(tmp_path / "batches.meta", ["cat", "dog", "émeu"])
    (part,) = read_cifar10(tmp_path)
    assert part.label_names == ["cat", "dog", "émeu"]


def test_cifar_batch_pickled_by_modern_python(tmp_path: Path) -> None:
    # Protocol 5 with str keys: numpy arrays reconstruct through a different global.
    images = _cifar_images(3)
    data = images.transpose(0, 3, 1, 2).reshape(3, -1)
    with open(tmp_path / "test_batch", "wb") as stream:
        pickle.dump({"data": data, "labels": [1, 2, 3]}, stream, protocol=5)
    (part,) = read_cifar10(tmp_path)
    assert np.array_equal(part.images, images) and part.labels.tolist() == [1, 2, 3]


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with open(tmp_path / "data_batch_1", "wb") as stream:
        pickle.dump({b"data": _Exploit(), b"labels": []}, stream, protocol=2)
    with pytest.raises(SourceError, match=r"data_batch_1: .*refusing to load .*print"):
        read_cifar10(tmp_path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not a pickle at all", "unreadable CIFAR-10 pickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict"),
        (pickle.dumps({b"labels": [1]}, protocol=2), "'data' must be a uint8 array"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}),
            "rows hold 100 values",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
            "2 images but 1 labels",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
            "labels must lie in 0..9",
        ),
    ],
)
def test_bad_cifar_batch_names_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(SourceError) as exc:
        read_cifar10(tmp_path)
    assert str(path) in str(exc.value) and problem in str(exc.value)


def test_truncated_cifar_batch(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    write_cifar10_batch(path, _cifar_images(4), [0, 1, 2, 3])
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SourceError, match="data_batch_1: unreadable"):
        read_cifar10(tmp_path)


# --- detect_format --------------------------------------------------------------------------


def test_detect_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SourceError) as exc:
        detect_format(missing)
    assert str(exc.value) == f"source not found: {missing}"


def test_detect_empty_dir(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"")  # hidden files do not count
    with pytest.raises(SourceError) as exc:
        detect_format(tmp_path)
    assert str(exc.value) == f"source is empty: {tmp_path}"


@pytest.mark.parametrize("gz", [False, True])
def test_detect_mnist_dir_and_file(tmp_path: Path, gz: bool) -> None:
    _write_mnist(tmp_path, "train", 2, gz=gz)
    assert detect_format(tmp_path) == "mnist-idx"
    images_file = next(tmp_path.glob("train-images*"))
    assert detect_format(images_file) == "mnist-idx"


def test_detect_cifar(tmp_path: Path) -> None:
    write_cifar10_batch(tmp_path / "test_batch", _cifar_images(1), [0])
    write_cifar10_meta(tmp_path / "batches.meta", CIFAR10_LABEL_NAMES)
    (tmp_path / "readme.html").write_text("CIFAR-10")
    assert detect_format(tmp_path) == "cifar10"


def test_detect_folder(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"")
    assert detect_format(tmp_path) == "folder"


def test_detect_other_file(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(SourceError) as exc:
        detect_format(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_gzip_module_reads_what_write_idx_gzips(tmp_path: Path) -> None:
    # Files written for tests must be ordinary gzip, readable by anyone's tools.
    path = tmp_path / "x-labels-idx1-ubyte.gz"
    write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    assert gzip.decompress(path.read_bytes()) == b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02\x03"
