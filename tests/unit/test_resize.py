"""Resize modes (``ingest.resize``): real PIL images of odd aspect ratios, every mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.image_model import to_pixels
from pipelines.images import RESIZE_MODES, decode_image, prepare_array, resize_box

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _bands(colours: list[tuple[int, int, int]], band: int, height: int) -> np.ndarray:
    """A wide image of vertical bands, each ``band`` pixels wide, one colour each."""
    return np.concatenate(
        [np.full((height, band, 3), colour, dtype=np.uint8) for colour in colours], axis=1
    )


def _file(pixels: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _keras_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Keras' ``smart_resize`` crop window for a square target, as its source computes it."""
    crop_height = min(height, int(float(width)))
    crop_width = min(width, int(float(height)))
    top = int(float(height - crop_height) / 2)
    left = int(float(width - crop_width) / 2)
    return left, top, left + crop_width, top + crop_height


@pytest.mark.parametrize(("width", "height"), [(101, 37), (37, 101), (640, 480), (7, 8), (5, 5)])
def test_crop_box_is_keras_centre_square(width: int, height: int) -> None:
    assert resize_box(width, height, "crop") == _keras_crop_box(width, height)
    left, top, right, bottom = resize_box(width, height, "pad")
    assert right - left == bottom - top == max(width, height)
    assert resize_box(width, height, "stretch") == (0, 0, width, height)


def test_crop_keeps_the_centre_of_a_wide_image() -> None:
    pixels = _bands([RED, GREEN, BLUE], band=30, height=30)  # 90 x 30
    out = decode_image(_file(pixels), 15, 3, "crop")
    assert (out == GREEN).all()
    stretched = decode_image(_file(pixels), 15, 3)
    assert tuple(stretched[7, 0]) == RED and tuple(stretched[7, -1]) == BLUE


def test_crop_of_a_tall_photo_through_jpeg_draft_mode() -> None:
    # 120 x 360 JPEG: top third red, middle green, bottom blue; draft mode shrinks it first.
    pixels = np.transpose(_bands([RED, GREEN, BLUE], band=120, height=120), (1, 0, 2))
    out = decode_image(_file(np.ascontiguousarray(pixels), "JPEG", quality=95), 24, 3, "crop")
    assert out.shape == (24, 24, 3)
    assert np.abs(out.astype(int) - GREEN).max() < 40


def test_pad_letterboxes_in_black_and_keeps_the_whole_image() -> None:
    pixels = np.full((60, 20, 3), WHITE, dtype=np.uint8)  # tall: 20 wide, 60 high
    out = decode_image(_file(pixels), 30, 3, "pad")
    assert out.shape == (30, 30, 3)
    # The image scales to 10 x 30, centred: columns 10..19 white, the rest black.
    assert (out[:, 10:20] == 255).all()
    assert (out[:, :10] == 0).all() and (out[:, 20:] == 0).all()
    grey = decode_image(_file(pixels), 30, 1, "pad")
    assert grey.shape == (30, 30, 1) and (grey[:, 10:20] == 255).all() and grey[:, 0].max() == 0


def test_pad_keeps_the_aspect_ratio_of_a_wide_band_image() -> None:
    pixels = _bands([RED, GREEN, BLUE], band=40, height=30)  # 120 x 30, aspect 4:1
    out = decode_image(_file(pixels), 24, 3, "pad")
    # Scaled to 24 x 6, centred vertically at rows 9..14; black above and below.
    assert (out[:9] == 0).all() and (out[15:] == 0).all()
    assert tuple(out[12, 2]) == RED and tuple(out[12, 12]) == GREEN and tuple(out[12, -2]) == BLUE


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_every_mode_is_the_same_for_files_arrays_and_serving(resize: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (33, 71, 3), dtype=np.uint8)
    from_file = decode_image(_file(pixels), 16, 3, resize)
    assert np.array_equal(prepare_array(pixels, 16, 3, resize), from_file)
    assert np.array_equal(to_pixels(_file(pixels), 16, 3, resize), from_file)
    assert np.array_equal(to_pixels(pixels, 16, 3, resize), from_file)


def test_square_images_are_the_same_in_every_mode() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    outs = [decode_image(_file(pixels), 20, 3, mode) for mode in RESIZE_MODES]
    assert all(np.array_equal(outs[0], out) for out in outs[1:])


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="resize must be one of stretch, crop, pad"):
        decode_image(_file(np.zeros((4, 4, 3), np.uint8)), 4, 3, "squash")
