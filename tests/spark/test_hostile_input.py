"""Hostile input, end to end: every odd file a real share holds, ingested and scored.

The test writes the corpus itself (Pillow and numpy): broken, odd-mode, animated, rotated,
oddly named and non-UTF-8-named files. Each must end ingested or quarantined with a reason
(or skipped, for non-images); ingest never crashes and its counts add up; scoring the same
folder gives one row per image file, with ``error`` set for the bad ones.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import schema
from pipelines.config import IngestConfig
from pipelines.ingest import ingest
from pipelines.listing import display_path
from pipelines.store import DatasetDir, Store
from pipelines.tasks import CLASSIFICATION

CONFIG = IngestConfig(image_size=16, channels=3, rows_per_row_group=8)

#: A name that is not valid UTF-8 (Latin-1 "café.png", as older Windows/Samba shares write).
LATIN1_NAME = b"caf\xe9.png"
#: Its display form in every table, the manifest and the quarantine.
LATIN1_DISPLAY = "caf\\xe9.png"


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _gradient(mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A real picture (not flat) so that conversions and rotations are visible."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float64)[np.newaxis, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, np.newaxis]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels."""
    data = bytearray(_save(_gradient("L", (4, 4)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _rotated_jpeg() -> bytes:
    """A 24x12 JPEG, left half black, whose EXIF orientation says: rotate 90 degrees (6)."""
    pixels = np.full((12, 24, 3), 255, np.uint8)
    pixels[:, :12] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)


def write_corpus(root: Path) -> dict[str, str]:
    """Write the hostile corpus under ``root``; return each file's expected fate.

    Returns:
        Display form of the path relative to ``root`` -> ``"ingested"``, ``"quarantined"``
        or ``"skipped"``.
    """
    fate: dict[str, str] = {}

    def put(rel: str | bytes, content: bytes, expected: str) -> None:
        path = os.path.join(os.fsencode(root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(content)
        fate[display_path(os.fsdecode(rel))] = expected

    good = _gradient()
    for i in range(6):  # plain good images, so every split gets something
        put(f"good/plain{i}.png", _save(_gradient(size=(24 + i, 20)), "PNG"), "ingested")
    jpeg, png, webp = _save(good, "JPEG"), _save(good, "PNG"), _save(good, "WEBP")
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2], "quarantined")
    put("bad/truncated.png", png[: len(png) // 2], "quarantined")
    put("bad/truncated.webp", webp[: len(webp) // 2], "quarantined")
    put("bad/zero.png", b"", "quarantined")
    put("bad/random.jpg", np.random.default_rng(0).bytes(4096), "quarantined")
    put("bad/bomb.png", _bomb_png(30_000, 30_000), "quarantined")
    put("bad/bomb-warning.png", _bomb_png(10_000, 10_000), "quarantined")
    put("modes/one-bit.png", _save(good.convert("1"), "PNG"), "ingested")
    wide = (np.arange(20 * 24, dtype=np.uint32).reshape(20, 24) * 137) % 65536
    put("modes/16-bit.png", _save(Image.fromarray(wide.astype(np.uint16)), "PNG"), "ingested")
    put("modes/32-bit.tif", _save(Image.fromarray(wide.astype(np.int32)), "TIFF"), "ingested")
    floats = Image.fromarray(wide.astype(np.float32) / 7.0)
    put("modes/float.tif", _save(floats, "TIFF"), "ingested")
    put("modes/cmyk.jpg", _save(good.convert("CMYK"), "JPEG"), "ingested")
    palette = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    put("modes/palette-alpha.png", _save(palette, "PNG", transparency=0), "ingested")
    frames = [_gradient(size=(24, 20)).rotate(angle) for angle in (0, 90, 180)]
    put(
        "modes/animated.gif",
        _save(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "ingested",
    )
    put(
        "modes/multi-page.tif",
        _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "ingested",
    )
    put("modes/exif-rotated.jpg", _rotated_jpeg(), "ingested")
    put("names/really a png.jpg", png, "ingested")  # mismatched extension
    put("names/with space [1] 100%.png", png, "ingested")
    put("names/%41%zz%.png", png, "ingested")
    put("names/ünïcödé 画像.png", png, "ingested")
    put(b"names/" + LATIN1_NAME, png, "ingested")
    put("names/" + "long" * 60 + ".png", png, "ingested")  # 244 bytes, near NAME_MAX
    put("names/notes.txt", b"not an image", "skipped")
    put("names/.hidden.png", png, "skipped")
    put(b"latin\xe9-class/photo.png", png, "ingested")  # a class folder not in UTF-8
    put("loose.png", png, "quarantined")  # outside any class folder
    os.symlink(root / "bad" / "deleted-meanwhile.png", root / "bad" / "broken-link.png")
    fate["bad/broken-link.png"] = "quarantined"
    (root / "empty-class").mkdir()
    return fate


def _quarantine(dataset: Path) -> dict[str, str]:
    table = pq.read_table(dataset / DatasetDir.QUARANTINE_DIR).to_pylist()
    return {row["path"]: row["reason"] for row in table}


def test_hostile_corpus_is_ingested_or_quarantined_and_the_counts_add_up(spark, tmp_path):
    source, output = tmp_path / "share", tmp_path / "prepared"
    fate = write_corpus(source)
    result = ingest(spark, CONFIG, source, output)

    expected = {kind: sum(v == kind for v in fate.values()) for kind in set(fate.values())}
    assert (result.ingested, result.quarantined, result.skipped) == (
        expected["ingested"],
        expected["quarantined"],
        expected["skipped"],
    )
    assert result.files_seen == result.ingested + result.quarantined + result.skipped

    root = display_path(str(source.resolve()))
    rows = spark.read.parquet(str(output)).select("path", "label_name", "image").toPandas()
    ingested = {p[len(root) + 1 :] for p in rows.path}
    assert ingested == {rel for rel, kind in fate.items() if kind == "ingested"}
    quarantine = _quarantine(output)
    assert {p[len(root) + 1 :] for p in quarantine} == {
        rel for rel, kind in fate.items() if kind == "quarantined"
    }
    assert all(reason and "\n" not in reason for reason in quarantine.values())
    reasons = {Path(p).name: r for p, r in quarantine.items()}
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["bomb-warning.png"].startswith("decompression bomb")
    assert reasons["zero.png"] == "empty file"
    assert reasons["random.jpg"].startswith("not an image")
    assert reasons["broken-link.png"].startswith("cannot read file")
    for name in ("truncated.jpg", "truncated.png", "truncated.webp"):
        assert reasons[name].startswith(("truncated image", "corrupt image")), reasons[name]

    # The odd names cross Spark, Parquet and JSON in their display form.
    assert f"{root}/names/{LATIN1_DISPLAY}" in set(rows.path)
    manifest = json.loads((output / DatasetDir.MANIFEST_FILE).read_text())
    assert "latin\\xe9-class" in manifest["label_names"]
    assert "empty-class" not in manifest["label_names"]  # no file, so no class
    assert manifest["files_seen"] == result.files_seen

    # EXIF orientation is applied: the stored left half (black) is on top once upright.
    [rotated] = rows.image[rows.path.str.endswith("exif-rotated.jpg")]
    grey = schema.decode_cells([rotated], (16, 16, 3))[0].mean(axis=2)
    assert grey[:8].mean() < 40 and grey[8:].mean() > 215


def test_single_class_dataset(spark, tmp_path):
    source = tmp_path / "one"
    (source / "only").mkdir(parents=True)
    for i in range(5):
        (source / "only" / f"{i}.png").write_bytes(_save(_gradient(size=(20 + i, 20)), "PNG"))
    result = ingest(spark, CONFIG, source, tmp_path / "out")
    assert (result.ingested, result.label_names, result.classes) == (5, ["only"], {"only": 5})


@pytest.mark.slow
def test_scoring_the_hostile_corpus_gives_one_row_per_image_file(spark, tmp_path):
    import mlflow

    from pipelines.config import TrainConfig, load_config
    from pipelines.image_model import log_image_model
    from pipelines.models import build_model
    from pipelines.score import read_table, score

    source = tmp_path / "share"
    fate = write_corpus(source)
    config = load_config(
        overrides=[
            f"work_dir={tmp_path / 'work'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "score.arrow_batch_size=8",
        ]
    )
    # An untrained model: what is scored here is the input handling, not the accuracy.
    model = build_model(TrainConfig(model="mlp", hidden_units=8), (16, 16, 3), 2)
    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    try:
        # An experiment of this store: the active one an earlier test set is not in it.
        experiment = mlflow.MlflowClient().create_experiment(
            "hostile", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            info = log_image_model(
                model,
                label_names=["a", "b"],
                image_shape=(16, 16, 3),
                task=CLASSIFICATION,
                input_example_png=_save(_gradient(), "PNG"),
            )
    finally:
        mlflow.set_tracking_uri(None)
    table = str(tmp_path / "scores")
    result = score(spark, config, str(source), table=table, model=info.model_uri)

    root = display_path(str(source.resolve()))
    rows = read_table(spark, table).toPandas()
    by_rel = {
        path[len(root) + 1 :]: error for path, error in zip(rows.path, rows.error, strict=True)
    }
    images = {rel for rel, kind in fate.items() if kind != "skipped"}
    assert len(rows) == len(by_rel) == result.rows == len(images)
    assert set(by_rel) == images
    failed = {rel for rel, error in by_rel.items() if error is not None}
    # Outside a class folder is an ingest matter; scoring has no classes to check.
    assert failed == {rel for rel, kind in fate.items() if kind == "quarantined"} - {"loose.png"}
    assert by_rel[f"names/{LATIN1_DISPLAY}"] is None
    assert by_rel["bad/bomb.png"].startswith("decompression bomb")
    assert result.errors == len(failed) and result.skipped == 2
