"""Photo augmentation on the rank: flip, random resized crop, brightness and contrast.

In: a batch of float32 images in [0, 1], ``(B, H, W, C)``, and the ``train.augment_*`` keys.
Out: the batch changed at random, image by image, anew every epoch; the same seed gives the
same changes in the same order (one seeded ``tf.random.Generator`` per feed, drawn from in
a sequential ``tf.data`` map).

In order, each off at its neutral value:

- random resized crop (``augment_crop_scale`` < 1): a box covering a uniform fraction in
  ``[scale, 1]`` of the image's area, of aspect ratio log-uniform in ``[3/4, 4/3]`` (Szegedy
  et al.'s Inception crop, torchvision's ``RandomResizedCrop`` defaults), placed uniformly,
  resized back to ``H x W`` bilinearly;
- horizontal flip (``augment_flip``): half of the images mirrored left to right;
- brightness (``augment_brightness`` b): a uniform offset in ``[-b, b]`` added;
- contrast (``augment_contrast`` c): the distance from the image's mean (per channel)
  scaled by a uniform factor in ``[1 - c, 1 + c]``; both results clipped to [0, 1].

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

#: Aspect ratio range of the random resized crop (width / height).
CROP_ASPECT = (3 / 4, 4 / 3)


def photo_changes(
    *, flip: bool, crop_scale: float, brightness: float, contrast: float, seed: int
) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """The batch function of the photo augmentations asked for, None when none is.

    Args:
        flip: Mirror half of the images left to right.
        crop_scale: Smallest area fraction of the random resized crop (1: no crop).
        brightness: Largest brightness offset either way, on the [0, 1] scale (0: none).
        contrast: Largest contrast change either way, as a factor offset (0: none).
        seed: Seed of the feed's generator.

    Returns:
        A function of a float32 ``(B, H, W, C)`` batch, or None.
    """
    if not (flip or crop_scale < 1 or brightness > 0 or contrast > 0):
        return None
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed)

    def change(images: tf.Tensor) -> tf.Tensor:
        batch = tf.shape(images)[0]
        if crop_scale < 1:
            images = _resized_crop(images, generator, crop_scale)
        if flip:
            mirrored = generator.uniform([batch]) < 0.5
            images = tf.where(mirrored[:, None, None, None], tf.reverse(images, axis=[2]), images)
        if brightness > 0:
            offset = generator.uniform([batch, 1, 1, 1], -brightness, brightness)
            images = tf.clip_by_value(images + offset, 0.0, 1.0)
        if contrast > 0:
            factor = generator.uniform([batch, 1, 1, 1], 1 - contrast, 1 + contrast)
            mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
            images = tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0)
        return images

    return change


def _resized_crop(images: tf.Tensor, generator: tf.random.Generator, scale: float) -> tf.Tensor:
    """One random box per image (area in ``[scale, 1]``, aspect in CROP_ASPECT), resized back."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    area = generator.uniform([batch], scale, 1.0)
    log_aspect = generator.uniform([batch], math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))
    aspect = tf.exp(log_aspect)
    # Box sides as fractions of the image's (a square image: area = width * height).
    width = tf.minimum(tf.sqrt(area * aspect), 1.0)
    height = tf.minimum(tf.sqrt(area / aspect), 1.0)
    left = generator.uniform([batch]) * (1.0 - width)
    top = generator.uniform([batch]) * (1.0 - height)
    boxes = tf.stack([top, left, top + height, left + width], axis=1)
    size = tf.shape(images)[1:3]
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), size, method="bilinear")
