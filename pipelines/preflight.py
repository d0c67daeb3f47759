"""Preflight: the pinned stack, checked before any Spark work, on the driver and every executor.

In: the installed packages (distribution metadata, Horovod's files or its own API). Out:
nothing when the stack is right, else a :class:`PreflightError` with one line per problem,
``<package>: found <version>, need <spec>: <fix>``; for ``dlpipe doctor`` a
:class:`Diagnosis` (table and JSON).

Why: a wrong package rarely fails loudly. Under Keras 3 Horovod's ``DistributedOptimizer``
runs but stops averaging gradients; pyarrow 15 breaks Petastorm's reads in the middle of
a job; a Horovod built without TensorFlow or against another TensorFlow fails only once
the ranks start, on the executors. ARCHITECTURE.md and the README say why each pin
exists.

Three layers, so that a test can feed a wrong environment to the real checks:

- :func:`lookup` reads what is installed into an :class:`Environment`: distribution
  metadata for versions, and for Horovod's build either its files (cheap: the
  TensorFlow extension it loads, the TensorFlow version it records in ``metadata.json``,
  the Gloo controller compiled into the extension) or its own API
  (``horovod.tensorflow.gloo_built()`` in a fresh interpreter, which imports TensorFlow:
  seconds, so only ``dlpipe doctor`` does it).
- :func:`check` is pure: an :class:`Environment` in, one :class:`Finding` per
  requirement of :data:`REQUIREMENTS` out.
- :func:`check_driver` and :func:`check_executors` run both and raise; the executor check
  is one tiny Spark job with a task per task slot, each looking up its Python worker's
  stack (metadata and files only, no TensorFlow import), checked on the driver.

``DLPIPE_SKIP_PREFLIGHT=1`` skips the checks before a command (for a deliberately
different runtime); ``dlpipe doctor`` always checks.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import mmap
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: Set to 1 to skip the checks that run before a command (never those of ``dlpipe doctor``).
SKIP_ENV = "DLPIPE_SKIP_PREFLIGHT"

_HOROVOD_BUILD = (
    "HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 "
    "pip install --no-build-isolation --no-cache-dir --force-reinstall horovod==0.28.1 "
    "after TensorFlow (make venv does this)"
)


@dataclass(frozen=True)
class Requirement:
    """One package of the pinned stack.

    Attributes:
        name: The name printed (a distribution name, or ``python``).
        spec: The PEP 440 specifier it must satisfy.
        fix: What to do when it does not, and why the pin exists.
        module: The importable top-level module ("" for Python itself).
        distributions: Distributions that may provide ``module``, in the order tried
            (TensorFlow comes as ``tensorflow-cpu``, or ``tensorflow`` on GPU hosts).
    """

    name: str
    spec: str
    fix: str
    module: str = ""
    distributions: tuple[str, ...] = ()


#: The one table of the stack's requirements (tests/unit/test_preflight.py holds it to
#: pyproject.toml and the Makefile's Horovod version).
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "python",
        ">=3.11,<3.12",
        "use Python 3.11 (TensorFlow 2.15 has wheels for 3.9-3.11 only; make venv uses python3.11)",
    ),
    Requirement(
        "pyspark",
        "==3.5.*",
        "pip install 'pyspark==3.5.*' (Spark 4 needs pyarrow >= 18, which Petastorm cannot use)",
        "pyspark",
        ("pyspark",),
    ),
    Requirement(
        "pyarrow",
        "==14.0.2",
        "pip install pyarrow==14.0.2 (Petastorm 0.13.1 passes ParquetDataset arguments that "
        "pyarrow 15 rejects and imports pyarrow.filesystem, gone in 16)",
        "pyarrow",
        ("pyarrow",),
    ),
    Requirement(
        "numpy",
        "==1.26.*",
        "pip install 'numpy==1.26.*' (pyarrow 14 and TensorFlow 2.15 are built against numpy 1)",
        "numpy",
        ("numpy",),
    ),
    Requirement(
        "tensorflow",
        "==2.15.1",
        "pip install tensorflow-cpu==2.15.1 (tensorflow[and-cuda]==2.15.1 on GPU hosts), the last "
        "TensorFlow whose Keras is Keras 2, then rebuild Horovod against it (make venv)",
        "tensorflow",
        ("tensorflow-cpu", "tensorflow", "tensorflow-gpu", "tensorflow-intel"),
    ),
    Requirement(
        "keras",
        ">=2.15,<3",
        "pip install 'keras>=2.15,<2.16' (TensorFlow 2.15's Keras 2): under Keras 3 Horovod's "
        "DistributedOptimizer silently stops averaging gradients",
        "keras",
        ("keras",),
    ),
    Requirement(
        "protobuf",
        "<5",
        "pip install 'protobuf<5' (TensorFlow 2.15 fails to import with protobuf 5; MLflow alone "
        "would pull a newer one)",
        "google.protobuf",
        ("protobuf",),
    ),
    Requirement(
        "horovod",
        "==0.28.1",
        f"build it: {_HOROVOD_BUILD}; or --set train.launcher=local to train one rank without it",
        "horovod",
        ("horovod",),
    ),
    Requirement(
        "petastorm",
        "==0.13.1",
        "pip install petastorm==0.13.1 (the datasets and the training feed are written for it)",
        "petastorm",
        ("petastorm",),
    ),
    Requirement(
        "mlflow",
        ">=3.17,<3.19",
        "pip install 'mlflow>=3.17,<3.19' (the tracking, registry and pyfunc APIs used here)",
        "mlflow",
        ("mlflow",),
    ),
)

#: Spec of a package that must not be installed (the Keras stack refuses a mixed one).
ABSENT = "absent"

_KERAS_VENV = "make venv STACK=keras"

#: The Keras stack's table (``make venv STACK=keras``: Keras 3 on JAX, Spark 4, numpy 2):
#: what the Databricks 16.4/17.3 LTS ML runtimes and later carry, and neither Horovod nor
#: Petastorm (a mixed environment fails with one line). TensorFlow may be there (those
#: runtimes carry it until 18): Keras runs on JAX, and TensorFlow is never imported.
KERAS_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "python",
        ">=3.12,<3.13",
        f"use Python 3.12 (the Databricks 16.4/17.3 LTS ML runtimes' Python; {_KERAS_VENV})",
    ),
    Requirement(
        "pyspark",
        "==4.0.*",
        "pip install 'pyspark==4.0.*' (Spark 4.0, as on Databricks 17.3 LTS ML)",
        "pyspark",
        ("pyspark",),
    ),
    Requirement(
        "pyarrow",
        ">=15",
        "pip install pyarrow==19.0.1 (the plain-pyarrow reader; Spark 4 needs pyarrow >= 15)",
        "pyarrow",
        ("pyarrow",),
    ),
    Requirement(
        "numpy",
        ">=2,<3",
        "pip install 'numpy==2.1.*' (the Keras stack is built on numpy 2)",
        "numpy",
        ("numpy",),
    ),
    Requirement(
        "keras",
        ">=3.15,<4",
        "pip install keras==3.15.1 (Keras 3 on JAX; the keras launcher averages gradients in "
        "the compiled step)",
        "keras",
        ("keras",),
    ),
    Requirement(
        "jax",
        "==0.9.2",
        "pip install 'jax[cpu]==0.9.2' (jax[cuda12] on GPU hosts: make venv STACK=keras GPU=1)",
        "jax",
        ("jax",),
    ),
    Requirement(
        "mlflow",
        ">=3.17,<3.19",
        "pip install 'mlflow>=3.17,<3.19' (the tracking, registry and pyfunc APIs used here)",
        "mlflow",
        ("mlflow",),
    ),
    Requirement(
        "horovod",
        ABSENT,
        f"pip uninstall horovod: the Keras stack trains with train.launcher=keras ({_KERAS_VENV})",
        "horovod",
        ("horovod",),
    ),
    Requirement(
        "petastorm",
        ABSENT,
        f"pip uninstall petastorm: the Keras stack reads with plain pyarrow ({_KERAS_VENV})",
        "petastorm",
        ("petastorm",),
    ),
)


def requirements(stack: str | None = None) -> tuple[Requirement, ...]:
    """The table of ``stack`` (default: this environment's, :func:`pipelines.stack.current`)."""
    from pipelines import stack as stacks

    return KERAS_REQUIREMENTS if (stack or stacks.current()) == stacks.KERAS else REQUIREMENTS


#: What Horovod's build must have, beside its version.
HOROVOD_NEED = "built with TensorFlow and Gloo"


@dataclass(frozen=True)
class Found:
    """What the lookup found for one requirement.

    Attributes:
        version: The installed version; ``None`` when not installed (or not importable).
        distributions: The distributions that provide it, when more than one name may
            (``tensorflow-cpu``); several mean one installed over another.
    """

    version: str | None
    distributions: tuple[str, ...] = ()


@dataclass(frozen=True)
class HorovodBuild:
    """How the installed Horovod was built.

    Attributes:
        tensorflow: Its TensorFlow extension exists (``files`` probe) or loads (``api``).
        built_against: The TensorFlow version it was compiled against (its
            ``metadata.json``, which Horovod itself compares at import); ``None`` if unknown.
        gloo: Gloo is compiled in; ``None`` if unknown (no extension to ask).
        probe: ``files`` (cheap) or ``api`` (Horovod's own API, imports TensorFlow).
        error: Why the extension failed to load (``api`` probe only).
    """

    tensorflow: bool
    built_against: str | None
    gloo: bool | None
    probe: Literal["files", "api"] = "files"
    error: str | None = None


@dataclass(frozen=True)
class Environment:
    """A lookup result: what one Python interpreter has installed.

    Attributes:
        packages: :class:`Found` by requirement name (every name of :data:`REQUIREMENTS`).
        horovod: Horovod's build, ``None`` when Horovod is not installed.
        python: The interpreter's path.
        host: The host name.
        pid: The process id.
    """

    packages: Mapping[str, Found]
    horovod: HorovodBuild | None
    python: str = ""
    host: str = ""
    pid: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what an executor sends back to the driver)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Environment:
        """The inverse of :meth:`to_dict`."""
        packages = {
            name: Found(found["version"], tuple(found["distributions"]))
            for name, found in data["packages"].items()
        }
        horovod = HorovodBuild(**data["horovod"]) if data["horovod"] else None
        return cls(packages, horovod, data["python"], data["host"], data["pid"])


