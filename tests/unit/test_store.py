"""One owner of locations and files: the Store's layout, its file operations, the MLflow set-up."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines
from pipelines.config import load_config
from pipelines.store import (
    DatasetDir,
    Owner,
    RunDir,
    ScoringTable,
    Staging,
    Store,
    is_uri,
    local_path,
    read_text,
    replace_dir,
    to_url,
    write_atomic,
)

PACKAGE = Path(pipelines.__file__).parent


def test_a_relative_path_becomes_an_absolute_file_url_with_equals_signs_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert to_url("data/split=train") == f"file://{tmp_path}/data/split=train"
    assert to_url(tmp_path / "split=test") == f"file://{tmp_path}/split=test"


def test_uris_pass_unchanged_and_file_urls_are_normalised() -> None:
    assert to_url("s3a://bucket/table") == "s3a://bucket/table"
    assert to_url("dbfs:/Volumes/main/x") == "dbfs:/Volumes/main/x"
    assert to_url("file:/data/x") == "file:///data/x"
    assert to_url("file:///data/x") == "file:///data/x"


def test_is_uri_and_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_uri("hdfs://nn/x") and is_uri("file:///x") and not is_uri("/data/x")
    assert not is_uri("relative/dir")
    assert local_path("file:///data/split=train") == "/data/split=train"
    assert local_path("relative") == os.path.join(tmp_path, "relative")
    assert local_path("s3a://bucket/x") is None


def test_every_default_location_is_under_the_work_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = Store.of(load_config(overrides=[f"work_dir={tmp_path}"]))
    assert where == Store(
        work=tmp_path,
        prepared=tmp_path / "datasets" / "prepared",
        table=str(tmp_path / "tables" / "scores"),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    assert where.local_store
    layout = {
        where.artifacts: "mlartifacts",
        where.demo_data: "demo-digits",
        where.reports: "reports",
        where.model_cache: "cache/models",
        where.bench: "bench",
        where.training("digits"): "training/digits",
        where.run_dir("digits", "r1").path: "training/digits/r1",
    }
    for path, relative in layout.items():
        assert path == tmp_path / relative


def test_configured_locations_replace_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = Store.of(
        load_config(
            overrides=[
                f"work_dir={tmp_path}",
                f"ingest.output={tmp_path}/elsewhere",
                "score.table=main.default.scores",
                "mlflow.tracking_uri=databricks",
                "mlflow.registry_uri=databricks-uc",
            ]
        )
    )
    assert where.prepared == tmp_path / "elsewhere"
    assert where.table == "main.default.scores"
    assert (where.tracking_uri, where.registry_uri) == ("databricks", "databricks-uc")
    assert not where.local_store


def _offenders(pattern: str, allowed: set[str]) -> list[str]:
    """Modules of the package (other than ``allowed``) whose source matches ``pattern``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name not in allowed and re.search(pattern, path.read_text()):
            found.append(name)
    return found


def test_only_tracking_points_mlflow_at_a_store_or_builds_a_client() -> None:
    pattern = r"set_tracking_uri\(|set_registry_uri\(|MlflowClient\("
    assert _offenders(pattern, {"tracking.py"}) == []


def test_only_the_store_spells_out_the_work_directory_or_a_file_url() -> None:
    pattern = r"""f["']file://|mlflow\.db|["'](mlartifacts|demo-digits|tables)["']|work_path"""
    assert _offenders(pattern, {"store.py"}) == []


#: Every part of a layout the Store owns, as a string literal (a folder or file name).
LAYOUT_PARTS = re.compile(
    r"""["'](_manifest\.json|_quarantine|_owner\.json|_staging|checkpoint\.json|checkpoint\.h5|"""
    r"""model\.h5|labels\.json|ranks|run\.json|_classes|datasets|training|reports|"""
    r"""mlartifacts|demo-digits|tables)["']|["'](split=|batch_id=|rank-|checkpoint-)"""
)
#: The peer benchmark's runner runs in the peer's own environment, without the project.
LAYOUT_EXEMPT = {"store.py", "bench/maintainer/peer_runner.py"}


def test_no_module_but_the_store_spells_a_part_of_a_layout() -> None:
    assert _offenders(LAYOUT_PARTS.pattern, LAYOUT_EXEMPT) == []


