"""Listing image files under a source folder, the same way for ingest and scoring.

In: a local (or FUSE-mounted) directory. Out: a :class:`Listing` of image files by relative
path, the zero-length ones apart, and a count of the files skipped, plus the helpers that
map Spark's ``binaryFile`` paths back to those relative paths.

The driver lists the tree itself because Spark's file scan silently drops zero-length
files and hidden (``.``/``_``) names; those must be counted, never lost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.images import IMAGE_EXTENSIONS, is_image_path
from pipelines.sources import SourceError


@dataclass(frozen=True)
class Listing:
    """Files under a source folder, by path relative to it (``/``-separated).

    Attributes:
        images: Non-empty files with an image extension.
        empty: Zero-length files with an image extension.
        skipped: Other files, and hidden ones (``.``/``_`` names), which Spark never reads.
    """

    images: list[str]
    empty: list[str]
    skipped: int


def list_tree(src: Path) -> Listing:
    """Walk ``src`` on the driver, classifying every file by name and size.

    Raises:
        SourceError: ``src`` holds no file at all.
    """
    images, empty, skipped = [], [], 0
    for directory, dirs, files in os.walk(src, followlinks=True):
        hidden_dirs = [d for d in dirs if d.startswith((".", "_"))]
        for hidden in hidden_dirs:
            dirs.remove(hidden)
            skipped += sum(len(f) for _, _, f in os.walk(Path(directory, hidden)))
        for name in files:
            path = Path(directory, name)
            rel = path.relative_to(src).as_posix()
            if name.startswith((".", "_")) or not is_image_path(name):
                skipped += 1
            elif path.stat().st_size == 0:
                empty.append(rel)
            else:
                images.append(rel)
    if not images and not empty and not skipped:
        raise SourceError(f"source is empty: {src}")
    return Listing(images, empty, skipped)


def image_glob() -> str:
    """A case-insensitive Hadoop glob of the image extensions (``*.{[pP][nN][gG],...}``).

    Passed to ``binaryFile`` as ``pathGlobFilter`` so the content of other files is never read.
    """
    classes = [
        "".join(f"[{c.lower()}{c.upper()}]" for c in ext[1:]) for ext in sorted(IMAGE_EXTENSIONS)
    ]
    return "*.{" + ",".join(classes) + "}"


def local_path(uri: str) -> str:
    """The file-system path of a Spark-listed file (a URI, possibly %-encoded)."""
    return unquote(urlparse(uri).path)


def relative(uri: str, root: str) -> str:
    """Path of a Spark-listed file relative to the source root."""
    local = local_path(uri)
    return local[len(root) :].lstrip("/") if local.startswith(root) else local


def file_uri(path: Path) -> str:
    """A ``file://`` URI Spark and Petastorm accept.

    Not ``Path.as_uri()``: it %-encodes ``=`` in ``split=train``, which Spark keeps literally.
    """
    return f"file://{path.resolve()}"
