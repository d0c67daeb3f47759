"""The bundled demo dataset: scikit-learn's handwritten digits as a folder of PNG files.

In: nothing but the digits that ship inside scikit-learn (1,797 8x8 images, pixel values
0..16, no download).
Out: ``<out>/<digit>/digit_<index>.png`` grey PNG files with pixels scaled to 0..255, the
same layout as a user's own folder of images, so the demo runs the real image path; and a
:class:`DemoData` saying where they are and how many there are per class.

The folder is written atomically: into a temporary sibling, then renamed into place, so a
killed run leaves either the previous folder or the complete new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.images import encode_png
from pipelines.store import Staging

#: Number of images in scikit-learn's digits dataset.
DEMO_IMAGES = 1797

# Largest pixel value in scikit-learn's digits (4x4 blocks of 8x8 bitmaps, counted).
_DIGITS_MAX = 16


@dataclass(frozen=True)
class DemoData:
    """Where the demo digits were written.

    Attributes:
        path: The folder holding one sub-folder per digit.
        images: Number of image files.
        classes: Number of images per class name (``"0"`` to ``"9"``).

    """

    path: Path
    images: int
    classes: dict[str, int]


def write_demo_digits(out: Path) -> DemoData:
    """Write scikit-learn's digits as grey PNG files in class folders, unless already there.

    A folder that already holds exactly the expected files is left untouched; one with any
    other content is replaced as a whole.

    Args:
        out: The folder to create or replace; its parent is created when missing.

    Returns:
        The folder, the image count and the count per class.

    """
    # Imported here: scikit-learn is heavy and only the demo needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [str(int(label)) for label in digits.target]
    relative = [_file_name(label, index) for index, label in enumerate(labels)]
    classes = {name: labels.count(name) for name in sorted(set(labels))}
    result = DemoData(path=out, images=len(relative), classes=classes)

    if _holds_exactly(out, relative):
        return result
    staging = Staging(str(out))
    with staging.folder(owned=False) as folder:
        for name in classes:
            (folder / name).mkdir(parents=True)
        pixels = np.rint(digits.images * (255.0 / _DIGITS_MAX)).astype(np.uint8)
        for path, image in zip(relative, pixels, strict=True):
            (folder / path).write_bytes(encode_png(image))
        staging.commit(folder)
    return result


def _file_name(label: str, index: int) -> str:
    """Return the path of one digit image relative to the output folder."""
    return f"{label}/digit_{index:04d}.png"


def _holds_exactly(folder: Path, relative: list[str]) -> bool:
    """Tell whether ``folder`` holds exactly these files and their class folders, nothing else."""
    if not folder.is_dir():
        return False
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*")}
    expected = set(relative) | {name.split("/", 1)[0] for name in relative}
    return present == expected
