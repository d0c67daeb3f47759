"""Pure image functions shared by ingest (on Spark executors) and serving.

In: the bytes of an image file in any format Pillow reads (PNG, JPEG, BMP, GIF, TIFF, WebP),
or an already-decoded array (MNIST IDX gives ``HxW`` uint8, CIFAR-10 ``HxWx3`` uint8).
Out: a uint8 array of shape ``(size, size, channels)`` with ``channels`` 1 (grey) or 3 (RGB);
:func:`normalise` turns a batch of those into the float32 model input in [0, 1].

Every image goes through the same steps, so training and serving see identical pixels:
EXIF orientation applied (a photo is upright as its camera meant), colour mode to 8-bit
grey or RGB (alpha composited over white, 16-bit and float pixels
rescaled), then grey/RGB conversion, then a bilinear resize to ``size`` x ``size`` in one of
:data:`RESIZE_MODES` (:func:`resize_box` says where the image lands):

- ``stretch``: the whole image squeezed to the square (the aspect ratio is lost);
- ``crop``: the largest centred square of the image, as Keras'
  ``image_dataset_from_directory(crop_to_aspect_ratio=True)`` takes it;
- ``pad``: the whole image, letterboxed in black to a square, as Keras'
  ``pad_to_aspect_ratio=True`` does.
Bytes that cannot be decoded raise :class:`ImageDecodeError` (never a Pillow exception), whose
message is a one-line reason fit for a quarantine table.
"""

from __future__ import annotations

import io
import posixpath
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: How an image of another aspect ratio becomes a square (``ingest.resize``).
RESIZE_MODES: tuple[str, ...] = ("stretch", "crop", "pad")

#: The mode of models and datasets that recorded none (all of them before resize modes).
DEFAULT_RESIZE = "stretch"

#: File name extensions (lower case) that ingest treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)

# Pillow first shrinks by an integer factor with a box filter, then resamples the rest;
# from a gap of 3 on the result is indistinguishable from a full bilinear resize, and faster.
_REDUCING_GAP = 3.0

# Formats decoded by libjpeg, whose draft mode can downscale in the DCT domain.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})

# Pillow puts reprs such as "<_io.BytesIO object at 0x7f...>" into messages; they are noise.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


class ImageDecodeError(ValueError):
    """The input is not a decodable image; ``str(exc)`` is a short one-line reason."""


