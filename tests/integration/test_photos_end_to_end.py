"""Your own photos, as the README's four commands run them: mixed-size RGB JPEGs labelled
by a CSV, ``--config photos`` (centre crops stored as JPEG, a backbone from a weights file,
two fine-tuning phases, photo augmentation) through ``dlpipe ingest``, ``train``,
``score``, ``serve`` and ``explain``, each a real ``dlpipe`` process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.rest import free_port, post_images, stop, wait_until_serving

#: The photos preset, made small: the narrowest MobileNetV2 on 32 px crops, one frozen
#: epoch then one with its top 20 layers, two ranks.
SMALL = (
    "ingest.image_size=32",
    "train.backbone_alpha=0.35",
    "train.epochs=2",
    "train.fine_tune.frozen_epochs=1",
    "train.fine_tune.unfreeze_top=20",
    "train.batch_size=16",
    "train.num_proc=2",
    "train.early_stopping_patience=0",
)
CLASSES = ("rows", "columns", "plain")


def _photo(kind: str, rng: np.random.Generator) -> Image.Image:
    """A noisy RGB photo of a random size and aspect ratio; its pattern is its class."""
    height, width = int(rng.integers(36, 90)), int(rng.integers(36, 90))
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255)
    if kind == "rows":
        pixels[::6] = 255 - base
    elif kind == "columns":
        pixels[:, ::6] = 255 - base
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _dlpipe(env: dict[str, str], *args: str, timeout: float = 600) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args, "--json"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``photos/`` (flat, 90 JPEGs) with ``labels.csv``; one photo has no row, one row no file."""
    root = tmp_path_factory.mktemp("own-photos")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for i in range(90):
        kind = CLASSES[i % 3]
        name = f"IMG_{i:04d}.jpg"
        _photo(kind, rng).save(folder / name, quality=90)
        if i != 7:
            rows.append((name, kind))
    rows.append(("IMG_9999.jpg", "rows"))  # named, but never copied over
    with open(root / "labels.csv", "w", newline="") as out:
        csv.writer(out).writerows([("path", "label"), *rows])
    incoming = root / "incoming"
    incoming.mkdir()
    for i, kind in enumerate(CLASSES * 2):
        _photo(kind, rng).save(incoming / f"new_{i}.jpg", quality=85)
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Backbone weights made here (no download): MobileNetV2 0.35 at 32 px, saved to a file."""
    from pipelines.keras_api import keras

    backbone = keras().applications.MobileNetV2(
        alpha=0.35, include_top=False, input_shape=(32, 32, 3), weights=None
    )
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35_32.h5"
    backbone.save_weights(str(path))
    keras().backend.clear_session()
    return path


def test_photos_labelled_by_a_table_go_from_ingest_to_serving(
    photos: Path, weights_file: Path, tmp_path: Path, dlpipe_env: dict[str, str]
) -> None:
    sets = [
        arg
        for item in (*SMALL, f"work_dir={tmp_path / 'work'}", f"train.pretrained={weights_file}")
        for arg in ("--set", item)
    ]
    config = ["--config", "photos", *sets]
    source = photos / "photos"

    ingested = _dlpipe(
        dlpipe_env, "ingest", *config, "--source", str(source),
        "--labels", str(photos / "labels.csv"),
    )  # fmt: skip
    # The photo without a row and the row without a photo are quarantined, not dropped.
    assert (ingested["ingested"], ingested["quarantined"]) == (89, 2)
    assert sorted(ingested["label_names"]) == sorted(CLASSES)
    assert (ingested["image_shape"], ingested["resize"], ingested["storage"]) == (
        [32, 32, 3],
        "crop",
        "jpeg",
    )

    trained = _dlpipe(dlpipe_env, "train", *config, timeout=900)
    assert (trained["world_size"], trained["epochs"], trained["promoted"]) == (2, 2, True)
    assert trained["model_name"] == "photos-classifier"

    scored = _dlpipe(dlpipe_env, "score", *config, "--source", str(photos / "incoming"))
    assert (scored["rows"], scored["scored"], scored["errors"]) == (6, 6, 0)

    explained = _dlpipe(dlpipe_env, "explain", str(photos / "incoming" / "new_0.jpg"), *config)
    assert explained["predicted_label"] in CLASSES and Path(explained["page"]).is_file()

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", *config, "--port", str(port)],
            env=dlpipe_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, server, log.read_text, seconds=180)
        images = [path.read_bytes() for path in sorted((photos / "incoming").glob("*.jpg"))]
        predictions = post_images(base, images, timeout=60)
    finally:
        stop(server, 10, group=True)
    assert len(predictions) == 6
    assert all(row["predicted_label"] in CLASSES and row["error"] is None for row in predictions)
