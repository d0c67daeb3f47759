"""The Store: every location the pipeline reads or writes, and every file operation on them.

In: the resolved configuration (``work_dir``, ``ingest.output``, ``score.table``,
``mlflow.tracking_uri``/``registry_uri``) and ``MLFLOW_TRACKING_URI``. Out: a :class:`Store`,
built once per command by :mod:`pipelines.pipeline` and passed to the stages, in the spirit
of Horovod's ``spark/common/store.py``: one object that knows every path *and* performs the
file operations on them, so no other module spells out a part of a layout or renames a
file. Its parts are small frozen dataclasses of strings, picklable, that travel to training
ranks and Spark executors:

- :class:`DatasetDir`: a prepared dataset (``split=<name>/``, ``_quarantine/``,
  ``_manifest.json``; the columns and the manifest's fields are :mod:`pipelines.schema`'s);
- :class:`RunDir`: a training run's folder (rank 0's checkpoints, the final model, the
  ranks' placement files, the MLflow run it belongs to);
- :class:`ScoringTable`: the scoring table (``batch_id=<id>/`` partitions, ``_classes/``);
- :class:`ModelDir`: a logged model's folder (its Keras file and label sidecar).

The work directory's layout (each part replaceable by configuration or a command's options,
e.g. a cluster's shared folder or Unity Catalog volumes)::

    datasets/prepared/   ingest's output (a DatasetDir)
    tables/scores/       the scoring table (a ScoringTable)
    mlflow.db            the local MLflow tracking and registry store (sqlite)
    mlartifacts/         that store's artifacts (run reports, logged models)
    training/<model>/    a RunDir per registered model name
    cache/models/        models downloaded for scoring
    reports/             pages written by ``dlpipe report``, ``explain`` and ``run``
    demo-digits/         the bundled digits as image files (``dlpipe demo-data``)
    bench/               ``dlpipe bench``'s generated data and scratch space

File operations: an atomic write of a file (:func:`write_atomic`), the one atomic commit of a
staged folder (:func:`replace_dir`), staging folders owned by a process (:class:`Staging`),
and the one liveness check of a process that owns a path or a run (:class:`Owner`). They go
through pyarrow's file-system layer (``pyarrow.fs``), chosen per location by its URL scheme,
so an object store can be added here without touching the stages; today the pipeline's own
files are local (or on a mount the driver and executors share).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipelines.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs

    from pipelines.config import Config
    from pipelines.schema import Manifest

log = logging.getLogger(__name__)

#: A URI scheme followed by a colon (``file:``, ``s3a:``, ``dbfs:``); not a drive letter.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")

#: Partition values Spark writes into folder names as they are (it escapes other characters).
_PLAIN_PARTITION_VALUE = re.compile(r"[A-Za-z0-9._-]+")


# --- locations as paths and URLs -------------------------------------------------------------


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


def local_path(url: str | os.PathLike[str]) -> str | None:
    """The local path of a ``file://`` URL or of a plain path; None for other schemes."""
    text = os.fspath(url)
    if not is_uri(text):
        return os.path.abspath(os.path.expanduser(text))
    parsed = urlparse(text)
    return parsed.path if parsed.scheme == "file" else None


def sqlite_store(directory: Path) -> str:
    """The tracking URI of the local MLflow store (sqlite) kept in ``directory``."""
    return f"sqlite:///{directory / 'mlflow.db'}"


def _join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI alike."""
    return "/".join([root.rstrip("/"), *parts])


# --- the file system under a location ---------------------------------------------------------


def filesystem(location: str | os.PathLike[str]) -> tuple[pyarrow.fs.FileSystem, str]:
    """Pyarrow's file system for ``location`` and the path inside it.

    A local path or ``file://`` URL is the local file system; any other URI is whatever
    pyarrow resolves its scheme to (``s3://``, ``gs://``, ``hdfs://``, ...).
    """
    import pyarrow.fs

    local = local_path(location)
    if local is not None:
        return pyarrow.fs.LocalFileSystem(), local
    return pyarrow.fs.FileSystem.from_uri(os.fspath(location))


def exists(location: str | os.PathLike[str]) -> bool:
    """Whether a file or folder is at ``location``."""
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole file at ``location``.

    Raises:
        FileNotFoundError: There is none.
    """
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike[str]) -> str:
    """The whole text file at ``location`` (UTF-8)."""
    return read_bytes(location).decode("utf-8")


