"""Photo augmentation (``train.augment_flip/crop_scale/brightness/contrast``) on real tensors."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import TrainConfig
from pipelines.tasks import CLASSIFICATION
from pipelines.train.augment import photo_changes
from pipelines.train.feed import Augmentation, finish_batches

tf = pytest.importorskip("tensorflow")


def _images(count: int = 16, side: int = 12) -> np.ndarray:
    """Images whose left and right halves differ (a mirror is another image), in [0.2, 0.8]."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.2, 0.8, side, dtype=np.float32)
    base = np.broadcast_to(ramp[None, :, None], (side, side, 3))
    return np.stack([base * rng.uniform(0.8, 1.0) for _ in range(count)]).astype(np.float32)


def _batches(augment: Augmentation, seed: int, steps: int = 3) -> list[np.ndarray]:
    pixels = (_images(8) * 255).astype(np.uint8)
    data = tf.data.Dataset.from_tensor_slices((pixels, np.zeros(8, np.int32))).repeat()
    out = finish_batches(data, 4, False, 0, seed, CLASSIFICATION, augment)
    return [images for images, _ in out.take(steps).as_numpy_iterator()]


def test_the_defaults_change_nothing_of_a_photo_and_never_flip_digits() -> None:
    cfg = TrainConfig()
    assert not cfg.augment_flip and cfg.augment_crop_scale == 1.0
    assert cfg.augment_brightness == cfg.augment_contrast == 0.0
    assert photo_changes(flip=False, crop_scale=1.0, brightness=0, contrast=0, seed=1) is None


def test_flip_mirrors_some_images_left_to_right_and_keeps_the_rest() -> None:
    images = _images()
    out = photo_changes(flip=True, crop_scale=1.0, brightness=0, contrast=0, seed=3)(
        tf.constant(images)
    ).numpy()
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    same = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 0 < sum(mirrored) < len(images)


def test_random_resized_crop_zooms_in_and_keeps_the_shape() -> None:
    images = _images()
    change = photo_changes(flip=False, crop_scale=0.2, brightness=0, contrast=0, seed=3)
    out = change(tf.constant(images)).numpy()
    assert out.shape == images.shape
    # A crop of a left-to-right ramp spans a narrower range of values than the whole ramp.
    spans = out[:, 0, :, 0].max(axis=1) - out[:, 0, :, 0].min(axis=1)
    whole = images[:, 0, :, 0].max(axis=1) - images[:, 0, :, 0].min(axis=1)
    assert (spans <= whole + 1e-6).all() and (spans < whole - 0.05).any()
    flat = np.full((2, 12, 12, 3), 0.5, np.float32)
    np.testing.assert_allclose(change(tf.constant(flat)).numpy(), flat, atol=1e-6)


def test_brightness_and_contrast_stay_in_range_and_in_bounds() -> None:
    images = _images()
    bright = photo_changes(flip=False, crop_scale=1.0, brightness=0.1, contrast=0, seed=3)
    out = bright(tf.constant(images)).numpy()
    offsets = (out - images).reshape(len(images), -1)
    assert np.allclose(offsets, offsets[:, :1], atol=1e-6)  # one offset per image
    assert (np.abs(offsets[:, 0]) <= 0.1 + 1e-6).all() and np.ptp(offsets[:, 0]) > 0
    contrast = photo_changes(flip=False, crop_scale=1.0, brightness=0, contrast=0.3, seed=3)
    out = contrast(tf.constant(images)).numpy()
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, images)


def test_the_same_seed_gives_the_same_images_and_another_seed_others() -> None:
    augment = Augmentation(flip=True, crop_scale=0.5, brightness=0.1, contrast=0.2)
    first, again, other = _batches(augment, 7), _batches(augment, 7), _batches(augment, 8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    # New changes every batch (every epoch), not one fixed change.
    assert not np.array_equal(first[0], first[2])