def _renames(source: str) -> list[int]:
    """Lines of ``source`` that rename or move files: ``os.rename``/``os.replace``,
    ``shutil.move``, ``<path>.rename(x)`` and ``<path>.replace(x)`` (one argument: not
    ``str.replace``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = node.func.attr
        module = owner.id if isinstance(owner, ast.Name) else None
        if (
            (module in ("os", "shutil") and name in ("rename", "replace", "renames", "move"))
            or name == "rename"
            or (name == "replace" and len(node.args) == 1 and not node.keywords)
        ):
            lines.append(node.lineno)
    return lines


def test_no_module_but_the_store_renames_or_replaces_a_file() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name != "store.py" and (lines := _renames(path.read_text())):
            found[name] = lines
    assert found == {}


def test_the_rename_guard_sees_every_form_of_rename() -> None:
    source = "os.rename(a, b)\nos.replace(a, b)\np.rename(b)\nshutil.move(a, b)\nq.replace(b)\n"
    assert _renames(source) == [1, 2, 3, 4, 5]
    assert _renames("text.replace('a', 'b')\nreplace(obj, x=1)\n") == []


def test_store_parts_are_small_picklable_values(tmp_path: Path) -> None:
    parts = [
        DatasetDir(str(tmp_path)),
        RunDir(str(tmp_path / "run")),
        ScoringTable(str(tmp_path / "t")),
        Store.of(load_config(overrides=[f"work_dir={tmp_path}"])),
    ]
    for part in parts:
        assert pickle.loads(pickle.dumps(part)) == part


def test_dataset_layout(tmp_path: Path) -> None:
    data = DatasetDir(str(tmp_path / "prepared"))
    assert data.split("train") == f"{tmp_path}/prepared/split=train"
    assert data.split_url("val") == f"file://{tmp_path}/prepared/split=val"
    assert data.manifest_path == f"{tmp_path}/prepared/_manifest.json"
    assert data.quarantine == f"{tmp_path}/prepared/_quarantine"
    assert DatasetDir.of_split(data.split("test")) == data
    remote = DatasetDir("s3a://bucket/prepared/")
    assert remote.split("train") == "s3a://bucket/prepared/split=train"
    with pytest.raises(FileNotFoundError, match="run 'dlpipe ingest' first"):
        data.read_manifest()


def test_scoring_table_layout(tmp_path: Path) -> None:
    table = ScoringTable(str(tmp_path / "scores"))
    assert table.classes_file("m-v1") == f"{tmp_path}/scores/_classes/m-v1.json"
    assert table.local_partition("night-1") == tmp_path / "scores" / "batch_id=night-1"
    assert table.local_partition("2026-12-01T02:00") is None  # Spark escapes ':' in the name
    assert ScoringTable("main.dlpipe.scores", "delta").is_catalog_table
    assert ScoringTable(str(tmp_path), "delta").local_partition("b") is None


def test_write_atomic_replaces_a_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert read_text(target) == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_replace_dir_swaps_a_staged_folder_in_and_keeps_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for generation in ("first", "second"):
        staged = tmp_path / f".out.tmp-{generation}"
        staged.mkdir()
        (staged / "data").write_text(generation)
        replace_dir(staged, target)
        assert (target / "data").read_text() == generation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_staging_folder_is_removed_unless_committed(tmp_path: Path) -> None:
    staging = Staging(str(tmp_path / "out"))
    with pytest.raises(RuntimeError):
        with staging.folder() as folder:
            owner = Owner.from_json((folder / Staging.OWNER_FILE).read_text())
            assert owner.pid == os.getpid() and owner.alive()
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with staging.folder() as folder:
        (folder / "x").write_text("1")
        staging.commit(folder)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]  # no owner file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_owner_liveness_of_a_dead_a_reused_and_a_foreign_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        me = Owner.me()
        alive = Owner(me.host, child.pid, psutil.Process(child.pid).create_time(), me.boot)
        assert alive.alive() is True
        assert Owner(me.host, child.pid, alive.started - 100, me.boot).alive() is False  # reused
        assert Owner(me.host, child.pid, alive.started, me.boot - 3600).alive() is False  # reboot
        assert Owner("another-host", child.pid).alive() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert alive.alive() is False
    assert Owner.from_tags(alive.tags()) == Owner(alive.host, alive.pid, round(alive.started, 3))
    assert Owner.from_tags({}) is None
    assert Owner.from_json(json.dumps({"host": "h", "pid": 3})) == Owner("h", 3)
