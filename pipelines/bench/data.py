"""Generated benchmark data, cached under ``<work_dir>/bench/`` and reused by later runs.

:func:`generate_jpegs` writes photo-like JPEGs; :func:`prepared_dataset` ingests such a set
(with the project's own Spark ingest) into the Petastorm dataset the feed, reader and
train benchmarks read; :func:`scratch` gives a benchmark a directory it removes after.
Nothing heavy (TensorFlow, Spark) is imported at module import.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Config, IngestConfig, SplitConfig
from pipelines.errors import UserError
from pipelines.store import DatasetDir, Store, replace_dir

log = logging.getLogger("pipelines.bench")

#: Bumped whenever :func:`generate_jpegs` draws different pictures (invalidates caches).
GENERATOR_VERSION = 1

#: The dataset the feed, reader, train and score benchmarks share: JPEGs of this side,
#: ingested at 28x28 grey (the Keras MNIST convnet's input), in four class folders.
DATASET_SOURCE_SIZE = 64
DATASET_IMAGE_SIZE = 28
DATASET_CHANNELS = 1
DATASET_CLASSES = 4
#: Default number of images of that dataset (about 4,000 training rows).
DATASET_IMAGES = 5000


def bench_dir(config: Config) -> Path:
    """``<work_dir>/bench``: the cache of generated data, and scratch space."""
    return Store.of(config).bench


@contextmanager
def scratch(config: Config) -> Iterator[Path]:
    """A fresh directory under ``<work_dir>/bench``, removed afterwards."""
    path = bench_dir(config) / f"tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def generate_jpegs(out: Path, count: int, size: int = 256, classes: int = 4, seed: int = 0) -> Path:
    """Write ``count`` photo-like JPEGs into one sub-folder per class, or reuse them.

    Each picture is a smooth two-colour gradient with a few blurred shapes and sensor-like
    noise, saved at quality 90: files of realistic size and decode cost (pure noise or flat
    colour would compress unrealistically badly or well). Image ``i`` belongs to class
    ``i % classes`` and depends only on ``(seed, i)``, so the classes are not learnable:
    the pictures are for measuring speed, not accuracy. The set is written to a temporary
    sibling and renamed into place, so an existing ``out`` is always complete and is reused.

    Args:
        out: Directory to hold ``class_<k>/img_<i>.jpg``.
        count: Number of images.
        size: Side of the square images in pixels.
        classes: Number of class folders.
        seed: Seed of the pictures.

    Returns:
        ``out``.

    Raises:
        UserError: ``out`` exists but is not the complete set asked for.
    """
    from PIL import Image, ImageDraw, ImageFilter

    out = Path(out).expanduser().resolve()
    expected = {f"class_{i % classes}/img_{i:06d}.jpg" for i in range(count)}
    if out.exists():
        found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        if found == expected:
            return out
        raise UserError(
            f"{out} exists but is not a generated set of {count} images in {classes} classes; "
            "remove it or choose another directory"
        )
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for k in range(classes):
            (tmp / f"class_{k}").mkdir(parents=True)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        for i in range(count):
            rng = np.random.default_rng((seed, i))
            a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
            angle = rng.uniform(0, 2 * np.pi)
            along = np.cos(angle) * (ramp[None, :] - 0.5) + np.sin(angle) * (ramp[:, None] - 0.5)
            t = np.clip(0.5 + along, 0, 1)
            pixels = a + (b - a) * t[:, :, None]
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 8))):
                x0, y0 = rng.integers(0, size, 2)
                w, h = rng.integers(size // 10, size // 2, 2)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            image = image.filter(ImageFilter.GaussianBlur(1.5))
            noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (size, size, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
            image.save(tmp / f"class_{i % classes}" / f"img_{i:06d}.jpg", quality=90)
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def generate_photos(out: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` RGB JPEGs of mixed sizes and aspect ratios, or reuse them.

    As a user's photo folder: sides from 200 to 640 pixels, landscape and portrait, each a
    blurred gradient with shapes and sensor-like noise at quality 90 (realistic bytes and
    decode cost), in :data:`DATASET_CLASSES` class folders; image ``i`` depends only on
    ``(seed, i)``. Written to a temporary sibling and renamed into place, as
    :func:`generate_jpegs` does.

    Args:
        out: Directory to hold ``class_<k>/photo_<i>.jpg``.
        count: Number of photos.
        seed: Seed of the pictures.

    Returns:
        ``out``.
    """
    from PIL import Image, ImageDraw, ImageFilter

    out = Path(out).expanduser().resolve()
    if (out / ".complete").is_file():
        return out
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for k in range(DATASET_CLASSES):
            (tmp / f"class_{k}").mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng((seed, i))
            width, height = (int(v) for v in rng.integers(200, 641, 2))
            a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
            t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
            pixels = np.broadcast_to(a + (b - a) * t, (height, width, 3))
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 8))):
                x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
                w, h = (
                    int(rng.integers(width // 10, width // 2)),
                    int(rng.integers(20, height // 2)),
                )
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
            image = image.filter(ImageFilter.GaussianBlur(1.5))
            noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (height, width, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
            path = tmp / f"class_{i % DATASET_CLASSES}" / f"photo_{i:06d}.jpg"
            image.save(path, quality=90)
        (tmp / ".complete").write_text(f"{count}\n")  # hidden: ingest skips it
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached_photos(config: Config, count: int) -> Path:
    """The generated mixed-size photo set of ``count`` images, cached under bench/."""
    name = f"photos-v{GENERATOR_VERSION}-{count}-c{DATASET_CLASSES}-s0"
    return generate_photos(bench_dir(config) / name, count)


def cached_jpegs(config: Config, count: int, size: int) -> Path:
    """The generated JPEG set of ``count`` images of ``size`` pixels, cached under bench/."""
    name = f"jpeg-v{GENERATOR_VERSION}-{count}x{size}-c{DATASET_CLASSES}-s0"
    return generate_jpegs(bench_dir(config) / name, count, size=size, classes=DATASET_CLASSES)


@dataclass(frozen=True)
class PreparedDataset:
    """A generated, ingested dataset (see :func:`prepared_dataset`).

    Attributes:
        path: The dataset directory (``split=*/``, ``_manifest.json``).
        source: The JPEG folder it was ingested from.
        image_shape: ``(height, width, channels)`` of the stored images.
        rows: Rows per split, from the manifest.
        label_names: Class names, from the manifest.
        rows_per_row_group: The row-group size it was written with.
    """

    path: Path
    source: Path
    image_shape: tuple[int, int, int]
    rows: dict[str, int]
    label_names: list[str]
    rows_per_row_group: int

    def split(self, name: str) -> str:
        """The location of split ``name``."""
        return DatasetDir(str(self.path)).split(name)

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for a measurement's details."""
        return {
            "dataset": str(self.path),
            "image_shape": list(self.image_shape),
            "rows": dict(self.rows),
            "rows_per_row_group": self.rows_per_row_group,
        }


def folder_ingest_config(config: Config, image_size: int, channels: int) -> IngestConfig:
    """``config.ingest`` for a benchmark's generated class folders at a fixed image shape."""
    return replace(
        config.ingest,
        source=None,
        output=None,
        format="folder",
        image_size=image_size,
        channels=channels,
    )


def prepared_dataset(config: Config, images: int) -> PreparedDataset:
    """The shared benchmark dataset of ``images`` images, generated and ingested once.

    ``images`` JPEGs of :data:`DATASET_SOURCE_SIZE` pixels in :data:`DATASET_CLASSES` class
    folders, ingested by :func:`pipelines.ingest.ingest` on the session of ``config.spark``
    at 28x28 grey with the default 0.8/0.1/0.1 splits and ``ingest.rows_per_row_group`` of
    ``config``. Both are cached under ``<work_dir>/bench``; ingest writes atomically, so a
    dataset with a manifest is complete and is reused.

    Args:
        config: Spark session and ingest settings.
        images: Number of source images.

    Returns:
        The dataset.

    Raises:
        UserError: The training split is empty (too few images).
    """
    rows_per_group = config.ingest.rows_per_row_group
    source = cached_jpegs(config, images, DATASET_SOURCE_SIZE)
    side, channels = DATASET_IMAGE_SIZE, DATASET_CHANNELS
    name = f"prepared-v{GENERATOR_VERSION}-{images}x{side}x{channels}-rg{rows_per_group}"
    path = bench_dir(config) / name
    manifest_file = path / DatasetDir.MANIFEST_FILE
    if not manifest_file.is_file():
        from pipelines.ingest import ingest
        from pipelines.spark import get_spark

        cfg = replace(folder_ingest_config(config, side, channels), splits=SplitConfig())
        log.info("bench: ingesting %d generated images into %s (cached)", images, path)
        ingest(get_spark(config.spark), cfg, source, path)
    manifest = DatasetDir(str(path)).read_manifest()
    if manifest.splits.get("train", 0) == 0:
        raise UserError(f"bench: {images} images give no training rows; use more --images")
    return PreparedDataset(
        path=path,
        source=source,
        image_shape=tuple(manifest.image_shape),  # type: ignore[arg-type]
        rows=dict(manifest.splits),
        label_names=list(manifest.label_names),
        rows_per_row_group=rows_per_group,
    )


def read_once(source: Path) -> Path:
    """Read every file of ``source`` once, untimed: timed runs start from the page cache.

    Otherwise a set generated long before, or pushed out by others, is read from disk in
    the first timed run only, by whichever run comes first (measured: ingest of
    100,000 JPEGs 19.6 s cold, 13.5-13.9 s warm).
    """
    for folder, _, names in os.walk(source):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                while file.read(1 << 20):
                    pass
    return source
