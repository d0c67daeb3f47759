"""Labels from a table: a CSV or Parquet file of ``path,label`` rows (``ingest.labels``).

In: the table's location and the source folder. Out: :func:`read_labels_table`'s two string
columns, and :func:`match_labels`' plan: which listed image gets which label, and why each
row or file that cannot be used is quarantined (the same table of reasons as bad images).

A ``path`` is relative to the source (``cats/001.jpg``), or absolute inside it; ``./`` and
``..`` are resolved. A label is any non-empty string (a number is read as its text).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

#: The columns a labels table must have.
PATH_COLUMN, LABEL_COLUMN = "path", "label"

#: Table formats, by file name extension.
_CSV, _PARQUET = (".csv", ".tsv", ".txt"), (".parquet", ".pq")


class LabelsTableError(UserError):
    """The labels table cannot be read, or lacks its ``path`` and ``label`` columns."""


@dataclass
class LabelPlan:
    """What a labels table says about a source's listed images.

    Attributes:
        labels: Relative path (as listed) to label, for every image that is used.
        rejected: Relative path (of a row or a listed file) to why it is quarantined.
    """

    labels: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def read_labels_table(path: str | Path) -> pd.DataFrame:
    """Read the ``path`` and ``label`` columns of a CSV or Parquet file, as strings.

    Args:
        path: A ``.csv`` (or ``.tsv``/``.txt``, tab- or comma-separated, with a header row)
            or ``.parquet`` file.

    Returns:
        A DataFrame with exactly the columns ``path`` and ``label`` (str; missing is "").

    Raises:
        LabelsTableError: The file is missing, unreadable, of another format, or lacks a
            column.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    try:
        if suffix in _PARQUET:
            table = pq.read_table(file).to_pandas()
        elif suffix in _CSV:
            # sep=None sniffs comma or tab; every cell as text, an empty one as "".
            table = pd.read_csv(file, sep=None, engine="python", dtype=str, keep_default_na=False)
        else:
            raise LabelsTableError(
                f"labels table {file}: expected a .csv or .parquet file, got {suffix or 'none'}"
            )
    except LabelsTableError:
        raise
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise LabelsTableError(f"cannot read labels table {file}: {reason}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in (PATH_COLUMN, LABEL_COLUMN) if c not in table.columns]
    if missing:
        raise LabelsTableError(
            f"labels table {file} lacks column {', '.join(missing)}: it needs a header "
            f"row with {PATH_COLUMN},{LABEL_COLUMN} (found {', '.join(table.columns) or 'none'})"
        )
    columns = table[[PATH_COLUMN, LABEL_COLUMN]]
    return columns.apply(lambda c: c.map(lambda v: "" if v is None else str(v).strip()))


def match_labels(
    table: pd.DataFrame, source: Path, listed: list[str], table_name: str
) -> LabelPlan:
    """Match a table's rows with the source's listed images.

    Quarantined with a reason: a row whose path is outside the source, names no listed
    image (missing, hidden or not an image file) or has an empty label; every row of a
    path labelled twice with different labels; a listed image no row names.

    Args:
        table: :func:`read_labels_table`'s rows.
        source: The source folder (absolute).
        listed: The relative paths of the source's image files.
        table_name: The table's name, for reasons.

    Returns:
        The labels of the images to ingest and the reasons of the rest.
    """
    plan = LabelPlan()
    images = set(listed)
    root = str(source).rstrip("/")
    seen: dict[str, str] = {}
    for raw_path, label in zip(table[PATH_COLUMN], table[LABEL_COLUMN], strict=True):
        rel = _relative(raw_path, root)
        key = rel if rel is not None else raw_path
        if key in plan.rejected:
            continue
        if rel is None:
            plan.rejected[key] = f"listed in {table_name} but outside the source {root}"
        elif not label:
            plan.rejected[key] = f"empty label in {table_name}"
        elif rel not in images:
            plan.rejected[key] = f"listed in {table_name} but {_why_unlisted(root, rel)}"
        elif seen.get(rel, label) != label:
            plan.rejected[key] = f"labelled twice in {table_name}: {seen[rel]!r} and {label!r}"
            plan.labels.pop(rel, None)
        else:
            seen[rel] = label
            plan.labels[rel] = label
    for rel in listed:
        if rel not in plan.labels and rel not in plan.rejected:
            plan.rejected[rel] = f"no label in {table_name}"
    return plan


def _relative(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` (``/``-separated, normalised), None when outside it."""
    if not path:
        return None
    joined = posixpath.normpath(path if path.startswith("/") else f"{root}/{path}")
    prefix = f"{root}/"
    return joined[len(prefix) :] if joined.startswith(prefix) else None


def _why_unlisted(root: str, rel: str) -> str:
    """Why a path inside the source is not among its listed images."""
    target = Path(f"{root}/{rel}")
    if not target.exists():
        return "not found under the source"
    if target.is_dir():
        return "it is a folder"
    return "not an image file (hidden, or another extension)"
