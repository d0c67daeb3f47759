"""Listing image files under a source folder, the same way for ingest and scoring.

In: a local (or FUSE-mounted) directory. Out: a :class:`Listing` of image files by relative
path (the zero-length ones apart, when sizes are asked for), and a count of the files
skipped; :func:`read_file`, how executors then read a listed file by path.

The driver lists the tree itself because Spark's file scan silently drops zero-length
files and hidden (``.``/``_``) names; those must be counted, never lost. Executors read
the listed files by path (ingest and scoring alike) rather than through Spark's
``binaryFile`` source, which would list the tree again and ship every file's bytes
through the JVM: measured, a large share of both jobs' time on small images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.images import is_image_path
from pipelines.sources import SourceError


@dataclass(frozen=True)
class Listing:
    """Files under a source folder, by path relative to it (``/``-separated).

    Attributes:
        images: Files with an image extension, sorted; without sizes, every one of them.
        empty: Zero-length files with an image extension, sorted (only with sizes).
        skipped: Other files, and hidden ones (``.``/``_`` names), which Spark never reads.
        unreadable: Files with an image extension that cannot even be examined (a broken
            link, no permission), with why (only with sizes). Spark's scan silently drops
            them too.
    """

    images: list[str]
    empty: list[str]
    skipped: int
    unreadable: dict[str, str] = field(default_factory=dict)


def list_tree(src: Path, *, sizes: bool = True) -> Listing:
    """Walk ``src`` on the driver, classifying every file by name (and size).

    Symbolic links to folders are followed. Plain strings and ``os.scandir`` rather than
    ``pathlib``: per-file ``Path`` objects cost more than the walk itself on a large tree.

    Args:
        src: The folder.
        sizes: Examine each image file (one ``stat``) to set the empty and unreadable ones
            apart. Ingest and scoring pass False: their executors read every file anyway
            and give an empty or unreadable one the same reason, and the driver is spared
            a system call per file, which is a network round trip on a FUSE mount of
            cloud storage (``/dbfs``) and a third of the listing's time on a local disk.

    Returns:
        The listing, its relative paths sorted.

    Raises:
        SourceError: ``src`` holds no file at all, or a folder in it cannot be listed.
    """
    images, empty, skipped, unreadable = [], [], 0, {}
    root = str(src)
    folders = [""]  # relative paths of the folders still to list
    while folders:
        folder = folders.pop()
        for entry in _entries(f"{root}/{folder}" if folder else root):
            rel = f"{folder}/{entry.name}" if folder else entry.name
            hidden = entry.name.startswith((".", "_"))
            if entry.is_dir():
                if hidden:
                    skipped += _count_files(entry.path)
                else:
                    folders.append(rel)
            elif hidden or not is_image_path(entry.name):
                skipped += 1
            elif not sizes:
                images.append(rel)
            else:
                try:
                    size = entry.stat().st_size
                except OSError as exc:
                    unreadable[rel] = f"cannot read file: {exc.strerror or exc}"
                    continue
                (images if size else empty).append(rel)
    if not images and not empty and not skipped and not unreadable:
        raise SourceError(f"source is empty: {src}")
    return Listing(sorted(images), sorted(empty), skipped, unreadable)


def _entries(folder: str) -> list[os.DirEntry]:
    """The entries of one folder; an unreadable folder is an error, not silently empty."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise SourceError(f"cannot list {folder}: {exc.strerror or exc}") from exc


def _count_files(folder: str) -> int:
    """Files anywhere under ``folder`` (a hidden one: all of them are skipped)."""
    return sum(len(files) for _, _, files in os.walk(folder))


def read_file(path: str | bytes) -> tuple[bytes | None, str | None]:
    """Read one listed file: ``(content, None)``, or ``(None, why)`` if it cannot be read.

    A file gone, unreadable or turned into a folder since the listing is a reason recorded
    against that file, not a failed job.

    Args:
        path: The path, as ``str`` or as its raw bytes (what executors get: a name that is
            not valid UTF-8 cannot cross Spark as a string).
    """
    try:
        with open(path, "rb") as file:
            return file.read(), None
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror or exc}"


def display_path(path: str) -> str:
    r"""The form of a path in every table, manifest, log and report: always valid UTF-8.

    Linux names are bytes; one that is not valid UTF-8 (Latin-1 names from older Windows
    or Samba shares, some cameras) reaches Python with surrogate escapes, which a Spark
    string, Arrow, Parquet or JSON cannot carry. Each undecodable byte is shown as
    ``\xNN`` instead; a valid UTF-8 name is unchanged. To open the file, use the raw
    bytes (:func:`os.fsencode`), which executors get beside the display form.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")