@dataclass(frozen=True)
class Finding:
    """The check of one requirement.

    Attributes:
        name: The requirement's name.
        found: What was found, as printed (``2.15.1 (tensorflow-cpu)``, ``not installed``).
        need: What is needed, as printed.
        ok: Whether it passes; ``None`` when not needed by this configuration.
        fix: What to do when it fails.
    """

    name: str
    found: str
    need: str
    ok: bool | None
    fix: str

    @property
    def line(self) -> str:
        """The one line that reports it: ``<package>: found <version>, need <spec>: <fix>``."""
        return f"{self.name}: found {self.found}, need {self.need}: {self.fix}"


class PreflightError(UserError):
    """The stack differs from the pinned one; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- the check (pure) -----------------------------------------------------------------------


def check(env: Environment, *, horovod: bool = True, stack: str | None = None) -> list[Finding]:
    """Check a lookup result against the stack's table (:func:`requirements`).

    Args:
        env: What :func:`lookup` found (on the driver or on an executor).
        horovod: Whether Horovod is needed (``train.launcher: horovod``).
        stack: Whose table; default: this environment's stack.

    Returns:
        One finding per requirement, in table order.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    findings = []
    for req in requirements(stack):
        found = env.packages.get(req.name, Found(None))
        need = req.spec
        shown = found.version or "not installed"
        if req.spec == ABSENT:
            findings.append(Finding(req.name, shown, "not installed", not found.version, req.fix))
            continue
        if found.version and len(found.distributions) > 1:
            shown = f"{found.version} ({' and '.join(found.distributions)})"
        elif found.version and found.distributions and found.distributions[0] != req.name:
            shown = f"{found.version} ({found.distributions[0]})"
        ok, fix = False, req.fix
        if found.version:
            try:
                ok = SpecifierSet(req.spec).contains(Version(found.version), prereleases=True)
            except InvalidVersion:  # "unknown", "unimportable (...)"
                pass
        if ok and len(found.distributions) > 1:
            ok, need = False, f"{req.spec} from one distribution"
            fix = f"pip uninstall {' '.join(found.distributions)}, then {req.fix}"
        if req.name == "horovod":
            need = f"{req.spec} {HOROVOD_NEED}"
            if ok:
                tf_version = env.packages.get("tensorflow", Found(None)).version
                ok, shown, need = _check_horovod_build(env.horovod, req.spec, found, tf_version)
                fix = f"rebuild it: {_HOROVOD_BUILD}"
            if not horovod:
                ok, need = None, f"{need} (not needed: train.launcher is local)"
        findings.append(Finding(req.name, shown, need, ok, fix))
    return findings


