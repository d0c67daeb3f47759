"""The stage contracts: the manifest, the image-cell codec, the scoring table's columns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import schema
from pipelines.errors import UserError
from pipelines.store import DatasetDir


def _manifest() -> schema.Manifest:
    return schema.Manifest(
        source="/data/digits",
        format="folder",
        files_seen=12,
        ingested=10,
        quarantined=1,
        skipped=1,
        splits={"train": 8, "val": 1, "test": 1},
        classes={"a": 6, "b": 4},
        label_names=["a", "b"],
        image_shape=[16, 16, 1],
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:05+00:00",
    )


def test_manifest_round_trips_with_the_keys_ingest_has_always_written(tmp_path: Path) -> None:
    manifest = _manifest()
    dataset = DatasetDir(str(tmp_path))
    dataset.write_manifest(manifest)
    path = Path(dataset.manifest_path)
    assert path == tmp_path / "_manifest.json"
    assert set(json.loads(path.read_text())) == {
        "source", "format", "files_seen", "ingested", "quarantined", "skipped",
        "splits", "classes", "label_names", "image_shape", "started_at", "finished_at",
        "split_classes",  # since 2026-12: what a scoring batch is compared with
        "resize", "storage",  # since 2026-12: how images were made square and are stored
    }  # fmt: skip
    assert path.read_text().endswith("}\n")
    assert dataset.read_manifest() == manifest


def test_the_training_distribution_is_the_train_splits_else_every_splits() -> None:
    manifest = _manifest()
    assert manifest.class_distribution() == {"a": 6, "b": 4}  # an older manifest: all splits
    split = dataclasses.replace(manifest, split_classes={"train": {"a": 5, "b": 3}})
    assert split.class_distribution() == {"a": 5, "b": 3}
    assert schema.Manifest.from_json(split.to_json()) == split


def test_manifest_reads_minimal_files_and_ignores_unknown_keys() -> None:
    text = json.dumps({"splits": {"train": 2}, "label_names": [1, "b"], "image_shape": ["8", 8, 1]})
    manifest = schema.Manifest.from_json(text[:-1] + ', "future": true}')
    assert manifest.label_names == ["1", "b"]
    assert (manifest.resize, manifest.storage) == ("stretch", "raw")  # as written before
    assert manifest.image_shape == [8, 8, 1]
    assert manifest.splits == {"train": 2}


def test_manifest_without_label_names_is_not_a_manifest() -> None:
    with pytest.raises(KeyError):
        schema.Manifest.from_json(json.dumps({"splits": {}, "image_shape": [8, 8, 1]}))


def test_missing_manifest_is_a_one_line_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing _manifest.json.*dlpipe ingest"):
        DatasetDir(str(tmp_path)).read_manifest()


def test_cells_round_trip_through_the_codec() -> None:
    images = np.arange(3 * 4 * 5 * 1, dtype=np.uint8).reshape(3, 4, 5, 1)
    cells = [schema.encode_cell(image) for image in images]
    assert all(len(cell) == schema.cell_size((4, 5, 1)) for cell in cells)
    assert schema.cell_matches(cells[0], (4, 5, 1))
    assert not schema.cell_matches(cells[0], (5, 4, 1))
    np.testing.assert_array_equal(schema.decode_cells(cells, (4, 5, 1)), images)
    assert schema.decode_cells([], (4, 5, 1)).shape == (0, 4, 5, 1)


def test_a_cell_of_another_shape_is_named() -> None:
    good = schema.encode_cell(np.zeros((4, 5, 1), np.uint8))
    other = schema.encode_cell(np.zeros((5, 4, 1), np.uint8))  # same size, other header
    with pytest.raises(schema.CellError) as caught:
        schema.decode_cells([good, other], (4, 5, 1))
    assert caught.value.cell == other
    assert schema.stored_array(other) == ((5, 4, 1), np.dtype(np.uint8))
    assert schema.stored_array(b"not npy") is None


def test_scoring_table_is_path_then_model_outputs_then_provenance() -> None:
    assert list(schema.SCORING_TABLE) == [
        schema.PATH,
        *schema.MODEL_OUTPUTS,
        *schema.RECONSTRUCTION_OUTPUTS,  # every task's outputs: one schema for every batch
        *schema.TOP_K_OUTPUTS,
        *schema.FILE_IDENTITY,
        *schema.SCORING_PROVENANCE,
    ]
    assert schema.ddl({"a": "string", "b": "array<double>"}) == "a string, b array<double>"
