"""The wheel carries every sub-package and the shipped targets, and works from a zip.

On a cluster the project reaches the executors (and a Databricks driver) as a wheel, or as
that wheel zipped on the path (``--py-files``), with no checkout around it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = dist.glob("spark_dl_pipelines-*.whl")
    return built


#: Sub-packages kept out of the wheel on purpose: maintainers' tools, run from a checkout.
NOT_SHIPPED = {"pipelines.bench.maintainer"}


def test_every_sub_package_is_listed_in_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "pipelines").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - NOT_SHIPPED <= listed, (
        f"add to [tool.setuptools] packages: {sorted(found - NOT_SHIPPED - listed)}"
    )
    assert not NOT_SHIPPED & listed


def test_wheel_holds_the_code_and_every_target(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    targets = {p.name for p in (REPO / "conf").glob("*.yaml")}
    assert {f"pipelines/conf/{name}" for name in targets} <= names
    modules = {
        str(p.relative_to(REPO)) for p in (REPO / "pipelines").rglob("*.py")
        if "__pycache__" not in p.parts
    }  # fmt: skip
    maintainers = {name for name in modules if name.startswith("pipelines/bench/maintainer/")}
    assert maintainers, "the maintainers' benchmarks moved: update NOT_SHIPPED"
    assert modules - maintainers <= names, sorted(modules - maintainers - names)
    assert not maintainers & names, "maintainers' tools are not part of the wheel"
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "dlpipe = pipelines.cli:console" in entry_points


def test_config_loads_from_the_zipped_wheel_alone(wheel, tmp_path):
    # -S: no site-packages, so not the editable checkout; only the zip (and PyYAML's folder).
    import yaml

    zipped = tmp_path / "spark_dl_pipelines.zip"
    zipped.write_bytes(wheel.read_bytes())
    yaml_home = Path(yaml.__file__).resolve().parents[1]
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "from pipelines.config import load_config, bundled_targets;"
        "import pipelines; assert pipelines.__file__.startswith(sys.argv[1]), pipelines.__file__;"
        "print(bundled_targets(), load_config('databricks').mlflow.tracking_uri,"
        " load_config('cluster').spark.master, load_config().work_dir,"
        " load_config('photos').train.model)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(zipped), str(yaml_home)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        *("['cluster',", "'databricks',", "'photos']"),
        *("databricks", "None", "work", "mobilenet_v2"),
    ]


def test_report_templates_load_from_the_zipped_wheel_alone(wheel, tmp_path):
    # The page templates and CSS ship as package data and load through the zip importer.
    import jinja2
    import numpy

    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {
        str(p.relative_to(REPO)) for p in (REPO / "pipelines" / "report" / "templates").iterdir()
    }
    assert templates and templates <= names, sorted(templates - names)
    zipped = tmp_path / "spark_dl_pipelines.zip"
    zipped.write_bytes(wheel.read_bytes())
    homes = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (jinja2, numpy)})
    code = """if True:
        import sys, types
        sys.path[:0] = sys.argv[1:]
        import pipelines
        from pipelines.report.pages import run_page
        assert pipelines.__file__.startswith(sys.argv[1]), pipelines.__file__
        info = types.SimpleNamespace(
            run_id="r1", run_name="<b>x</b>", status="FINISHED", experiment_id="0",
            start_time=0, end_time=0,
        )
        data = types.SimpleNamespace(metrics={"test_accuracy": 0.5}, params={"p": "<i>"}, tags={})
        run = types.SimpleNamespace(info=info, data=data)
        print(run_page(run, {}, None, "sqlite:///mlflow.db", version=None, histories={}))
    """
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(zipped), *homes],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = done.stdout
    assert page.startswith("<!DOCTYPE html>") and "font-family" in page  # the CSS is inlined
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page and "<i>" not in page
    assert "test_accuracy" in page and "No dataset manifest was logged." in page