def _check_horovod_build(
    build: HorovodBuild | None, spec: str, found: Found, tf_version: str | None
) -> tuple[bool, str, str]:
    """Horovod's build flags: ``(ok, found, need)``."""
    version, need = found.version, f"{spec} {HOROVOD_NEED}"
    if build is None or not build.tensorflow:
        if build is not None and build.error:
            found = f"{version} whose TensorFlow extension fails to load ({build.error})"
        else:
            found = f"{version} built without TensorFlow"
        return False, found, need
    if build.built_against and tf_version and build.built_against != tf_version:
        need = f"{spec} built against the installed TensorFlow {tf_version}"
        return False, f"{version} built against TensorFlow {build.built_against}", need
    if build.gloo is False:
        return False, f"{version} built without Gloo", need
    against = f" {build.built_against}" if build.built_against else ""
    gloo = ", Gloo" if build.gloo else ", Gloo unknown"
    return True, f"{version} (TensorFlow{against}{gloo}; {build.probe})", need


def problems(findings: list[Finding]) -> list[str]:
    """The lines of the failing findings."""
    return [finding.line for finding in findings if finding.ok is False]


# --- the lookup -----------------------------------------------------------------------------


def lookup(*, horovod_probe: Literal["files", "api"] = "files") -> Environment:
    """What this interpreter has installed.

    Args:
        horovod_probe: ``files`` reads Horovod's build from its files (milliseconds);
            ``api`` asks Horovod itself in a fresh interpreter (imports TensorFlow: seconds).

    Returns:
        The lookup result, for :func:`check`.
    """
    packages = {"python": Found(platform.python_version())}
    for req in requirements():
        if req.module:
            packages[req.name] = _installed(req)
    build = None
    if packages["horovod"].version and requirements() is REQUIREMENTS:
        build = _horovod_api() if horovod_probe == "api" else _horovod_files()
    return Environment(packages, build, sys.executable, socket.gethostname(), os.getpid())