def write_atomic(location: str | os.PathLike[str], data: bytes | str) -> None:
    """Write a whole file so that readers see the old content or the new, never part of one.

    The bytes go to a hidden temporary file beside the target, which then replaces it in one
    rename (atomic on a local or shared POSIX file system).
    """
    fs, path = filesystem(location)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = _join(parent, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp") if parent else name
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with fs.open_output_stream(tmp) as stream:
            stream.write(payload)
        fs.move(tmp, path)
    finally:
        _delete_file(fs, tmp)


def move_into(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move a complete file (written elsewhere on the same file system) to ``target`` at once."""
    fs, source = filesystem(staged)
    _, destination = filesystem(target)
    fs.move(source, destination)


def remove(location: str | os.PathLike[str]) -> None:
    """Remove a file or a whole folder at ``location``; nothing there is fine."""
    import pyarrow.fs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.Directory and not os.path.islink(path):
        fs.delete_dir(path)
    elif info.type != pyarrow.fs.FileType.NotFound or os.path.islink(path):
        _delete_file(fs, path)


def _delete_file(fs: pyarrow.fs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass  # already gone (or never written)


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put a complete staged folder in place of ``target``: the one atomic commit of a folder.

    A reader sees the previous folder or the new one, never a mix: a missing ``target`` is
    renamed into at once; an existing one is first renamed aside (``.<name>.old-<hex>``), kept
    until the new folder is in, then removed. A run killed between the two renames leaves
    the old folder aside, which :meth:`Staging.remove_stale` removes once ``target`` exists.
    """
    fs, source = filesystem(staged)
    _, destination = filesystem(target)
    if not exists(target) and not os.path.islink(destination):
        try:
            fs.move(source, destination)
            return
        except OSError:
            if not exists(target):
                raise
            # Another writer put its folder there meanwhile: replace it as any other.
    parent, name = destination.rsplit("/", 1)
    retired = _join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
    fs.move(destination, retired)
    fs.move(source, destination)
    remove(retired)


def publish_dir_once(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> bool:
    """Put a complete staged folder at ``target`` unless a folder is there already.

    For content that never changes once made (a model version's files): of several
    writers meeting at the same moment, the first rename wins and the others' copies are
    removed, so a folder a reader already uses is never swapped from under it.

    Returns:
        Whether ``staged`` became ``target`` (False: another writer's copy is in place).
    """
    fs, source = filesystem(staged)
    _, destination = filesystem(target)
    if not exists(target):
        try:
            fs.move(source, destination)
            return True
        except OSError:
            if not exists(target):
                raise
    remove(staged)
    return False


# --- processes that own a path or a run -------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """A process that owns a staging folder or an MLflow run: enough to tell later if it runs.

    Attributes:
        host: Its host name.
        pid: Its process id.
        started: When it started (seconds since the epoch), telling a reused pid apart.
        boot: When its host booted (seconds since the epoch), telling a reboot apart; None
            when not recorded (run tags).
    """

    host: str
    pid: int
    started: float | None = None
    boot: float | None = None

    @classmethod
    def me(cls) -> Owner:
        """This process."""
        import psutil

        pid = os.getpid()
        return cls(socket.gethostname(), pid, psutil.Process(pid).create_time(), psutil.boot_time())

    def alive(self) -> bool | None:
        """Whether the owner still runs; None when that cannot be told from here.

        Only an owner on this host can be checked: it is gone when its host rebooted since,
        no process has its pid, or the process with its pid started at another time (the
        pid was reused).
        """
        import psutil

        if self.host != socket.gethostname():
            return None
        if self.boot is not None and abs(psutil.boot_time() - self.boot) > 1.0:
            return False
        try:
            started = psutil.Process(self.pid).create_time()
        except (psutil.NoSuchProcess, ValueError):
            return False
        except psutil.AccessDenied:
            return True  # someone else's live process
        return self.started is None or abs(started - self.started) < 1.0

    def describe(self) -> str:
        """``pid P on host H``."""
        return f"pid {self.pid} on host {self.host}"

    def to_json(self) -> str:
        """The owner as an owner file's text."""
        return json.dumps(
            {"host": self.host, "pid": self.pid, "started": self.started, "boot": self.boot}
        )

    @classmethod
    def from_json(cls, text: str) -> Owner:
        """Parse an owner file.

        Raises:
            ValueError: Not an owner file (not JSON, or no host and pid).
        """
        data = json.loads(text)
        try:
            return cls(
                str(data["host"]),
                int(data["pid"]),
                _optional_float(data.get("started")),
                _optional_float(data.get("boot")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an owner file: {exc}") from None

    #: The owner as MLflow tags on a run (``owner_host``, ``owner_pid``, ``owner_started``).
    TAGS = ("owner_host", "owner_pid", "owner_started")

    def tags(self) -> dict[str, str]:
        """The owner as run tags."""
        host, pid, started = self.TAGS
        return {host: self.host, pid: str(self.pid), started: f"{self.started or 0:.3f}"}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Owner | None:
        """The owner recorded on a run, None when the run has no owner tags."""
        host, pid, started = cls.TAGS
        if host not in tags or pid not in tags:
            return None
        try:
            return cls(tags[host], int(tags[pid]), _optional_float(tags.get(started)))
        except ValueError:
            return None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- staging folders ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Staging:
    """Staging folders beside an output, each owned by the process writing it.

    A run stages its output in ``.<name>.tmp-<hex>`` beside ``target`` with an owner file
    naming its host and process, then commits it with :func:`replace_dir`; a later run
    removes such folders whose process is gone (:meth:`remove_stale`), never a live run's.

    Attributes:
        target: The output the folders are staged for (a local path).
        stale_unchecked_s: A folder whose writer cannot be checked (another host, no owner
            file: a run killed at its very start) counts as stale once untouched this long.
    """

    target: str
    stale_unchecked_s: float = 2 * 24 * 3600

    #: The owner file inside a staging folder, removed before the commit.
    OWNER_FILE = "_owner.json"
    #: Scratch folder inside a staging folder for the files of Spark task attempts (a job's
    #: files are moved out of it; those of failed or duplicate attempts are removed with it).
    ATTEMPTS_DIR = "_staging"

    @contextmanager
    def folder(self, owned: bool = True) -> Iterator[Path]:
        """A new staging folder (with this process's owner file); removed unless committed.

        Args:
            owned: Write the owner file (a folder a later run may clean up).
        """
        target = Path(self.target)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            if owned:
                write_atomic(folder / self.OWNER_FILE, Owner.me().to_json() + "\n")
            yield folder
        finally:
            remove(folder)

    def commit(self, folder: Path) -> None:
        """Put the staged ``folder`` in place of the target (its owner file removed first)."""
        remove(folder / self.OWNER_FILE)
        replace_dir(folder, self.target)

    def remove_stale(self) -> None:
        """Remove the staging folders killed runs left beside the target; report the others.

        Only folders of this target (``.<name>.tmp-*``, and ``.<name>.old-*`` once the
        target exists again) are considered. One whose owner ran on this host is stale when
        that process is gone; a live one is left alone. One whose writer cannot be checked
        is stale once untouched for :attr:`stale_unchecked_s`, else left and reported.
        """
        import glob

        target = Path(self.target)
        if not target.parent.is_dir():
            return
        pattern = f".{glob.escape(target.name)}"
        if target.exists():
            for old in target.parent.glob(f"{pattern}.old-*"):
                # The previous output of a run killed while swapping: the target replaced it.
                log.warning("removing %s, left by a run killed while committing", old)
                remove(old)
        for folder in target.parent.glob(f"{pattern}.tmp-*"):
            verdict, why = self._staleness(folder)
            if verdict == "stale":
                log.warning("removing stale staging folder %s (%s)", folder, why)
                remove(folder)
            elif verdict == "unknown":
                log.warning("leaving staging folder %s (%s)", folder, why)

    def _staleness(self, folder: Path) -> tuple[str, str]:
        """``("stale" | "live" | "unknown", why)`` for one staging folder."""
        owner: Owner | None = None
        try:
            owner = Owner.from_json((folder / self.OWNER_FILE).read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a torn or foreign file: judged by age
            log.debug("owner file of %s unreadable: %s", folder, exc)
        alive = owner.alive() if owner else None
        if alive is False:
            return "stale", f"its writer, {owner.describe()}, is gone"  # type: ignore[union-attr]
        if alive:
            return "live", f"{owner.describe()} is running"  # type: ignore[union-attr]
        try:
            idle = time.time() - folder.stat().st_mtime
        except FileNotFoundError:
            return "live", "gone meanwhile"  # its run finished or cleaned it up
        writer = owner.describe() if owner else "no readable owner file"
        if idle > self.stale_unchecked_s:
            return "stale", f"{writer}, untouched for {idle / 3600:.0f} h"
        return (
            "unknown",
            f"{writer}: cannot tell if it still runs; untouched for {idle / 60:.0f} min",
        )


# --- the parts of the layout -----------------------------------------------------------------


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No prepared dataset (no manifest) where one was expected."""


@dataclass(frozen=True)
class DatasetDir:
    """A prepared dataset: one Parquet dataset per split, the quarantine and the manifest.

    Each split is a complete Petastorm dataset of its own (``make_reader`` shards by
    row-group index over the whole dataset, so a split must not share one with others),
    named ``split=<name>`` so that ``spark.read.parquet(root)`` also sees all splits. The
    sidecars' leading underscore hides them from Parquet readers.

    Attributes:
        root: The dataset folder: a local path or a URL.
    """

    root: str

    MANIFEST_FILE = "_manifest.json"
    QUARANTINE_DIR = "_quarantine"
    SPLIT_PREFIX = "split="
    #: Petastorm's metadata file in each split (its Unischema, row groups per file).
    PETASTORM_METADATA = "_common_metadata"
    #: A Parquet summary file some writers leave in a split (row groups of every file).
    PARQUET_SUMMARY = "_metadata"

    def split(self, name: str) -> str:
        """Location of one split, ``<root>/split=<name>`` (a path or URL as the root is)."""
        return _join(self.root, f"{self.SPLIT_PREFIX}{name}")

    def split_url(self, name: str) -> str:
        """One split as the URL Spark and the readers are given."""
        return to_url(self.split(name))

    @property
    def url(self) -> str:
        """The whole dataset as a URL."""
        return to_url(self.root)

    @property
    def manifest_path(self) -> str:
        """``<root>/_manifest.json``."""
        return _join(self.root, self.MANIFEST_FILE)

    @property
    def quarantine(self) -> str:
        """``<root>/_quarantine``: the Parquet table of rejected records."""
        return _join(self.root, self.QUARANTINE_DIR)

    def manifest_bytes(self) -> bytes:
        """The manifest file as written (what the run's lineage digest is taken of).

        Raises:
            DatasetNotFoundError: There is no manifest (no prepared dataset here).
        """
        try:
            return read_bytes(self.manifest_path)
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"no prepared dataset at {self.root} (missing {self.MANIFEST_FILE}); "
                "run 'dlpipe ingest' first"
            ) from None

    def read_manifest(self) -> Manifest:
        """The dataset's manifest.

        Raises:
            DatasetNotFoundError: There is no manifest.
        """
        from pipelines.schema import Manifest

        return Manifest.from_json(self.manifest_bytes().decode("utf-8"))

    def write_manifest(self, manifest: Manifest) -> None:
        """Write ``_manifest.json`` (sorted keys, so the bytes are stable)."""
        write_atomic(self.manifest_path, manifest.to_json())

    def unreadable_files(self) -> dict[str, str]:
        """The dataset's Parquet files whose footer cannot be read, each with why.

        Only footers are read (pyarrow), no data: a file cut short, overwritten or not
        Parquet at all shows there. The files of every split (and Petastorm's
        ``_common_metadata``), by a thread pool: on a mount of remote storage each footer is
        a round trip.

        Returns:
            Path relative to the dataset -> pyarrow's reason, for every unreadable file.
        """
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        from pipelines.schema import SPLITS

        root = Path(self.root)
        files = sorted(
            path
            for split in SPLITS
            for path in Path(self.split(split)).glob("*")
            if path.name.endswith(".parquet") or path.name == self.PETASTORM_METADATA
        )

        def why(path: Path) -> str | None:
            try:
                pq.read_metadata(path)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return None

        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(why, files))
        return {
            str(path.relative_to(root)): reason
            for path, reason in zip(files, reasons, strict=True)
            if reason is not None
        }

    @classmethod
    def of_split(cls, split_location: str) -> DatasetDir:
        """The dataset a split location (``<root>/split=<name>``) belongs to."""
        return cls(split_location.rstrip("/").rsplit("/", 1)[0])


@dataclass(frozen=True)
class RunDir:
    """A training run's folder: rank 0's checkpoints, the final model, the ranks' files.

    What the files hold (the checkpoint's format) is :mod:`pipelines.train.checkpoint`'s;
    this names them and writes them atomically. The folder must be visible to the driver
    and every rank (local disk locally, a shared mount on a cluster).

    Attributes:
        root: The folder (a local path).
    """

    root: str

    #: The checkpoint's commit point (JSON naming the model file of its epoch).
    CHECKPOINT_STATE = "checkpoint.json"
    #: One full model (with optimizer state) per committed epoch: HDF5 on Keras 2, the
    #: ``.keras`` zip on Keras 3 (whose HDF5 loader leaves the optimizer's state behind).
    CHECKPOINT_MODEL = "checkpoint-{epoch:04d}{suffix}"
    CHECKPOINT_MODELS = ("checkpoint-*.h5", "checkpoint-*.keras")
    #: The one model file of checkpoints written before 2026-12.
    LEGACY_CHECKPOINT_MODEL = "checkpoint.h5"
    #: The best weights, no optimizer: what gets evaluated and logged.
    FINAL_MODEL = "model.h5"
    #: ``rank-<n>.json`` per rank: its host and pid, so the driver can name a rank that died.
    RANKS_DIR = "ranks"
    #: The MLflow run this folder belongs to (what ``--resume`` reopens).
    RUN_RECORD = "run.json"
    #: The registered model ``train.init_from`` names, copied where every rank reads it.
    INIT_MODEL = "init-from.h5"

    @property
    def path(self) -> Path:
        """The folder as a local path."""
        return Path(self.root)

    @property
    def checkpoint_state(self) -> Path:
        """The checkpoint's commit point."""
        return self.path / self.CHECKPOINT_STATE

    def checkpoint_model(
        self, epoch: int | None = None, name: str | None = None, *, keras3: bool = False
    ) -> Path:
        """The model file of the checkpoint of ``epoch`` (or named ``name``, as a state says).

        ``keras3`` picks the Keras 3 format's suffix for a new file of ``epoch``.
        """
        if name is None:
            name = self.CHECKPOINT_MODEL.format(epoch=epoch, suffix=".keras" if keras3 else ".h5")
        return self.path / name

    @property
    def final_model(self) -> Path:
        """The final model (float32, no optimizer state)."""
        return self.path / self.FINAL_MODEL

    @property
    def init_model(self) -> Path:
        """The model a warm start (``train.init_from``) takes its weights from."""
        return self.path / self.INIT_MODEL

    def rank_file(self, rank: int) -> Path:
        """What rank ``rank`` wrote about itself."""
        return self.path / self.RANKS_DIR / f"rank-{rank}.json"

    def rank_files(self) -> list[Path]:
        """Every rank's file of the last start, by name."""
        return sorted((self.path / self.RANKS_DIR).glob("rank-*.json"))

    def clear_ranks(self) -> None:
        """Remove the ranks' files: the ranks of a new start write them anew."""
        remove(self.path / self.RANKS_DIR)

    def clear_old_checkpoints(self, keep: Path) -> None:
        """Remove every checkpoint model but ``keep`` (after the state naming it committed)."""
        for pattern in self.CHECKPOINT_MODELS:
            for old in self.path.glob(pattern):
                if old != keep:
                    remove(old)
        remove(self.path / self.LEGACY_CHECKPOINT_MODEL)

    def save_model(self, target: Path, save: Callable[[Path], None]) -> None:
        """Write a model file atomically: ``save(tmp)`` writes it, then it replaces ``target``."""
        self.path.mkdir(parents=True, exist_ok=True)
        # Keeps the suffix: Keras 3 picks the format from it (and refuses others).
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
        try:
            save(tmp)
            move_into(tmp, target)
        finally:
            remove(tmp)

    def remember_run(self, run_id: str) -> None:
        """Record the MLflow run this folder belongs to, and this process as its owner."""
        record = {"run_id": run_id, "owner": json.loads(Owner.me().to_json())}
        write_atomic(self.path / self.RUN_RECORD, json.dumps(record))

    def owner(self) -> Owner | None:
        """The process that last trained in this folder, None when not recorded."""
        try:
            record = json.loads(read_text(self.path / self.RUN_RECORD))
            return Owner.from_json(json.dumps(record["owner"]))
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def remembered_run(self) -> str | None:
        """The MLflow run recorded by :meth:`remember_run`, None without one."""
        try:
            return str(json.loads(read_text(self.path / self.RUN_RECORD))["run_id"])
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class ScoringTable:
    """The scoring table: a partition per batch, and the class order of each model version.

    Attributes:
        location: A path, a URI, or (Delta) a catalog table name.
        format: ``parquet`` or ``delta``.
    """

    location: str
    format: str = "parquet"

    #: Sidecar folder with the class order of ``probabilities``, one file per model version.
    CLASSES_DIR = "_classes"
    PARTITION_COLUMN = "batch_id"

    @property
    def is_catalog_table(self) -> bool:
        """Whether the location names a catalog table rather than a path or URI."""
        return "/" not in self.location

    @property
    def url(self) -> str:
        """The table's folder as the URL Spark is given."""
        return to_url(self.location)

    def classes_file(self, stem: str) -> str:
        """``<table>/_classes/<stem>.json``: one model version's class order."""
        return _join(self.location, self.CLASSES_DIR, f"{stem}.json")

    def local_partition(self, batch_id: str) -> Path | None:
        """The local folder of one batch's Parquet files, None where it is not a plain path.

        None for Delta, for a URI, and for a batch id Spark would escape in the folder name.
        """
        if (
            self.format != "parquet"
            or is_uri(self.location)
            or not _PLAIN_PARTITION_VALUE.fullmatch(batch_id)
        ):
            return None
        return Path(self.location) / f"{self.PARTITION_COLUMN}={batch_id}"


@dataclass(frozen=True)
class ModelDir:
    """A logged image model's folder, as MLflow writes (and downloads) it.

    MLflow copies every artifact of a pyfunc model into its ``artifacts/``: the Keras model
    file and the label sidecar (class names in the order of ``probabilities``, the input
    shape, the task), which serving writes and scoring reads.

    Attributes:
        root: The model's folder (a local path).
    """

    root: str

    ARTIFACTS_DIR = "artifacts"
    KERAS_FILE = "model.h5"
    LABELS_FILE = "labels.json"
    #: MLflow's description of the model (flavours, signature, the run that logged it).
    MLMODEL_FILE = "MLmodel"

    @property
    def labels_path(self) -> Path:
        """The label sidecar."""
        return Path(self.root) / self.ARTIFACTS_DIR / self.LABELS_FILE

    @property
    def keras_path(self) -> Path:
        """The Keras model file (float32, no optimizer state)."""
        return Path(self.root) / self.ARTIFACTS_DIR / self.KERAS_FILE

    def meta(self) -> dict[str, Any]:
        """The label sidecar: ``label_names``, ``image_shape``, ``task``; {} without one."""
        path = self.labels_path
        return json.loads(path.read_text()) if path.is_file() else {}

    def label_names(self) -> list[str]:
        """Class names (the order of ``probabilities``); [] when the model has none."""
        return list(self.meta().get("label_names", []))

    @property
    def archive_path(self) -> Path:
        """The model folder as one zip archive beside it (what scoring ships to executors)."""
        root = Path(self.root)
        return root.with_name(f"{root.name}.zip")

    def archive(self) -> Path:
        """The folder's zip archive, made once and published atomically; its path.

        Each writer zips into its own staging file (``.<name>.zip.<pid>-<hex>.tmp.zip``)
        and renames it into place: two jobs meeting a new model version at the same moment
        each build a complete archive and the last rename wins, with identical content, so
        no reader ever sees a half-written or shared staging file.
        """
        import shutil

        target = self.archive_path
        if target.is_file():
            return target
        stem = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        staged = ""
        try:
            staged = shutil.make_archive(str(stem), "zip", self.root)
            move_into(staged, target)
        finally:
            if staged:
                remove(staged)
        return target

    def run_id(self) -> str | None:
        """The MLflow run that logged the model, None when MLflow did not record one."""
        import yaml

        path = Path(self.root) / self.MLMODEL_FILE
        if not path.is_file():
            return None
        run_id = (yaml.safe_load(path.read_text()) or {}).get("run_id")
        return str(run_id) if run_id else None


#: Where a training run keeps the manifest of the dataset it trained on (an MLflow artifact).
MANIFEST_ARTIFACT = f"dataset/{DatasetDir.MANIFEST_FILE}"


# --- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """Where each stage reads and writes unless told otherwise, and the files under it.

    Attributes:
        work: The work directory, absolute.
        prepared: The prepared dataset (``ingest.output``, else under ``work``).
        table: The scoring table: a path, a URI, or a catalog table name
            (``score.table``, else under ``work``).
        tracking_uri: MLflow tracking URI: ``mlflow.tracking_uri``, then
            ``MLFLOW_TRACKING_URI``, then the sqlite store in ``work``.
        registry_uri: MLflow registry URI when it is not the tracking store (None).
        table_format: ``score.format``: ``parquet`` or ``delta``.
    """

    work: Path
    prepared: Path
    table: str
    tracking_uri: str
    registry_uri: str | None = None
    table_format: str = "parquet"

    @classmethod
    def of(cls, config: Config) -> Store:
        """The store of a resolved configuration."""
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
            table_format=config.score.format,
        )

    @property
    def local_store(self) -> bool:
        """Whether tracking is a local sqlite store (whose artifacts go to :attr:`artifacts`)."""
        return self.tracking_uri.startswith("sqlite:")

    @contextmanager
    def local_store_lock(self) -> Iterator[None]:
        """Hold the work directory's lock on its sqlite MLflow store for the block.

        MLflow creates (and migrates) a new sqlite store on first use; two jobs starting
        together on a fresh work directory would run the same migrations at once and one
        would fail. The first use happens under this lock (an OS file lock, released
        when the process dies).
        """
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".mlflow.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        """Where ``dlpipe report``, ``explain`` and the pipeline write HTML pages."""
        return self.work / "reports"

    @property
    def model_cache(self) -> Path:
        """Models downloaded for batch scoring, by version (reused by later jobs)."""
        return self.work / "cache" / "models"

    @property
    def bench(self) -> Path:
        """``dlpipe bench``'s cache of generated data, and its scratch space."""
        return self.work / "bench"

    def dataset(self, location: str | os.PathLike[str] | None = None) -> DatasetDir:
        """A prepared dataset: ``location`` (a path, resolved, or a URL), else the default."""
        if location is None:
            return DatasetDir(str(self.prepared))
        text = os.fspath(location)
        return DatasetDir(text if is_uri(text) else str(Path(text).expanduser().resolve()))

    def training(self, model_name: str) -> Path:
        """The folder of ``model_name``'s training runs: one :class:`RunDir` per run."""
        return self.work / "training" / model_name

    def run_dir(self, model_name: str, run_id: str) -> RunDir:
        """The folder of one training run (its own, so concurrent runs never share files)."""
        return RunDir(str(self.training(model_name) / run_id))

    def last_run_dir(self, model_name: str) -> RunDir | None:
        """The folder of ``model_name``'s run started (or resumed) last: what ``--resume`` reads.

        None without one.
        """
        try:
            record = json.loads(read_text(self.training(model_name) / RunDir.RUN_RECORD))
        except FileNotFoundError:
            return None
        return self.run_dir(model_name, str(record["run_id"]))

    def start_run_dir(self, model_name: str, run_id: str) -> RunDir:
        """Open run ``run_id``'s folder, owned by this process, as the model's last run.

        The folders of earlier runs whose process is gone (finished, failed or killed:
        their checkpoints are no longer the last run's) are removed; a live run's never.
        """
        run_dir = self.run_dir(model_name, run_id)
        run_dir.remember_run(run_id)
        home = self.training(model_name)
        write_atomic(home / RunDir.RUN_RECORD, json.dumps({"run_id": run_id}))
        for other in home.iterdir():
            if other.is_dir() and other.name != run_id:
                owner = RunDir(str(other)).owner()
                if owner is not None and owner.alive() is False:
                    remove(other)
        return run_dir

    def scoring_table(self, location: str | None = None) -> ScoringTable:
        """The scoring table: ``location``, else the configured one, in the configured format."""
        return ScoringTable(location or self.table, self.table_format)