def is_image_path(path: str) -> bool:
    """Tell whether a path or URI names an image file, by its extension.

    Args:
        path: A local path or URI such as ``file:/data/cats/C.JPG``.

    Returns:
        True when the extension, compared case-insensitively, is in :data:`IMAGE_EXTENSIONS`.

    """
    name = path.rsplit("/", 1)[-1]
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(
    data: bytes | None, size: int, channels: int, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Decode the bytes of an image file into a fixed-size uint8 array.

    Only the first frame of an animated GIF or a multi-page TIFF is used. The whole file is
    decoded up front, so a truncated or corrupt file fails here rather than later. An EXIF
    orientation tag is applied (the image is rotated or mirrored as its camera meant). An
    image that would decode to more than Pillow's ``Image.MAX_IMAGE_PIXELS`` is refused
    before decoding; a JPEG counts at the size it decodes to (draft mode), so a large photo
    still passes.

    Args:
        data: The complete file contents.
        size: Side of the square output.
        channels: 1 for grey (Pillow's luma), 3 for RGB.
        resize: ``stretch``, ``crop`` or ``pad`` (:data:`RESIZE_MODES`).

    Returns:
        A new uint8 array of shape ``(size, size, channels)``.

    Raises:
        ImageDecodeError: The bytes are empty, not an image, truncated, corrupt, too large
            (a decompression bomb) or in a colour mode that cannot be converted.
        ValueError: ``size``, ``channels`` or ``resize`` is invalid.

    """
    _check_target(size, channels, resize)
    if not data:
        raise ImageDecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format in _JPEG_FORMATS:
            # DCT-domain downscaling by 1/2, 1/4 or 1/8 (never below size on either side, so
            # a centre crop keeps its full resolution): about 2x faster.
            img.draft("L" if channels == 1 else "RGB", (size, size))
        _check_pixels(img)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {_one_line(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image: cannot identify image file") from exc
    except Exception as exc:  # any failure inside Pillow's decoders means a bad file
        raise ImageDecodeError(_failure_reason(exc)) from exc
    return _convert_and_resize(_to_8bit_mode(img), size, channels, resize)


def prepare_array(
    array: np.ndarray, size: int, channels: int, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Apply :func:`decode_image`'s channel conversion and resize to a decoded array.

    Args:
        array: ``HxW``, ``HxWx1`` (grey), ``HxWx3`` (RGB) or ``HxWx4`` (RGBA) pixels. uint8 is
            used as it is; uint16 is scaled from 0..65535, other integers likewise when their
            maximum exceeds 255, floats are min-max scaled (as for Pillow modes I;16, I and F).
        size: Side of the square output.
        channels: 1 for grey, 3 for RGB.
        resize: ``stretch``, ``crop`` or ``pad`` (:data:`RESIZE_MODES`).

    Returns:
        A new uint8 array of shape ``(size, size, channels)``.

    Raises:
        ImageDecodeError: The array's shape or dtype is not one of the above, or it is empty.
        ValueError: ``size``, ``channels`` or ``resize`` is invalid.

    """
    _check_target(size, channels, resize)
    pixels = np.asarray(array)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"unsupported array shape {pixels.shape}: expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError(f"empty image: array shape {pixels.shape}")
    # fromarray infers L, RGB or RGBA from a C-contiguous uint8 array of these shapes.
    img = Image.fromarray(np.ascontiguousarray(_to_uint8(pixels)))
    return _convert_and_resize(img, size, channels, resize)


def resize_box(width: int, height: int, resize: str) -> tuple[int, int, int, int]:
    """The window of a ``width`` x ``height`` image that fills the square output.

    ``crop`` gives the largest centred square inside the image, ``pad`` the smallest centred
    square around it (it extends past the image, into the letterbox), both as Keras computes
    them for a square target (``smart_resize`` and ``pad_to_aspect_ratio``); ``stretch`` the
    whole image.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        resize: One of :data:`RESIZE_MODES`.

    Returns:
        ``(left, top, right, bottom)`` in the image's pixel coordinates.

    Raises:
        ValueError: ``resize`` is not one of :data:`RESIZE_MODES`.

    """
    if resize == "stretch":
        return 0, 0, width, height
    if resize == "crop":
        side = min(width, height)
    elif resize == "pad":
        side = max(width, height)
    else:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def normalise(batch: np.ndarray) -> np.ndarray:
    """Scale uint8 images to the model input range: float32 ``x / 255`` in [0, 1].

    Args:
        batch: uint8 pixels of any shape (one image or a batch).

    Returns:
        A float32 array of the same shape.

    Raises:
        TypeError: ``batch`` is not uint8 (scaling anything else would silently be wrong).

    """
    pixels = np.asarray(batch)
    if pixels.dtype != np.uint8:
        raise TypeError(f"normalise expects uint8 pixels, got {pixels.dtype}")
    scaled = pixels.astype(np.float32)
    scaled /= np.float32(255.0)
    return scaled


def encode_png(array: np.ndarray) -> bytes:
    """Encode uint8 pixels as a PNG file.

    Args:
        array: uint8 ``HxW`` or ``HxWx1`` (grey), ``HxWx3`` (RGB) or ``HxWx4`` (RGBA).

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: The array is not uint8 or has another shape.

    """
    pixels = np.asarray(array)
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ValueError(f"encode_png expects HxW, HxWx1, HxWx3 or HxWx4, got {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_target(size: int, channels: int, resize: str = DEFAULT_RESIZE) -> None:
    """Reject an output geometry that no image could meet (a caller's bug, not bad data)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")


def _check_pixels(img: Image.Image) -> None:
    """Refuse what would decode to more than ``Image.MAX_IMAGE_PIXELS`` pixels.

    Pillow itself only warns between that limit and twice it, then decodes: a small file
    declaring 10,000 x 10,000 pixels would take gigabytes before failing.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"image size ({img.width}x{img.height} = {img.width * img.height} pixels) "
            f"exceeds the limit of {limit} pixels"
        )


def _one_line(exc: BaseException) -> str:
    """Pillow's message for ``exc`` on one line, without object reprs."""
    message = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    return message or type(exc).__name__


def _failure_reason(exc: Exception) -> str:
    """Classify a Pillow failure as truncated or corrupt, keeping its message."""
    message = _one_line(exc)
    lowered = message.lower()
    if isinstance(exc, EOFError) or "truncat" in lowered or "broken data stream" in lowered:
        return f"truncated image: {message}"
    return f"corrupt image: {message}"


def _to_8bit_mode(img: Image.Image) -> Image.Image:
    """Bring any Pillow colour mode to one of L, LA, RGB or RGBA."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(_wide_pixels(img)))
    try:
        if mode == "1":
            return img.convert("L")
        if mode == "P":
            # A transparent palette entry lives in info or in an RGBA palette.
            palette_mode = img.palette.mode if img.palette is not None else ""
            has_alpha = "transparency" in img.info or palette_mode == "RGBA"
            return img.convert("RGBA" if has_alpha else "RGB")
        if mode in ("PA", "RGBa", "RGBX"):
            return img.convert("RGBA")
        if mode == "La":
            return img.convert("LA")
        # CMYK, YCbCr, LAB, HSV and anything newer: whatever Pillow can turn into RGB.
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported colour mode {mode}: {_one_line(exc)}") from exc


def _wide_pixels(img: Image.Image) -> np.ndarray:
    """Return the pixels of a 16-bit, 32-bit integer or float image as a numpy array."""
    try:
        return np.asarray(img)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"unsupported colour mode {img.mode}: {_one_line(exc)}") from exc


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Rescale integer or float pixels to uint8 (uint8 passes through unchanged).

    uint16 always spans 0..65535 (Pillow's I;16 modes); other integers are taken as 16-bit
    when their maximum exceeds 255, else as 8-bit (Pillow's mode I holds either); floats are
    min-max scaled, and a constant float image becomes 0.
    """
    kind = pixels.dtype.kind
    if pixels.dtype == np.uint8:
        return pixels
    if kind == "b":
        return pixels.astype(np.uint8) * np.uint8(255)
    if kind in "iu":
        wide = pixels.astype(np.int64)
        if (kind == "u" and pixels.dtype.itemsize == 2) or (wide.size and wide.max() > 255):
            # 65535 / 257 == 255 exactly; adding half the divisor rounds to nearest.
            return ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.clip(wide, 0, 255).astype(np.uint8)
    if kind == "f":
        values = pixels.astype(np.float64)
        finite = np.isfinite(values)
        out = np.zeros(values.shape, dtype=np.uint8)
        if not finite.any():
            return out
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            scaled = np.rint((values[finite] - low) * (255.0 / (high - low)))
            out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
        return out
    raise ImageDecodeError(f"unsupported pixel type {pixels.dtype}")


def _convert_and_resize(
    img: Image.Image, size: int, channels: int, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """Composite alpha over white, convert to grey or RGB, resize to size x size.

    Args:
        img: A loaded image in mode L, LA, RGB or RGBA.
        size: Side of the square output.
        channels: 1 or 3.
        resize: ``stretch``, ``crop`` or ``pad``.

    Returns:
        A new uint8 array of shape ``(size, size, channels)``.

    """
    if img.mode in ("LA", "RGBA"):
        base_mode = img.mode[:-1]
        background = Image.new(base_mode, img.size, (255,) * len(base_mode))
        background.paste(img.convert(base_mode), mask=img.getchannel("A"))
        img = background
    # Grey before the resize and RGB after it: the resize then works on fewer channels.
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    img = _resize(img, size, resize)
    if channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    pixels = np.array(img, dtype=np.uint8)
    return pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels


def _resize(img: Image.Image, size: int, resize: str) -> Image.Image:
    """Bilinear resize to ``size`` x ``size`` of the window :func:`resize_box` chooses."""
    if img.size == (size, size):
        return img
    left, top, right, bottom = resize_box(img.width, img.height, resize)
    if resize == "crop" and img.width != img.height:
        # Crop first, as Keras does: resampling from a box would blend in pixels beyond it.
        img = img.crop((left, top, right, bottom))
    if resize != "pad" or img.width == img.height:
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
    # Letterbox: the whole image scaled to fit, pasted centred on black (Keras pads with 0).
    scale = size / (right - left)
    inner = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    scaled = img.resize(inner, Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
    canvas = Image.new(img.mode, (size, size), 0)
    canvas.paste(scaled, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    return canvas