def _installed(req: Requirement) -> Found:
    """The version of the distribution(s) that provide ``req.module``, if importable."""
    try:
        if importlib.util.find_spec(req.module) is None:  # imports at most its parent
            return Found(None)
    except (ImportError, ValueError):
        return Found(None)
    present = []
    for name in req.distributions:
        try:
            present.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    if present:
        return Found(present[0][1], tuple(name for name, _ in present))
    # Importable without metadata (pyspark of a Databricks runtime): ask the module.
    try:
        module = importlib.import_module(req.module)
    except Exception as exc:  # a broken install is a finding, not a crash of the lookup
        return Found(f"unimportable ({type(exc).__name__})")
    version = getattr(module, "__version__", None)
    return Found(str(version) if version else "unknown")


def gloo_in_horovod_files() -> bool | None:
    """Whether the installed Horovod's TensorFlow extension has the Gloo controller.

    What ``horovod.common.util.gloo_built()`` answers, read from the extension's file in
    milliseconds instead of a fresh interpreter that imports TensorFlow (seconds). None
    when Horovod or its TensorFlow extension is not there.
    """
    try:
        build = _horovod_files()
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return build.gloo if build.tensorflow else None


def _horovod_files(root: Path | None = None) -> HorovodBuild:
    """Horovod's build from its files, as Horovod itself finds them, without TensorFlow.

    Args:
        root: The ``horovod`` package directory; default: the importable one.
    """
    from horovod.common.util import get_extension_full_path  # light: no framework import

    root = root or Path(importlib.util.find_spec("horovod").origin).parent
    # The path horovod.tensorflow.mpi_ops loads; Horovod's own check_extension tests it too.
    extension = Path(get_extension_full_path(str(root / "tensorflow" / "__init__.py"), "mpi_lib"))
    built_against = None
    try:
        built_against = json.loads((root / "metadata.json").read_text()).get("tensorflow")
    except (OSError, ValueError):
        pass
    if not extension.is_file():
        return HorovodBuild(False, built_against, None)
    # The Gloo controller is compiled in only with HAVE_GLOO (what gloo_built() reports);
    # its exported symbols sit in the dynamic string table near the file's start.
    with extension.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        gloo = data.find(b"_ZN7horovod6common14GlooController") >= 0
    return HorovodBuild(True, built_against, gloo)


