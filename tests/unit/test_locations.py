"""One owner of locations: the work directory's layout, URLs, and the MLflow set-up."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import pipelines
from pipelines.config import load_config
from pipelines.locations import Locations, is_uri, local_path, to_url

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
    where = load_config(overrides=[f"work_dir={tmp_path}"]).locations
    assert where == Locations(
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
    }
    for path, relative in layout.items():
        assert path == tmp_path / relative


def test_configured_locations_replace_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = load_config(
        overrides=[
            f"work_dir={tmp_path}",
            f"ingest.output={tmp_path}/elsewhere",
            "score.table=main.default.scores",
            "mlflow.tracking_uri=databricks",
            "mlflow.registry_uri=databricks-uc",
        ]
    ).locations
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


def test_only_locations_spells_out_the_work_directory_or_a_file_url() -> None:
    pattern = r"""f["']file://|mlflow\.db|["'](mlartifacts|demo-digits|tables)["']|work_path"""
    assert _offenders(pattern, {"locations.py"}) == []
