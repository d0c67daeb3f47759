"""The preflight: the real lookup on this venv, and on deliberately wrong installs.

Wrong environments are made by faking only the lookup's input, never the checks: distribution
metadata (a ``keras-3.3.3.dist-info`` ahead of the real one on the path), Horovod's files (a
Horovod package without its TensorFlow extension), or a lookup result fed to the pure check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pipelines import cli, preflight
from pipelines.preflight import Found, HorovodBuild, PreflightError

REPO = Path(__file__).resolve().parents[2]
HOROVOD = Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "horovod"
EXTENSION = "mpi_lib" + sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture(scope="module")
def real():
    """The real lookup of this interpreter (the project's .venv)."""
    return preflight.lookup()


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    monkeypatch.setattr(preflight, "_driver_checked", set())
    monkeypatch.delenv(preflight.SKIP_ENV, raising=False)


def _dist_info(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _horovod_without_tensorflow(site: Path) -> Path:
    """Horovod's Python files without the compiled TensorFlow extension (as a
    HOROVOD_WITHOUT_TENSORFLOW build installs it)."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    return Path(shutil.copytree(HOROVOD, site / "horovod", ignore=ignore))


# --- the pinned venv ------------------------------------------------------------------------


def test_the_pinned_venv_passes_the_real_lookup(real):
    findings = preflight.check(real)

    assert [f.name for f in findings] == [r.name for r in preflight.REQUIREMENTS]
    assert [f.line for f in findings if not f.ok] == []
    assert real.packages["tensorflow"].distributions[0] in ("tensorflow-cpu", "tensorflow")
    assert real.horovod == HorovodBuild(True, real.packages["tensorflow"].version, True)
    preflight.check_driver()  # raises nothing


def test_the_table_is_the_pyproject_and_makefile_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"]]
    # The pinned stack's extras only; the Keras stack (`keras*`) is not what preflight checks.
    for name, extra in project.get("optional-dependencies", {}).items():
        if not name.startswith("keras"):
            listed += extra
    table = {req.name: req for req in preflight.REQUIREMENTS}
    aliases = {d: "tensorflow" for d in table["tensorflow"].distributions}
    seen = set()
    for text in listed:
        pin = Requirement(text)
        name = aliases.get(pin.name, pin.name)
        if name in table:
            assert pin.specifier == SpecifierSet(table[name].spec), name
            seen.add(name)
    assert seen >= {"pyspark", "pyarrow", "numpy", "tensorflow", "petastorm", "mlflow"}
    # The project admits the Keras stack's Python 3.12 too; the pinned stack needs 3.11.
    allowed = SpecifierSet(project["requires-python"])
    assert all(v in allowed for v in ("3.11.0", "3.11.9", "3.12.0", "3.12.9"))
    assert not any(v in allowed for v in ("3.10.14", "3.13.0"))
    assert SpecifierSet(table["python"].spec) == SpecifierSet(">=3.11,<3.12")
    horovod = re.search(r"^HOROVOD_VERSION := (\S+)", (REPO / "Makefile").read_text(), re.M)
    assert table["horovod"].spec == f"=={horovod.group(1)}"


# --- wrong environments, one line each ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version", "line"),
    [
        ("keras", "3.3.3", "keras: found 3.3.3, need >=2.15,<3: pip install 'keras>=2.15,<2.16'"),
        ("pyarrow", "15.0.0", "pyarrow: found 15.0.0, need ==14.0.2: pip install pyarrow==14.0.2"),
        ("mlflow", "2.14.1", "mlflow: found 2.14.1, need >=3.17,<3.19: pip install"),
    ],
)
def test_a_wrong_version_in_the_metadata_fails_with_one_line(
    tmp_path, monkeypatch, name, version, line
):
    _dist_info(tmp_path, name, version)
    monkeypatch.syspath_prepend(str(tmp_path))  # found before the real distribution

    failing = preflight.problems(preflight.check(preflight.lookup()))

    assert len(failing) == 1 and failing[0].startswith(line), failing
    with pytest.raises(PreflightError) as raised:
        preflight.check_driver()
    assert str(raised.value) == failing[0] and "\n" not in str(raised.value)


def test_keras_3_names_the_silent_gradient_problem(tmp_path, monkeypatch):
    _dist_info(tmp_path, "keras", "3.3.3")
    monkeypatch.syspath_prepend(str(tmp_path))

    (line,) = preflight.problems(preflight.check(preflight.lookup()))

    assert "stops averaging gradients" in line


def test_a_horovod_without_its_tensorflow_extension_fails(tmp_path, real):
    root = _horovod_without_tensorflow(tmp_path)
    env = dataclasses.replace(real, horovod=preflight._horovod_files(root))

    (line,) = preflight.problems(preflight.check(env))

    assert env.horovod.tensorflow is False
    assert line.startswith(
        "horovod: found 0.28.1 built without TensorFlow, need ==0.28.1 built with TensorFlow "
        "and Gloo: rebuild it: HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1"
    )


def test_a_horovod_extension_without_gloo_fails(tmp_path, real):
    root = _horovod_without_tensorflow(tmp_path)
    (root / "tensorflow" / EXTENSION).write_bytes(b"\x7fELF no controller symbols here")
    env = dataclasses.replace(real, horovod=preflight._horovod_files(root))

    (line,) = preflight.problems(preflight.check(env))

    assert line.startswith("horovod: found 0.28.1 built without Gloo, need ==0.28.1 built with")


def test_a_horovod_built_against_another_tensorflow_fails(tmp_path, real):
    root = _horovod_without_tensorflow(tmp_path)
    shutil.copy(HOROVOD / "tensorflow" / EXTENSION, root / "tensorflow" / EXTENSION)
    (root / "metadata.json").write_text(json.dumps({"tensorflow": "2.16.1"}))
    env = dataclasses.replace(real, horovod=preflight._horovod_files(root))

    (line,) = preflight.problems(preflight.check(env))

    assert line.startswith(
        "horovod: found 0.28.1 built against TensorFlow 2.16.1, need ==0.28.1 built against "
        f"the installed TensorFlow {real.packages['tensorflow'].version}: rebuild it"
    )


def test_horovod_is_not_needed_by_the_local_launcher(real):
    packages = {**real.packages, "horovod": Found(None)}
    env = dataclasses.replace(real, packages=packages, horovod=None)

    (needed,) = preflight.problems(preflight.check(env))
    by_name = {f.name: f for f in preflight.check(env, horovod=False)}

    assert needed.startswith("horovod: found not installed, need ==0.28.1 built with")
    assert "train.launcher=local" in needed
    assert by_name["horovod"].ok is None and not preflight.problems(list(by_name.values()))


def test_two_tensorflow_distributions_over_each_other_fail(real):
    both = Found(real.packages["tensorflow"].version, ("tensorflow-cpu", "tensorflow"))
    env = dataclasses.replace(real, packages={**real.packages, "tensorflow": both})

    (line,) = preflight.problems(preflight.check(env))

    assert line.startswith("tensorflow: found 2.15.1 (tensorflow-cpu and tensorflow), need")
    assert "pip uninstall tensorflow-cpu tensorflow" in line


def test_several_problems_give_one_line_each(tmp_path, monkeypatch):
    _dist_info(tmp_path, "keras", "3.3.3")
    _dist_info(tmp_path, "pyarrow", "15.0.0")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(PreflightError) as raised:
        preflight.check_driver()

    lines = str(raised.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["pyarrow", "keras"]


def test_the_skip_switch_skips_the_check_before_commands(tmp_path, monkeypatch):
    _dist_info(tmp_path, "keras", "3.3.3")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(preflight.SKIP_ENV, "1")

    preflight.check_driver()  # raises nothing
    assert preflight.problems(preflight.check(preflight.lookup()))  # still wrong


def test_executor_lines_name_the_host_and_python(real):
    bad = dataclasses.replace(
        real, packages={**real.packages, "keras": Found("3.3.3", ("keras",))}, host="worker-7"
    )
    other = dataclasses.replace(bad, host="worker-9", pid=1)

    lines = preflight.executor_problems([real, bad, other])

    assert len(lines) == 1
    assert lines[0].startswith(f"executors worker-7, worker-9 ({real.python}): keras: found 3.3.3")


def test_a_lookup_result_survives_the_trip_from_an_executor(real):
    assert preflight.Environment.from_dict(json.loads(json.dumps(real.to_dict()))) == real


# --- dlpipe doctor --------------------------------------------------------------------------


def test_doctor_reports_the_pinned_venv_as_good(capsys):
    assert cli.main(["doctor", "--json"]) == 0

    captured = capsys.readouterr()
    result = json.loads(captured.out)  # --json: stdout is the JSON alone
    assert result["ok"] is True and result["problems"] == [] and result["executors"] == []
    horovod = next(c for c in result["driver"]["checks"] if c["name"] == "horovod")
    assert horovod["ok"] is True and horovod["found"].endswith("Gloo; api)")  # Horovod's API
    table = captured.err  # the table for people goes to stderr
    assert "all good" in table
    assert re.search(r"^driver +keras +2\.15\.\d+ +>=2\.15,<3 +ok$", table, re.M)


def test_dlpipe_doctor_as_a_command(tmp_path):
    dlpipe = Path(sys.executable).parent / "dlpipe"
    done = subprocess.run(
        [str(dlpipe), "doctor", "--json"], capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] is True


def test_dlpipe_doctor_fails_on_a_deliberately_wrong_environment(tmp_path):
    # Keras 3 and pyarrow 15 metadata and a Horovod without its TensorFlow extension, ahead of
    # the real ones on the path; Horovod's own import (doctor's API probe) sees the same.
    site = tmp_path / "site"
    _dist_info(site, "keras", "3.3.3")
    _dist_info(site, "pyarrow", "15.0.0")
    _horovod_without_tensorflow(site)
    env = {**os.environ, "PYTHONPATH": str(site)}

    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()[-3:]
    assert errors[0].startswith("dlpipe doctor: error: pyarrow: found 15.0.0, need ==14.0.2: ")
    assert errors[1].startswith("keras: found 3.3.3, need >=2.15,<3: ")
    assert errors[2].startswith("horovod: found 0.28.1 built without TensorFlow, need ")
    result = json.loads(done.stdout)  # --json: stdout is the JSON alone, also on failure
    assert result["ok"] is False and len(result["problems"]) == 3
    assert re.search(r"^driver +keras +3\.3\.3 +>=2\.15,<3 +FAIL$", done.stderr, re.M)
