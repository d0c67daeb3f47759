"""Unit tests for pipelines.images: real image files of every format and colour mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    encode_png,
    is_image_path,
    normalise,
    prepare_array,
)


def _save(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
        axis=-1,
    ).astype(np.uint8)


def _solid(mode: str, colour: object, size: tuple[int, int] = (20, 16)) -> Image.Image:
    return Image.new(mode, size, colour)


# --- every colour mode, saved in every format that can hold it ------------------------------

# (source mode, format, a solid colour in that mode, expected RGB after decoding)
SOLID_CASES = [
    ("1", "PNG", 1, (255, 255, 255)),
    ("1", "BMP", 0, (0, 0, 0)),
    ("1", "TIFF", 1, (255, 255, 255)),
    ("L", "PNG", 77, (77, 77, 77)),
    ("L", "JPEG", 77, (77, 77, 77)),
    ("L", "BMP", 77, (77, 77, 77)),
    ("L", "GIF", 77, (77, 77, 77)),
    ("L", "TIFF", 77, (77, 77, 77)),
    ("L", "WEBP", 77, (77, 77, 77)),
    ("RGB", "PNG", (200, 30, 90), (200, 30, 90)),
    ("RGB", "JPEG", (200, 30, 90), (200, 30, 90)),
    ("RGB", "BMP", (200, 30, 90), (200, 30, 90)),
    ("RGB", "GIF", (200, 30, 90), (200, 30, 90)),
    ("RGB", "TIFF", (200, 30, 90), (200, 30, 90)),
    ("RGB", "WEBP", (200, 30, 90), (200, 30, 90)),
    ("RGBA", "PNG", (200, 30, 90, 255), (200, 30, 90)),
    ("RGBA", "TIFF", (200, 30, 90, 255), (200, 30, 90)),
    ("RGBA", "WEBP", (200, 30, 90, 255), (200, 30, 90)),
    ("LA", "PNG", (77, 255), (77, 77, 77)),
    ("LA", "TIFF", (77, 255), (77, 77, 77)),
    # CMYK (0, 255, 255, 0) is pure red; JPEG and TIFF both keep CMYK.
    ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),
    ("CMYK", "TIFF", (0, 255, 255, 0), (255, 0, 0)),
    ("YCbCr", "JPEG", (128, 128, 128), (128, 128, 128)),
    ("YCbCr", "TIFF", (128, 128, 128), (128, 128, 128)),
]


@pytest.mark.parametrize(("mode", "fmt", "colour", "expected"), SOLID_CASES)
def test_solid_colour_survives_every_mode_and_format(
    mode: str, fmt: str, colour: object, expected: tuple[int, int, int]
) -> None:
    # Pillow cannot read back its own uncompressed YCbCr TIFF ("image file is truncated").
    options = {"compression": "tiff_lzw"} if (mode, fmt) == ("YCbCr", "TIFF") else {}
    data = _save(_solid(mode, colour), fmt, **options)
    rgb = decode_image(data, 12, 3)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8
    # Lossy formats (JPEG, WebP) and palette quantisation (GIF) may move a solid colour a bit.
    assert np.abs(rgb.astype(int) - expected).max() <= 3, (mode, fmt, rgb[0, 0])
    grey = decode_image(data, 7, 1)
    assert grey.shape == (7, 7, 1) and grey.dtype == np.uint8
    luma = Image.new("RGB", (1, 1), expected).convert("L").getpixel((0, 0))
    assert np.abs(grey.astype(int) - luma).max() <= 3, (mode, fmt, grey[0, 0])


def test_palette_image_uses_its_palette() -> None:
    img = Image.new("P", (8, 8), 0)
    palette = [0, 0, 0] * 256
    palette[3:6] = [10, 220, 40]
    img.putpalette(palette)
    img.paste(1, (0, 0, 4, 8))
    for fmt in ("PNG", "GIF", "BMP", "TIFF"):
        out = decode_image(_save(img, fmt), 8, 3)
        assert out[:, :4].tolist() == [[[10, 220, 40]] * 4] * 8, fmt
        assert out[:, 4:].tolist() == [[[0, 0, 0]] * 4] * 8, fmt


def test_palette_transparency_is_composited_over_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 10, 220, 40] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 4, 8))
    for fmt in ("PNG", "GIF"):
        data = _save(img, fmt, transparency=0)
        out = decode_image(data, 8, 3)
        assert out[:, :4].tolist() == [[[10, 220, 40]] * 4] * 8, fmt
        assert out[:, 4:].tolist() == [[[255, 255, 255]] * 4] * 8, fmt


def test_palette_with_alpha_mode_pa() -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 220, 40] + [0, 0, 0] * 254)
    alpha = Image.new("L", (8, 8), 255)
    alpha.paste(0, (4, 0, 8, 8))
    pa = img.convert("PA")
    pa.putalpha(alpha)
    data = _save(pa, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    out = decode_image(data, 8, 3)
    assert out[:, :4].tolist() == [[[10, 220, 40]] * 4] * 8
    assert out[:, 4:].tolist() == [[[255, 255, 255]] * 4] * 8


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_rgba_alpha_is_composited_over_white(fmt: str) -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., 0] = 200  # red everywhere ...
    pixels[:, :4, 3] = 0  # ... fully transparent on the left,
    pixels[:, 4:, 3] = 255  # opaque on the right.
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_save(Image.fromarray(pixels), fmt, **kwargs), 8, 3)
    assert out[:, :4].tolist() == [[[255, 255, 255]] * 4] * 8
    assert out[:, 4:].tolist() == [[[200, 0, 0]] * 4] * 8


def test_half_transparent_grey_blends_with_white() -> None:
    img = _solid("LA", (0, 128), (4, 4))
    out = decode_image(_save(img, "PNG"), 4, 1)
    # 0 * 128/255 + 255 * (1 - 128/255) = 127
    assert np.abs(out.astype(int) - 127).max() <= 1


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I;16L", "TIFF"), ("I;16B", "PNG")],
)
def test_16_bit_grey_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    # Built from raw bytes: Pillow's convert() between 16-bit modes clips to 255.
    byte_order = ">u2" if mode == "I;16B" else "<u2"
    img = Image.frombytes(mode, (4, 4), values.astype(byte_order).tobytes())
    data = _save(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data, 4, 1)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_int_mode_i() -> None:
    wide = Image.fromarray(np.array([[0, 1000, 65535, 70000]] * 4, dtype=np.int32))
    data = _save(wide, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    # Above 255 the values are read as 16-bit; beyond 65535 they saturate.
    assert decode_image(data, 4, 1)[0, :, 0].tolist() == [0, 4, 255, 255]
    narrow = Image.fromarray(np.array([[0, 10, 200, 255]] * 4, dtype=np.int32))
    # An I image whose values fit in 8 bits keeps them.
    assert decode_image(_save(narrow, "TIFF"), 4, 1)[0, :, 0].tolist() == [0, 10, 200, 255]


def test_float_mode_f_is_min_max_scaled() -> None:
    values = np.array([[-1.0, 0.0, 1.0, 3.0]] * 4, dtype=np.float32)
    data = _save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert decode_image(data, 4, 1)[0, :, 0].tolist() == [0, 64, 128, 255]
    constant = _save(Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32)), "TIFF")
    assert decode_image(constant, 4, 3).max() == 0


def test_grey_from_colour_is_pillow_luma() -> None:
    pixels = _gradient_rgb(16, 16)
    data = _save(Image.fromarray(pixels), "PNG")
    expected = np.asarray(Image.fromarray(pixels).convert("L"))
    assert np.array_equal(decode_image(data, 16, 1)[..., 0], expected)


def test_grey_to_rgb_replicates_the_channel() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(_save(Image.fromarray(grey), "PNG"), 8, 3)
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("size", [1, 8, 28, 32, 64, 100])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_dtype(size: int, channels: int) -> None:
    data = _save(Image.fromarray(_gradient_rgb()), "PNG")
    out = decode_image(data, size, channels)
    assert out.shape == (size, size, channels)
    assert out.dtype == np.uint8
    assert out.flags.writeable and out.flags.c_contiguous


def test_resize_stretches_whole_image_bilinearly() -> None:
    # Left half black, right half white: a stretch keeps that split, a crop would not.
    pixels = np.zeros((10, 40), dtype=np.uint8)
    pixels[:, 20:] = 255
    out = decode_image(_save(Image.fromarray(pixels), "PNG"), 8, 1)[..., 0]
    assert (out[:, :3] == 0).all() and (out[:, 5:] == 255).all()
    expected = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BILINEAR))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_large_jpeg_uses_draft_and_stays_close_to_full_decode() -> None:
    pixels = _gradient_rgb(512, 512)
    data = _save(Image.fromarray(pixels), "JPEG", quality=95)
    out = decode_image(data, 64, 3)
    reference = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR))
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - reference).mean() < 3
    grey = decode_image(data, 64, 1)[..., 0].astype(int)
    reference_grey = np.asarray(Image.fromarray(reference).convert("L"))
    assert np.abs(grey - reference_grey).mean() < 3


def test_animated_gif_uses_first_frame() -> None:
    frames = [_solid("RGB", (255, 0, 0), (8, 8)), _solid("RGB", (0, 0, 255), (8, 8))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2
    out = decode_image(buffer.getvalue(), 8, 3)
    assert out[0, 0].tolist() == [255, 0, 0]


def test_multi_page_tiff_uses_first_page() -> None:
    pages = [_solid("L", 10, (8, 8)), _solid("L", 240, (8, 8))]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    out = decode_image(buffer.getvalue(), 8, 1)
    assert (out == 10).all()


# --- bad input: always ImageDecodeError with a one-line reason ------------------------------


def _assert_reason(exc: pytest.ExceptionInfo[ImageDecodeError], *starts: str) -> None:
    reason = str(exc.value)
    assert reason and "\n" not in reason
    assert "0x" not in reason  # no "<_io.BytesIO object at 0x...>" noise
    assert reason.startswith(starts), reason


@pytest.mark.parametrize("data", [b"", None])
def test_empty_input(data: bytes | None) -> None:
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data, 8, 3)
    assert str(exc.value) == "empty file"


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file\nwith two lines\n" * 20,
        np.random.default_rng(1).bytes(4096),
        b"\x00" * 1000,
    ],
    ids=["text", "random", "zeros"],
)
def test_non_images_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data, 8, 3)
    assert str(exc.value) == "not an image: cannot identify image file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "TIFF"])
def test_file_cut_in_half_is_truncated(fmt: str) -> None:
    data = _save(Image.fromarray(_gradient_rgb(128, 128)), fmt)
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data[: len(data) // 2], 16, 3)
    _assert_reason(exc, "truncated image: ")


def test_cut_webp_is_rejected() -> None:
    data = _save(Image.fromarray(_gradient_rgb(128, 128)), "WEBP")
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data[: len(data) // 2], 16, 3)
    _assert_reason(exc, "truncated image: ", "corrupt image: ")


def test_corrupt_png_body_is_rejected() -> None:
    data = bytearray(_save(Image.fromarray(_gradient_rgb()), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(range(64))  # scramble the compressed pixels
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(bytes(data), 16, 3)
    _assert_reason(exc, "truncated image: ", "corrupt image: ")


def test_decompression_bomb_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _save(Image.fromarray(_gradient_rgb(64, 64)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x limit
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data, 8, 3)
    _assert_reason(exc, "decompression bomb: ")


@pytest.mark.parametrize(("size", "channels"), [(0, 3), (-1, 1), (8, 2), (8, 4), (2.5, 3)])
def test_invalid_target_is_a_caller_error(size: int, channels: int) -> None:
    data = _save(Image.fromarray(_gradient_rgb()), "PNG")
    with pytest.raises(ValueError) as exc:
        decode_image(data, size, channels)
    assert not isinstance(exc.value, ImageDecodeError)


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("cat.png", True),
        ("/data/cats/C.JPG", True),
        ("file:/a/b/C.JPG", True),
        ("s3://bucket/x/y.Jpeg", True),
        ("dbfs:/mnt/img/scan.TIFF", True),
        ("a/b.tif", True),
        ("a/b.webp", True),
        ("a/b.bmp", True),
        ("a/b.gif", True),
        ("notes.txt", False),
        ("archive.png.zip", False),
        ("file:/a/b.jpg/readme", False),
        ("/data/.png", False),
        ("/data/png", False),
        ("", False),
    ],
)
def test_is_image_path(path: str, expected: bool) -> None:
    assert is_image_path(path) is expected


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert IMAGE_EXTENSIONS == {
        ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    }  # fmt: skip


# --- normalise ------------------------------------------------------------------------------


def test_normalise_range_and_dtype() -> None:
    batch = np.arange(256, dtype=np.uint8).reshape(2, 2, 8, 8, 1)
    out = normalise(batch)
    assert out.dtype == np.float32 and out.shape == batch.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.allclose(out, batch / 255.0, atol=1e-7)
    assert batch.max() == 255  # input untouched


def test_normalise_rejects_non_uint8() -> None:
    with pytest.raises(TypeError):
        normalise(np.zeros((2, 2), dtype=np.float32))


# --- prepare_array --------------------------------------------------------------------------


def test_prepare_array_grey_hw_and_hw1() -> None:
    digit = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    same = prepare_array(digit, 28, 1)
    assert same.shape == (28, 28, 1) and np.array_equal(same[..., 0], digit)
    assert np.array_equal(prepare_array(digit[..., None], 28, 1), same)
    rgb = prepare_array(digit, 28, 3)
    assert rgb.shape == (28, 28, 3) and np.array_equal(rgb, np.repeat(same, 3, axis=2))
    bigger = prepare_array(digit, 64, 1)
    assert bigger.shape == (64, 64, 1) and bigger.dtype == np.uint8


def test_prepare_array_rgb_and_rgba() -> None:
    pixels = _gradient_rgb(32, 32)
    assert np.array_equal(prepare_array(pixels, 32, 3), pixels)
    grey = prepare_array(pixels, 32, 1)
    assert np.array_equal(grey[..., 0], np.asarray(Image.fromarray(pixels).convert("L")))
    rgba = np.concatenate([pixels, np.zeros((32, 32, 1), dtype=np.uint8)], axis=2)
    rgba[:16, :, 3] = 255
    out = prepare_array(rgba, 32, 3)
    assert np.array_equal(out[:16], pixels[:16])
    assert (out[16:] == 255).all()


def test_prepare_array_matches_decode_image() -> None:
    pixels = _gradient_rgb(40, 56)
    for channels in (1, 3):
        decoded = decode_image(_save(Image.fromarray(pixels), "PNG"), 24, channels)
        assert np.array_equal(prepare_array(pixels, 24, channels), decoded)


def test_prepare_array_scales_wide_dtypes() -> None:
    wide = np.array([[0, 32768, 65535]], dtype=np.uint16)
    assert prepare_array(wide, 3, 1)[0, :, 0].tolist() == [0, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float64)
    assert prepare_array(floats, 3, 1)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("shape", [(8,), (8, 8, 2), (8, 8, 5), (2, 8, 8, 3), (0, 8)])
def test_prepare_array_rejects_odd_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageDecodeError):
        prepare_array(np.zeros(shape, dtype=np.uint8), 8, 1)


# --- encode_png -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_encode_png_round_trip(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    back = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(back, pixels.reshape(back.shape))


def test_encode_png_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))


# --- EXIF orientation: applied, in ingest, scoring and serving alike -------------------------


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (1, lambda a: a),
        (2, np.fliplr),
        (3, lambda a: np.rot90(a, 2)),
        (4, np.flipud),
        (5, lambda a: np.rot90(np.fliplr(a), 1)),
        (6, lambda a: np.rot90(a, -1)),
        (7, lambda a: np.rot90(np.fliplr(a), -1)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(orientation: int, upright) -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # every pixel distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    assert decode_image(data, 8, 1)[..., 0].tolist() == upright(pixels).tolist()


def test_exif_rotation_of_a_jpeg_photo() -> None:
    pixels = np.full((12, 24, 3), 255, np.uint8)
    pixels[:, :12] = 0  # left half black; orientation 6: rotate 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_save(Image.fromarray(pixels), "JPEG", exif=exif.tobytes()), 12, 1)
    assert out[:6].mean() < 40 and out[6:].mean() > 215  # black on top


def test_image_between_the_bomb_limit_and_twice_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pillow only warns there, then decodes; a small file could declare gigapixels."""
    data = _save(Image.fromarray(_gradient_rgb(64, 64)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 px: within 2 x limit
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageDecodeError) as exc:
        decode_image(data, 8, 3)
    _assert_reason(exc, "decompression bomb: ")


def test_large_jpeg_counts_at_its_draft_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A big photo decoded at 1/8 scale in the DCT domain is no bomb; the same as PNG is."""
    pixels = Image.fromarray(_gradient_rgb(512, 512))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150_000)  # 262,144 px: within 2 x limit
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(_save(pixels, "JPEG"), 64, 3).shape == (64, 64, 3)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageDecodeError):
        decode_image(_save(pixels, "PNG"), 64, 3)