_API_PROBE = """
import json
try:
    import horovod.tensorflow as hvd
    out = {"tensorflow": True, "gloo": bool(hvd.gloo_built())}
except Exception as exc:
    out = {"tensorflow": False, "gloo": None, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def _horovod_api() -> HorovodBuild:
    """Horovod's build from its own API, in a fresh interpreter (keeps TensorFlow out of here)."""
    files = _horovod_files()
    if not files.tensorflow:  # Horovod's own import stops at the same missing file
        return files
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _API_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        out = {"tensorflow": False, "gloo": None, "error": tail}
    error = out.get("error")
    if error:
        error = error.strip().splitlines()[0]
    return HorovodBuild(out["tensorflow"], files.built_against, out["gloo"], "api", error)


# --- driver and executors -------------------------------------------------------------------

_driver_checked: set[bool] = set()
_sessions_checked: set[tuple[str, bool]] = set()


def _skipped(where: str) -> bool:
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        log.warning("preflight: %s check skipped (%s is set)", where, SKIP_ENV)
        return True
    return False


def check_driver(*, horovod: bool = True) -> None:
    """Check this interpreter's stack (once per process); call before any Spark work.

    Args:
        horovod: Whether Horovod is needed (``train.launcher: horovod``).

    Raises:
        PreflightError: One line per problem.
    """
    if horovod in _driver_checked or _skipped("driver"):
        return
    failing = problems(check(lookup(), horovod=horovod))
    if failing:
        raise PreflightError(failing)
    _driver_checked.add(horovod)


def check_executors(spark: SparkSession, *, horovod: bool = True) -> None:
    """Check the stack of every executor Python worker (once per session).

    Args:
        spark: The session, before the stage's first job.
        horovod: Whether Horovod is needed (``train.launcher: horovod``).

    Raises:
        PreflightError: One line per problem, naming the executor host(s) and Python.
    """
    key = (spark.sparkContext.applicationId, horovod)
    if key in _sessions_checked or _skipped("executor"):
        return
    failing = executor_problems(executor_environments(spark), horovod=horovod)
    if failing:
        raise PreflightError(failing)
    _sessions_checked.add(key)


def executor_environments(spark: SparkSession) -> list[Environment]:
    """Look up the stack in every executor Python worker: one task per task slot.

    Args:
        spark: The session.

    Returns:
        One lookup result per distinct Python worker (host, pid).

    Raises:
        PreflightError: The job itself failed (e.g. the executors lack the package).
    """
    context = spark.sparkContext
    slots = context.defaultParallelism
    context.setJobDescription("dlpipe preflight")
    try:
        rows = context.parallelize(range(slots), slots).mapPartitions(_worker_lookup).collect()
    except Exception as exc:  # the job does nothing but import and look up
        raise PreflightError(
            [
                f"executors: the preflight job failed ({_last_error_line(exc)}): run the "
                "executors with the project's Python environment (PYSPARK_PYTHON, "
                "spark.pyspark.python) and the pipelines package installed or shipped"
            ]
        ) from exc
    finally:
        context.setJobDescription(None)  # type: ignore[arg-type]
    unique = {(row["host"], row["pid"]): row for row in rows}
    return [Environment.from_dict(row) for _, row in sorted(unique.items())]


