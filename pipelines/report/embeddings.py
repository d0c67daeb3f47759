"""The embedding section's extras: the page's thumbnails and TensorBoard projector files.

In (from :mod:`pipelines.report.artifacts`' embedding section): the evaluation split's
images, labels and predictions and the embedding layer's outputs. Out:
``embeddings_sprite.png/.json`` (thumbnails of the points the page's interactive plot
shows, at most :data:`EMBEDDINGS_SHOWN`) and, under the report's ``tensorboard/`` folder,
the projector's vectors, metadata, sprite and ``projector_config.pbtxt`` (at most
:data:`PROJECTOR_SHOWN` points), so ``tensorboard --logdir`` shows the embeddings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report.numeric import class_name

if TYPE_CHECKING:
    from pipelines.train.feed import SplitArrays

#: At most this many points (with thumbnails) go to the page's interactive embedding plot.
EMBEDDINGS_SHOWN = 2_000
#: At most this many points go to the TensorBoard projector files.
PROJECTOR_SHOWN = 10_000
#: Thumbnails are at most this many pixels on their longer side.
THUMBNAIL_MAX = 32
#: Raw bytes the page's thumbnails may take together (2,000 RGB thumbnails: 24 px a side),
#: which keeps the base64 PNG in the page at a few MB at most.
THUMBNAIL_BUDGET = 3_500_000
#: TensorBoard's projector rejects sprite images larger than this on either side.
SPRITE_MAX = 8192
#: The projector files, relative to the ``tensorboard/`` folder (its logdir).
PROJECTOR_CONFIG = "projector_config.pbtxt"
PROJECTOR_FILES = {
    "tensor": "projector/vectors.tsv",
    "metadata": "projector/metadata.tsv",
    "sprite": "projector/sprite.png",
}


def sample_points(labels: np.ndarray, predicted: np.ndarray | None, limit: int) -> np.ndarray:
    """At most ``limit`` row indexes, ascending: every mistake first, then a seeded sample.

    Mistakes are what a reader looks for in the plot, so they are kept (up to the limit);
    the rest is a fixed random choice, the same on every run of the same split.
    """
    n = len(labels)
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    wrong = np.zeros(n, bool) if predicted is None else predicted != labels
    rng = np.random.default_rng(0)
    mistakes = np.flatnonzero(wrong)
    if len(mistakes) >= limit:
        return np.sort(rng.choice(mistakes, limit, replace=False)).astype(np.int64)
    rest = rng.choice(np.flatnonzero(~wrong), limit - len(mistakes), replace=False)
    return np.sort(np.concatenate([mistakes, rest])).astype(np.int64)


def _thumbnails(images: np.ndarray, most: int) -> np.ndarray:
    """uint8 ``(n, h, w, c)`` images shrunk (never enlarged) to at most ``most`` pixels a side."""
    from PIL import Image

    h, w = images.shape[1:3]
    scale = min(1.0, most / max(h, w))
    if scale >= 1.0:
        return images
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    squeeze = images.shape[3] == 1
    small = [
        np.asarray(Image.fromarray(image[:, :, 0] if squeeze else image).resize(size, Image.BOX))
        for image in images
    ]
    stacked = np.stack(small)
    return stacked[..., None] if squeeze else stacked


def _sprite(thumbs: np.ndarray, columns: int, square: bool = False) -> np.ndarray:
    """The thumbnails in a grid, row-major, ``columns`` wide, black where none is left.

    ``square`` pads the grid to ``columns`` rows, the layout TensorBoard's projector expects.
    """
    n, h, w, c = thumbs.shape
    rows = columns if square else max(1, math.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for j, thumb in enumerate(thumbs):
        r, q = divmod(j, columns)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = thumb
    return grid


def _save_sprite(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    channels = grid.shape[2]
    image = grid[:, :, 0] if channels == 1 else grid[:, :, :3]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG", optimize=True)


def write_thumbnails(out: Path, images: np.ndarray, shown: np.ndarray, total: int) -> None:
    """``embeddings_sprite.png`` and ``.json``: the page's tooltip thumbnails, in grid order."""
    channels = images.shape[3] if images.ndim == 4 else 1
    budget = math.isqrt(THUMBNAIL_BUDGET // max(1, len(shown) * channels))
    thumbs = _thumbnails(np.asarray(images)[shown], max(8, min(THUMBNAIL_MAX, budget)))
    columns = max(1, math.ceil(math.sqrt(len(shown))))
    _save_sprite(_sprite(thumbs, columns), out / "embeddings_sprite.png")
    meta = {
        "indices": shown.tolist(),
        "tile": [int(thumbs.shape[2]), int(thumbs.shape[1])],  # width, height
        "columns": columns,
        "total": int(total),
    }
    (out / "embeddings_sprite.json").write_text(json.dumps(meta))


def _tsv_cell(value: Any) -> str:
    """A metadata cell: tabs and line breaks would shift the projector's columns."""
    return " ".join(str(value).split()) or "-"


def write_projector(
    logdir: Path,
    features: np.ndarray,
    arrays: SplitArrays,
    labels: np.ndarray,
    predicted: np.ndarray | None,
    names: list[str],
    layer_name: str,
) -> dict[str, Any]:
    """TensorBoard projector files under ``logdir``: TSV vectors, metadata, sprite, config.

    The config sits at the logdir's root, which TensorBoard's projector reads as the run
    ``.``; paths in it are relative to it, so the folder can be downloaded and moved.
    Plain TSV vectors need no checkpoint (``tensor_path``; TensorBoard 2.15 reads them).
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    shown = sample_points(labels, predicted, PROJECTOR_SHOWN)
    (logdir / "projector").mkdir(parents=True, exist_ok=True)
    with (logdir / PROJECTOR_FILES["tensor"]).open("w") as handle:
        for row in features[shown]:
            handle.write("\t".join(f"{v:.7g}" for v in row) + "\n")
    header = ["index", "true"] + ([] if predicted is None else ["predicted"]) + ["path"]
    with (logdir / PROJECTOR_FILES["metadata"]).open("w") as handle:
        handle.write("\t".join(header) + "\n")
        for i in shown:
            cells = [i, class_name(names, labels[i])]
            cells += [] if predicted is None else [class_name(names, predicted[i])]
            cells.append(arrays.paths[i])
            handle.write("\t".join(_tsv_cell(c) for c in cells) + "\n")
    columns = max(1, math.ceil(math.sqrt(len(shown))))  # the projector expects a square grid
    images = np.asarray(arrays.images)
    thumbs = _thumbnails(images[shown], min(THUMBNAIL_MAX, SPRITE_MAX // columns))
    _save_sprite(_sprite(thumbs, columns, square=True), logdir / PROJECTOR_FILES["sprite"])
    config = ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = layer_name
    embedding.tensor_path = PROJECTOR_FILES["tensor"]
    embedding.metadata_path = PROJECTOR_FILES["metadata"]
    embedding.sprite.image_path = PROJECTOR_FILES["sprite"]
    embedding.sprite.single_image_dim.extend([int(thumbs.shape[2]), int(thumbs.shape[1])])
    (logdir / PROJECTOR_CONFIG).write_text(text_format.MessageToString(config))
    return {"points": len(shown), "of": len(labels), "dimensions": int(features.shape[1])}
