"""Every location the pipeline reads or writes by default, and the one ``file://`` helper.

In: the resolved configuration (``work_dir``, ``ingest.output``, ``score.table``,
``mlflow.tracking_uri``/``registry_uri``) and ``MLFLOW_TRACKING_URI``. Out:
:class:`Locations`, which owns the work directory's layout, in the spirit of Horovod's
``Store`` (one object that knows every path, so no other module spells one out), and
:func:`to_url`, the only place a local path becomes the URL Spark and Petastorm are given.

The layout under ``work_dir`` (all of it replaceable by configuration or a command's
options, e.g. a cluster's shared folder or Unity Catalog volumes)::

    datasets/prepared/   ingest's output (the prepared dataset, see pipelines.schema)
    tables/scores/       the scoring table
    mlflow.db            the local MLflow tracking and registry store (sqlite)
    mlartifacts/         that store's artifacts (run reports, logged models)
    training/<model>/    rank 0's checkpoints, per registered model name
    cache/models/        models downloaded for scoring
    reports/             pages written by ``dlpipe report``
    demo-digits/         the bundled digits as image files (``dlpipe demo-data``)
    bench/               ``dlpipe bench``'s generated data and scratch space
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pipelines.config import Config

#: A URI scheme followed by a colon (``file:``, ``s3a:``, ``dbfs:``); not a drive letter.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``file://``, ``s3a://``, ``dbfs:/``), not a local path."""
    return _SCHEME.match(os.fspath(location)) is not None


def to_url(location: str | os.PathLike[str]) -> str:
    """A local path as the ``file://`` URL Spark and Petastorm accept; URIs pass unchanged.

    Args:
        location: A local path (relative or absolute), ``file:/...`` or any other URI.

    Returns:
        The URL. Not ``Path.as_uri()``: that %-encodes the ``=`` of ``split=train``, which
        Spark and Petastorm would then look for literally.
    """
    text = os.fspath(location)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return f"file://{parsed.path}"
    if is_uri(text):
        return text
    return f"file://{os.path.abspath(os.path.expanduser(text))}"


def sqlite_store(directory: Path) -> str:
    """The tracking URI of the local MLflow store (sqlite) kept in ``directory``."""
    return f"sqlite:///{directory / 'mlflow.db'}"


def local_path(url: str) -> str | None:
    """The local path of a ``file://`` URL or of a plain path; None for other schemes."""
    if not is_uri(url):
        return os.path.abspath(os.path.expanduser(url))
    parsed = urlparse(url)
    return parsed.path if parsed.scheme == "file" else None


@dataclass(frozen=True)
class Locations:
    """Where each stage reads and writes unless told otherwise.

    Attributes:
        work: The work directory, absolute.
        prepared: The prepared dataset (``ingest.output``, else under ``work``).
        table: The scoring table: a path, a URI, or a catalog table name
            (``score.table``, else under ``work``).
        tracking_uri: MLflow tracking URI: ``mlflow.tracking_uri``, then
            ``MLFLOW_TRACKING_URI``, then the sqlite store in ``work``.
        registry_uri: MLflow registry URI when it is not the tracking store (None).
    """

    work: Path
    prepared: Path
    table: str
    tracking_uri: str
    registry_uri: str | None = None

    @classmethod
    def of(cls, config: Config) -> Locations:
        """The locations of a resolved configuration."""
        work = Path(config.work_dir).expanduser().resolve()
        prepared = (
            Path(config.ingest.output).expanduser().resolve()
            if config.ingest.output
            else work / "datasets" / "prepared"
        )
        tracking = (
            config.mlflow.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or sqlite_store(work)
        )
        return cls(
            work=work,
            prepared=prepared,
            table=config.score.table or str(work / "tables" / "scores"),
            tracking_uri=tracking,
            registry_uri=config.mlflow.registry_uri,
        )

    @property
    def local_store(self) -> bool:
        """Whether tracking is a local sqlite store (whose artifacts go to :attr:`artifacts`)."""
        return self.tracking_uri.startswith("sqlite:")

    @property
    def artifacts(self) -> Path:
        """Artifact root of experiments created in the local sqlite store."""
        return self.work / "mlartifacts"

    @property
    def demo_data(self) -> Path:
        """Where ``dlpipe demo-data`` writes the bundled digits."""
        return self.work / "demo-digits"

    @property
    def reports(self) -> Path:
        """Where ``dlpipe report`` and the pipeline write HTML pages."""
        return self.work / "reports"

    @property
    def model_cache(self) -> Path:
        """Models downloaded for batch scoring, by version (reused by later jobs)."""
        return self.work / "cache" / "models"

    @property
    def bench(self) -> Path:
        """``dlpipe bench``'s cache of generated data, and its scratch space."""
        return self.work / "bench"

    def training(self, model_name: str) -> Path:
        """Rank 0's checkpoints and the ranks' placement files for ``model_name``."""
        return self.work / "training" / model_name
