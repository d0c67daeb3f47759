"""Compact image cells (``ingest.storage``): raw, PNG and JPEG through the one contract."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines import schema
from pipelines.train.arrow_reader import decode_column
from pipelines.train.feed import ImageShapeError


def _photos(count: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth random images (a photo's statistics, roughly: JPEG keeps them close)."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((count, *shape), np.uint8)
    for i in range(count):
        a, b, c = rng.uniform(0.05, 0.3, 3)
        for ch in range(channels):
            wave = np.sin(a * x + b * y + c * ch + i) * 90 + 128 + ch * 10
            out[i, :, :, ch] = np.clip(wave, 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 12, 3)])
def test_every_storage_round_trips_through_decode_cells(shape: tuple[int, int, int]) -> None:
    images = _photos(5, shape)
    for storage in schema.STORAGES:
        cells = [schema.encode_cell(image, storage, quality=95) for image in images]
        assert all(schema.cell_storage(cell) == storage for cell in cells)
        assert all(schema.cell_matches(cell, shape) for cell in cells)
        assert schema.stored_array(cells[0]) == (shape, np.dtype(np.uint8))
        decoded = schema.decode_cells(cells, shape)
        assert decoded.shape == (5, *shape) and decoded.dtype == np.uint8
        error = np.abs(decoded.astype(int) - images).mean()
        if storage == "jpeg":
            assert 0 < error < 4  # lossy, but close
        else:
            np.testing.assert_array_equal(decoded, images)  # lossless


def test_jpeg_is_much_smaller_than_raw_for_photos() -> None:
    image = _photos(1, (224, 224, 3))[0]
    raw, png, jpeg = (len(schema.encode_cell(image, s, 90)) for s in schema.STORAGES)
    assert raw == schema.cell_size((224, 224, 3))
    assert jpeg < raw / 4 and png < raw


def test_cells_of_another_shape_or_mode_are_refused() -> None:
    shape = (8, 8, 3)
    good = schema.encode_cell(_photos(1, shape)[0], "png")
    other = schema.encode_cell(_photos(1, (8, 9, 3))[0], "png")
    grey = schema.encode_cell(_photos(1, (8, 8, 1))[0], "jpeg")
    for bad in (other, grey, good[:20]):
        with pytest.raises(schema.CellError) as caught:
            schema.decode_cells([good, bad], shape)
        assert caught.value.cell == bad
    assert not schema.cell_matches(other, shape)
    assert schema.cell_storage(b"GIF89a") is None
    with pytest.raises(ValueError, match="storage must be one of raw, png, jpeg"):
        schema.encode_cell(np.zeros(shape, np.uint8), "webp")


@pytest.mark.parametrize("storage", schema.STORAGES)
def test_the_arrow_reader_decodes_every_storage(storage: str) -> None:
    shape = (10, 10, 3)
    images = _photos(6, shape)
    column = pa.array([schema.encode_cell(image, storage, 95) for image in images], pa.binary())
    expected = schema.decode_cells(column.to_pylist(), shape)
    np.testing.assert_array_equal(decode_column(column, shape), expected)
    np.testing.assert_array_equal(decode_column(column.slice(2, 3), shape), expected[2:5])
    with pytest.raises(ImageShapeError, match=r"images of shape \(10, 10, 3\), expected"):
        decode_column(column, (12, 12, 3))
