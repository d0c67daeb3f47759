"""Which location a failed read or write blames, and what a scoring source is by content.

No Spark here: the driver's own file errors (``OSError``) and Parquet footers written with
pyarrow; Spark's errors are met for real in ``tests/integration/test_storage_errors.py``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import StorageError, UserError
from pipelines.score import _is_table
from pipelines.spark import Access, _one_line, storage_errors

OUT = Access("write the dataset", "/data/out/prepared", "choose another --output")
SRC = Access("read the source", "/data/in", "check it")


def _raise_in(exc: BaseException) -> BaseException:
    with pytest.raises(BaseException) as caught, storage_errors(SRC, OUT):
        raise exc
    return caught.value


@pytest.mark.parametrize(
    ("mentioned", "blamed"),
    [
        ("/data/out/prepared/split=train/part-0.parquet", OUT),  # inside it
        ("/data/out", OUT),  # a folder above it
        ("/data/out/.prepared.tmp-1a2b/_staging/7", OUT),  # its staging folder beside it
        ("/data/in/3/x.png", SRC),
    ],
)
def test_an_os_error_is_blamed_on_the_location_it_names(mentioned, blamed):
    error = _raise_in(PermissionError(13, "Permission denied", mentioned))
    assert isinstance(error, StorageError)
    assert str(error) == (
        f"cannot {blamed.action} {blamed.where}: [Errno 13] Permission denied: "
        f"'{mentioned}'; {blamed.fix}"
    )


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/data/other/x"),  # no location of the stage
        PermissionError(13, "Permission denied", "/data/out/prepared-old"),  # a namesake
        UserError("already one line"),
        RuntimeError("/data/out/prepared is not an OSError nor Spark's: a bug keeps its trace"),
    ],
)
def test_other_errors_pass_unchanged(error):
    assert _raise_in(error) is error


def test_a_task_traceback_gives_its_last_line():
    message = (
        "Job aborted due to stage failure\n  An exception was thrown from the Python worker.\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "PermissionError: [Errno 13] Permission denied: '/data/out/x'\n"
    )
    assert _one_line(message) == "PermissionError: [Errno 13] Permission denied: '/data/out/x'"
    assert _one_line("Path does not exist: file:/x.\nmore\n") == "Path does not exist: file:/x."


def _images_table(path: Path, columns: tuple[str, ...] = ("path", "content")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({name: [b"x"] for name in columns}), path)


def test_a_source_is_a_table_only_by_its_content(tmp_path):
    flat = tmp_path / "flat"
    _images_table(flat / "part-00000.parquet")
    (flat / "_SUCCESS").write_bytes(b"")
    partitioned = tmp_path / "partitioned"
    _images_table(partitioned / "day=2026-12-01" / "part-00000.snappy.parquet")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG")
    (images / "_SUCCESS").write_bytes(b"")
    other = tmp_path / "other"
    _images_table(other / "inventory.parquet", ("id", "note"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part-00000.parquet").write_bytes(b"not parquet at all")
    hidden = tmp_path / "hidden"
    _images_table(hidden / "_temporary" / "part-00000.parquet")

    assert _is_table(flat, "auto", "content") and _is_table(partitioned, "auto", "content")
    assert _is_table(flat / "part-00000.parquet", "auto", "content")
    for folder in (images, other, corrupt, hidden):
        assert not _is_table(folder, "auto", "content"), folder
    assert not _is_table(flat, "auto", "image_bytes")  # the configured column is missing
    assert _is_table(images, "table", "content") and not _is_table(flat, "images", "content")
