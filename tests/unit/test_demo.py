"""Unit tests for pipelines.demo: the digits folder on real disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.utils import Bunch

from pipelines.demo import DemoData, write_demo_digits


@pytest.fixture(scope="module")
def digits() -> Bunch:
    return load_digits()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    return write_demo_digits(tmp_path_factory.mktemp("demo") / "nested" / "digits")


def test_files_and_class_folders(demo: DemoData, digits: Bunch) -> None:
    files = sorted(demo.path.rglob("*.png"))
    assert len(files) == 1797 == demo.images
    assert sorted(p.name for p in demo.path.iterdir()) == [str(d) for d in range(10)]
    expected = Counter(str(int(t)) for t in digits.target)
    on_disk = Counter(p.parent.name for p in files)
    assert on_disk == expected
    assert demo.classes == dict(sorted(expected.items()))
    # Nothing left beside the folder: no temporary or retired copies.
    assert [p.name for p in demo.path.parent.iterdir()] == ["digits"]


def test_pixels_are_sklearn_values_scaled_to_255(demo: DemoData, digits: Bunch) -> None:
    index = 1234
    label = int(digits.target[index])
    path = demo.path / str(label) / f"digit_{index:04d}.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
        pixels = np.asarray(img)
    expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    assert pixels.max() == 255  # full range used, not 0..16


def test_second_call_is_a_no_op(demo: DemoData) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo.path.rglob("*")}
    folder_inode = demo.path.stat().st_ino
    again = write_demo_digits(demo.path)
    assert again == demo
    assert {p: p.stat().st_mtime_ns for p in demo.path.rglob("*")} == before
    assert demo.path.stat().st_ino == folder_inode


def test_other_content_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    (out / "7").mkdir(parents=True)
    (out / "7" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("old")
    result = write_demo_digits(out)
    assert not (out / "notes.txt").exists() and not (out / "7" / "stale.png").exists()
    assert len(list(out.rglob("*.png"))) == 1797 == result.images
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_incomplete_folder_is_rewritten(tmp_path: Path) -> None:
    out = write_demo_digits(tmp_path / "digits").path
    victim = next(out.rglob("*.png"))
    victim.unlink()
    write_demo_digits(out)
    assert victim.exists() and len(list(out.rglob("*.png"))) == 1797
