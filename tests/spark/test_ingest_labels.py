"""Labels from a ``path,label`` table (``ingest.labels``): real files, a real SparkSession."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import IngestConfig
from pipelines.ingest import ingest
from pipelines.labels_table import LabelsTableError
from pipelines.store import DatasetDir
from pipelines.train.feed import read_split

CONFIG = IngestConfig(image_size=12, channels=3, rows_per_row_group=8)
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}


def _photo(colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A flat folder of photos of mixed sizes (no class folders) and its labels table."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(16):
        name = "red" if i % 2 else "blue"
        folder = root / ("2026" if i % 3 == 0 else "")
        folder.mkdir(exist_ok=True)
        (folder / f"IMG_{i:03d}.jpg").write_bytes(_photo(COLOURS[name], (30 + i, 20 + 2 * i)))
        rows.append((f"{'2026/' if i % 3 == 0 else './'}IMG_{i:03d}.jpg", name))
    (root / "unlabelled.png").write_bytes(_photo(COLOURS["red"], (9, 9), "PNG"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 5)
    (root / "notes.txt").write_text("not an image")
    rows += [
        ("gone.jpg", "red"),  # missing file
        ("broken.jpg", "blue"),  # unreadable as an image
        ("notes.txt", "red"),  # not an image
        ("../elsewhere.jpg", "red"),  # outside the source
        (str(root / "IMG_001.jpg"), "red"),  # absolute, inside: the same file, same label
    ]
    return root, pd.DataFrame(rows, columns=["path", "label"])


def _reasons(output: Path) -> dict[str, str]:
    table = pq.read_table(Path(output) / DatasetDir.QUARANTINE_DIR).to_pandas()
    return {Path(p).name: reason for p, reason in zip(table.path, table.reason, strict=True)}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_labels_table_labels_a_flat_folder_and_quarantines_what_it_cannot_use(
    spark, source, tmp_path: Path, kind: str
) -> None:
    root, rows = source
    table = tmp_path / f"labels.{kind}"
    if kind == "csv":
        rows.to_csv(table, index=False)
    else:
        rows.to_parquet(table, index=False)
    result = ingest(spark, replace(CONFIG, labels=str(table)), root, tmp_path / "out")

    assert result.label_names == ["blue", "red"]
    assert result.ingested == 16 and result.classes == {"blue": 8, "red": 8}
    reasons = _reasons(tmp_path / "out")
    assert set(reasons) == {
        "gone.jpg",
        "broken.jpg",
        "notes.txt",
        "elsewhere.jpg",
        "unlabelled.png",
    }
    assert reasons["gone.jpg"] == f"listed in labels.{kind} but not found under the source"
    assert reasons["unlabelled.png"] == f"no label in labels.{kind}"
    assert "not an image file" in reasons["notes.txt"]
    assert "outside the source" in reasons["elsewhere.jpg"]
    assert reasons["broken.jpg"] == "not an image: cannot identify image file"
    assert result.quarantined == 5 and result.skipped == 1  # notes.txt: listed as not an image
    assert result.files_seen == result.ingested + result.quarantined + result.skipped

    # Every image's label is its table row's: the pixels' colour says which it is.
    dataset = DatasetDir(str(tmp_path / "out"))
    for split in (name for name, rows in result.splits.items() if rows):
        images = read_split(dataset.split(split), (12, 12, 3))
        for pixels, label in zip(images.images, images.labels, strict=True):
            red = pixels[..., 0].mean() > pixels[..., 2].mean()
            assert result.label_names[label] == ("red" if red else "blue")


def test_conflicting_labels_quarantine_the_file_and_bad_tables_are_one_line(
    spark, source, tmp_path: Path
) -> None:
    root, rows = source
    table = tmp_path / "labels.csv"
    pd.concat([rows, pd.DataFrame([("IMG_002.jpg", "red")], columns=rows.columns)]).to_csv(
        table, index=False
    )
    result = ingest(spark, replace(CONFIG, labels=str(table)), root, tmp_path / "out")
    reasons = _reasons(tmp_path / "out")
    assert reasons["IMG_002.jpg"] == "labelled twice in labels.csv: 'blue' and 'red'"
    assert result.ingested == 15

    no_column = tmp_path / "bad.csv"
    no_column.write_text("file,class\na.jpg,red\n")
    with pytest.raises(LabelsTableError, match="lacks column path, label") as caught:
        ingest(spark, replace(CONFIG, labels=str(no_column)), root, tmp_path / "out2")
    assert "\n" not in str(caught.value)
    with pytest.raises(LabelsTableError, match="cannot read labels table"):
        ingest(spark, replace(CONFIG, labels=str(tmp_path / "nope.csv")), root, tmp_path / "o3")