def _worker_lookup(_: Iterator[int]) -> Iterator[dict[str, Any]]:
    """A task: this Python worker's lookup result (files probe: no TensorFlow import)."""
    yield lookup().to_dict()


def _last_error_line(exc: BaseException) -> str:
    """The Python exception at the bottom of a (Py4J-wrapped) traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line):
            return line
    return lines[-1] if lines else type(exc).__name__


def executor_problems(environments: list[Environment], *, horovod: bool = True) -> list[str]:
    """The failing lines of the executors, one per problem, naming where it was found.

    Workers with the same problem and Python share one line.

    Args:
        environments: Lookup results from :func:`executor_environments`.
        horovod: Whether Horovod is needed.

    Returns:
        ``executor HOST (PYTHON): <package>: found ...`` lines.
    """
    hosts: dict[tuple[str, str], list[str]] = {}
    for env in environments:
        for line in problems(check(env, horovod=horovod)):
            where = hosts.setdefault((env.python, line), [])
            if env.host not in where:
                where.append(env.host)
    return [
        f"executor{'s' if len(names) > 1 else ''} {', '.join(names)} ({python}): {line}"
        for (python, line), names in hosts.items()
    ]


# --- dlpipe doctor --------------------------------------------------------------------------


@dataclass
class Diagnosis:
    """The whole check for ``dlpipe doctor``: the driver, and optionally the executors.

    Attributes:
        driver: The driver's lookup result (Horovod through its own API).
        findings: The driver's findings.
        executors: Each executor Python worker's lookup result and findings.
        problems: Every failing line (driver first).
    """

    driver: Environment
    findings: list[Finding]
    executors: list[tuple[Environment, list[Finding]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing failed."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``ok``, ``driver``, ``executors``, ``problems``."""

        def side(env: Environment, findings: list[Finding]) -> dict[str, Any]:
            checks = [dataclasses.asdict(finding) for finding in findings]
            return {"host": env.host, "pid": env.pid, "python": env.python, "checks": checks}

        return {
            "ok": self.ok,
            "driver": side(self.driver, self.findings),
            "executors": [side(env, findings) for env, findings in self.executors],
            "problems": list(self.problems),
        }

    def table(self) -> str:
        """The check as a table for people, then the problems (or that all is good)."""
        rows = [("where", "package", "found", "need", "status")]
        groups: dict[tuple, list[str]] = {}
        for env, findings in self.executors:  # identical workers share rows
            key = (env.python, tuple(findings))
            groups.setdefault(key, []).append(f"{env.host}:{env.pid}")
        sides = [("driver", self.findings)] + [
            (f"executor {', '.join(workers)}", list(findings))
            for (_, findings), workers in groups.items()
        ]
        status = {True: "ok", False: "FAIL", None: "-"}
        for where, findings in sides:
            rows += [(where, f.name, f.found, f.need, status[f.ok]) for f in findings]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.append("")
        from pipelines.stack import KERAS, current

        good = "the Keras stack" if current() == KERAS else "the pinned one"
        lines += self.problems or [f"all good: the stack is {good}"]
        return "\n".join(lines)


def diagnose(spark: SparkSession | None = None, *, horovod: bool = True) -> Diagnosis:
    """Run the whole check: the driver (Horovod through its own API), and the executors.

    Args:
        spark: A session whose executors to check too; ``None`` for the driver only.
        horovod: Whether Horovod is needed (``train.launcher: horovod``).

    Returns:
        The diagnosis; it raises nothing for a wrong stack.
    """
    driver = lookup(horovod_probe="api")
    findings = check(driver, horovod=horovod)
    diagnosis = Diagnosis(driver, findings, problems=problems(findings))
    if spark is not None:
        environments = executor_environments(spark)
        diagnosis.executors = [(env, check(env, horovod=horovod)) for env in environments]
        diagnosis.problems += executor_problems(environments, horovod=horovod)
    return diagnosis
