"""The Databricks bundle (databricks.yml, resources/*.yml, conf/databricks.yaml), offline.

Nothing here talks to a workspace. The bundle's YAML is read with pyyaml, variables are
substituted per target the way the CLI does (a target's value overrides the default; a whole
``${var.x}`` keeps the variable's type), and each job goes through Databricks' own typed models
(``databricks.bundles.jobs.Job.from_dict``), which reject a misspelt field at any depth and a
wrong enum or number. The SDK's ``JobSettings.from_dict`` would silently drop unknown keys.
Every task's ``dlpipe`` arguments go through the CLI's own parser and ``load_config``.

Each check is also run on a copy of the bundle with one mistake in it, so the tests are known to
fail on a misspelt field, a dangling variable or an unknown CLI option.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from databricks.bundles.jobs import Job

from pipelines.cli import _parser
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
INIT_SCRIPT = REPO / "resources" / "init" / "install_stack.sh"
#: The Keras stack's init script (the keras target: 17.3 LTS ML, no Horovod).
KERAS_INIT_SCRIPT = REPO / "resources" / "init" / "install_keras_stack.sh"
JOBS = {"dlpipe_ingest", "dlpipe_train", "dlpipe_score", "dlpipe_pipeline"}
TARGETS = {"dev", "prod", "keras"}
#: The runtime of each target's clusters: the pinned stack's, or the Keras stack's (Spark 4.0).
RUNTIMES = {
    "dev": r"15\.4\.x-(cpu|gpu)-ml-scala2\.12",
    "prod": r"15\.4\.x-(cpu|gpu)-ml-scala2\.12",
    "keras": r"17\.3\.x-(cpu|gpu)-ml-scala2\.13",
}

# Keys the bundle's JSON schema (databricks/cli bundle/schema/jsonschema.json) allows outside
# resources; the typed job models cover resources.jobs. Both reject anything else.
ROOT_KEYS = {
    "artifacts", "bundle", "environments", "experimental", "include", "permissions", "presets",
    "python", "resources", "run_as", "scripts", "sync", "targets", "variables", "workspace",
}  # fmt: skip
TARGET_KEYS = {
    "artifacts", "bundle", "cluster_id", "compute_id", "default", "git", "mode", "permissions",
    "presets", "resources", "run_as", "sync", "variables", "workspace",
}  # fmt: skip
VARIABLE_KEYS = {"default", "description", "lookup", "type"}
ARTIFACT_KEYS = {"build", "dynamic_version", "executable", "files", "path", "type"}
BUNDLE_KEYS = {
    "cluster_id", "compute_id", "databricks_cli_version", "deployment", "engine", "git", "name",
    "uuid",
}  # fmt: skip
WORKSPACE_KEYS = {
    "account_id", "artifact_path", "auth_type", "azure_client_id", "azure_environment",
    "azure_login_app_id", "azure_tenant_id", "azure_use_msi", "azure_workspace_resource_id",
    "client_id", "experimental_is_unified_host", "file_path", "google_service_account", "host",
    "profile", "resource_path", "root_path", "state_path", "workspace_id",
}  # fmt: skip
RESOURCE_KINDS = {"jobs"}
# Namespaces a ${...} reference may use besides var: the CLI fills these in at deploy time.
BUILTIN_NAMESPACES = {"bundle", "workspace", "resources", "artifacts"}

_REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.\[\]-]+)\}")


class BundleError(AssertionError):
    """The bundle has problems; the message lists every one of them."""


# --- reading and resolving the bundle ----------------------------------------------------------


def load_bundle(root: Path) -> dict[str, Any]:
    """databricks.yml with every ``include``d file merged in (resources per kind and name)."""
    bundle = yaml.safe_load((root / "databricks.yml").read_text())
    for pattern in bundle.get("include", []):
        files = sorted(root.glob(pattern))
        assert files, f"include {pattern!r} matches no file"
        for path in files:
            part = yaml.safe_load(path.read_text()) or {}
            for key, value in part.items():
                if key != "resources":
                    bundle.setdefault(key, {}).update(value)
                    continue
                for kind, items in value.items():
                    merged = bundle.setdefault("resources", {}).setdefault(kind, {})
                    clash = set(merged) & set(items)
                    assert not clash, f"{path.name}: {kind} {sorted(clash)} defined twice"
                    merged.update(items)
    return bundle


def target_variables(bundle: dict[str, Any], target: str) -> tuple[dict[str, Any], list[str]]:
    """The variables' values in ``target`` (its values over the defaults) and what is unset."""
    values: dict[str, Any] = {}
    unset = []
    overrides = (bundle["targets"][target] or {}).get("variables") or {}
    for name, spec in (bundle.get("variables") or {}).items():
        if name in overrides:
            values[name] = _target_value(spec, overrides[name])
        elif "default" in spec:
            values[name] = spec["default"]
        else:
            unset.append(f"{target}: variable {name} has no default and no value in the target")
    unset += [
        f"{target}: sets variable {name}, which databricks.yml does not declare"
        for name in sorted(set(overrides) - set(bundle.get("variables") or {}))
    ]
    return values, unset


def _target_value(spec: dict[str, Any], value: Any) -> Any:
    """A target's value for a variable: shorthand, or a mapping with ``default``.

    A complex variable's shorthand is itself a mapping: it is the full form only when it has
    nothing but variable fields, ``default`` among them.
    """
    return value["default"] if _full_form(spec, value) else value


def _full_form(spec: dict[str, Any], value: Any) -> bool:
    """Whether a target's value for a variable is the mapping form (``default:`` ...)."""
    if spec.get("type") == "complex":
        return isinstance(value, dict) and "default" in value and set(value) <= VARIABLE_KEYS
    return isinstance(value, dict)


def resolve(value: Any, variables: dict[str, Any], dangling: set[str], depth: int = 0) -> Any:
    """Substitute ``${var.name}`` in ``value`` (recursively, also inside variable values).

    A reference that is the whole string becomes the variable's value with its type (an int,
    a mapping for a complex variable); one inside a longer string is interpolated. Unknown
    variables are added to ``dangling`` and left in place; ``${workspace...}`` and the like
    stay for the CLI.
    """
    assert depth < 20, "variables refer to each other in a cycle"
    if isinstance(value, dict):
        return {k: resolve(v, variables, dangling, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, variables, dangling, depth) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(path: str) -> Any:
        name = path.removeprefix("var.")
        if name not in variables:
            dangling.add(path)
            return "${" + path + "}"
        return resolve(variables[name], variables, dangling, depth + 1)

    whole = _REFERENCE.fullmatch(value)
    if whole and whole.group(1).startswith("var."):
        return lookup(whole.group(1))
    return _REFERENCE.sub(
        lambda m: str(lookup(m.group(1))) if m.group(1).startswith("var.") else m.group(0),
        value,
    )


def resolved_bundle(bundle: dict[str, Any], target: str) -> tuple[dict[str, Any], list[str]]:
    """The bundle as deployed to ``target`` (variables substituted), and its problems."""
    variables, problems = target_variables(bundle, target)
    dangling: set[str] = set()
    tree = {k: v for k, v in bundle.items() if k not in ("targets", "variables")}
    tree["target"] = bundle["targets"][target] or {}
    tree = resolve(tree, variables, dangling)
    problems += [f"{target}: ${{{ref}}} names no variable" for ref in sorted(dangling)]
    for ref in _REFERENCE.findall(yaml.safe_dump(tree)):
        if ref.split(".")[0] not in BUILTIN_NAMESPACES | {"var"}:
            problems.append(f"{target}: ${{{ref}}} is not a bundle reference")
    return tree, problems


def structure_problems(bundle: dict[str, Any]) -> list[str]:
    """Unknown keys outside resources.jobs (which the typed models check)."""
    problems = []

    def unknown(where: str, mapping: Any, known: set[str]) -> None:
        if not isinstance(mapping, dict):
            problems.append(f"{where}: expected a mapping, got {mapping!r}")
            return
        problems.extend(f"{where}: unknown field {key!r}" for key in sorted(set(mapping) - known))

    unknown("databricks.yml", bundle, ROOT_KEYS)
    unknown("bundle", bundle.get("bundle", {}), BUNDLE_KEYS)
    unknown("resources", bundle.get("resources", {}), RESOURCE_KINDS)
    unknown("workspace", bundle.get("workspace", {}), WORKSPACE_KEYS)
    for name, spec in (bundle.get("variables") or {}).items():
        unknown(f"variables.{name}", spec, VARIABLE_KEYS)
    for name, spec in (bundle.get("artifacts") or {}).items():
        unknown(f"artifacts.{name}", spec, ARTIFACT_KEYS)
    for name, spec in bundle["targets"].items():
        unknown(f"targets.{name}", spec or {}, TARGET_KEYS)
        unknown(f"targets.{name}.workspace", (spec or {}).get("workspace", {}), WORKSPACE_KEYS)
        for var, value in ((spec or {}).get("variables") or {}).items():
            if _full_form((bundle.get("variables") or {}).get(var) or {}, value):
                unknown(f"targets.{name}.variables.{var}", value, VARIABLE_KEYS)
    return problems


def job_problems(jobs: dict[str, Any], where: str) -> list[str]:
    """Every job through ``Job.from_dict``: an unknown field, enum or number is a problem."""
    problems = []
    for name, spec in jobs.items():
        try:
            Job.from_dict(copy.deepcopy(spec))
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: job {name}: {exc}")
    return problems


def tasks(jobs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(job name, task) for every task of every job."""
    return [(name, task) for name, job in jobs.items() for task in job.get("tasks", [])]


def parse_dlpipe(parameters: list[str]) -> Any:
    """Parse a task's parameters with dlpipe's own parser; a usage error is an AssertionError."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _parser().parse_args([str(p) for p in parameters])
    except SystemExit:
        raise AssertionError(stderr.getvalue().strip().splitlines()[-1]) from None


def cli_problems(jobs: dict[str, Any], where: str) -> list[str]:
    """Each wheel task's entry point is a console script; its arguments parse and load."""
    problems = []
    scripts = PYPROJECT["project"]["scripts"]
    package = re.sub(r"[-_.]+", "_", PYPROJECT["project"]["name"]).lower()
    for job, task in tasks(jobs):
        label = f"{where}: {job}.{task['task_key']}"
        wheel_task = task.get("python_wheel_task")
        if wheel_task is None:
            problems.append(f"{label}: not a python_wheel_task")
            continue
        if wheel_task.get("package_name") != package:
            problems.append(f"{label}: package_name {wheel_task.get('package_name')!r}")
        if wheel_task.get("entry_point") not in scripts:
            problems.append(
                f"{label}: entry_point {wheel_task.get('entry_point')!r} not in scripts"
            )
        try:
            args = parse_dlpipe(wheel_task.get("parameters", []))
            load_config(args.conf, args.set or ())
        except AssertionError as exc:
            problems.append(f"{label}: dlpipe rejects its arguments: {exc}")
        except ValueError as exc:  # ConfigError
            problems.append(f"{label}: {exc}")
    return problems


# Databricks' dynamic value references ({{...}}, resolved when a job runs; the bundle leaves
# them alone). The names Databricks documents at
# https://docs.databricks.com/aws/en/jobs/dynamic-value-references: a reference in a known
# namespace that is not one of them is refused when the job is created or run.
DYNAMIC_REFERENCES = {
    "job.id", "job.name", "job.run_id", "job.repair_count", "job.trigger.type",
    "job.trigger.file_arrival.location", "task.name", "task.run_id", "task.execution_count",
    "task.notebook_path", "workspace.id", "workspace.url",
}  # fmt: skip
#: ``{{job.start_time.<argument>}}`` and ``{{job.trigger.time.<argument>}}``, in UTC.
TIME_ARGUMENTS = {
    "iso_weekday": "7", "is_weekday": "false", "iso_date": "2026-11-22",
    "iso_datetime": "2026-11-22T02:00:00.000Z", "year": "2026", "month": "11", "day": "22",
    "hour": "2", "minute": "0", "second": "0", "timestamp_ms": "1795312800000",
}  # fmt: skip
_DYNAMIC = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def dynamic_value(reference: str, parameters: dict[str, str]) -> str | None:
    """What Databricks puts in place of ``{{reference}}`` on the night of 2026-11-22, 02:00 UTC.

    Job parameters resolve to their defaults (themselves resolved). None for a reference
    Databricks does not know.
    """
    if reference in DYNAMIC_REFERENCES:
        return f"<{reference}>"
    for prefix in ("job.start_time.", "job.trigger.time."):
        if reference.startswith(prefix):
            return TIME_ARGUMENTS.get(reference.removeprefix(prefix))
    if reference.startswith("job.parameters."):
        name = reference.removeprefix("job.parameters.")
        if name in parameters:
            return resolve_dynamic(parameters[name], {})
    return None


def resolve_dynamic(text: str, parameters: dict[str, str]) -> str:
    """``text`` as a job run on 2026-11-22 sees it (unknown references left as they are)."""
    return _DYNAMIC.sub(lambda m: dynamic_value(m.group(1), parameters) or m.group(0), text)


def dynamic_problems(jobs: dict[str, Any], where: str) -> list[str]:
    """Every ``{{...}}`` of every job is a reference Databricks documents (or a parameter)."""
    problems = []
    for name, job in jobs.items():
        parameters = {p["name"]: p["default"] for p in job.get("parameters", [])}
        for text in _strings(job):
            for reference in _DYNAMIC.findall(text):
                if dynamic_value(reference, parameters) is None:
                    problems.append(f"{where}: job {name}: unknown reference {{{{{reference}}}}}")
    return problems


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def check_bundle(root: Path) -> dict[str, dict[str, Any]]:
    """Every check, for every target; return the resolved jobs per target or raise."""
    bundle = load_bundle(root)
    problems = structure_problems(bundle)
    # As written (${var.x} in typed fields), and as deployed to each target.
    problems += job_problems(bundle.get("resources", {}).get("jobs", {}), "as written")
    resolved = {}
    for target in bundle["targets"]:
        tree, found = resolved_bundle(bundle, target)
        jobs = tree.get("resources", {}).get("jobs", {})
        problems += found + job_problems(jobs, target) + cli_problems(jobs, target)
        problems += dynamic_problems(jobs, target)
        resolved[target] = tree
    if problems:
        raise BundleError("\n".join(problems))
    return resolved


@pytest.fixture(scope="module")
def deployed() -> dict[str, dict[str, Any]]:
    """The real bundle, resolved per target (the checks have passed)."""
    return check_bundle(REPO)


def bundle_copy(tmp_path: Path) -> Path:
    """A copy of the bundle's files to break one thing in."""
    root = tmp_path / "bundle"
    root.mkdir()
    shutil.copy(REPO / "databricks.yml", root)
    shutil.copytree(REPO / "resources", root / "resources")
    return root


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


# --- the real files pass -----------------------------------------------------------------------


def test_the_bundle_passes_every_check_in_every_target(deployed):
    assert set(deployed) == TARGETS
    for tree in deployed.values():
        assert set(tree["resources"]["jobs"]) == JOBS


def test_every_job_is_a_typed_databricks_job(deployed):
    for tree in deployed.values():
        for spec in tree["resources"]["jobs"].values():
            job = Job.from_dict(copy.deepcopy(spec))
            assert job.max_concurrent_runs == 1  # runs share the dataset, alias, partition


def test_the_pipeline_runs_ingest_then_train_then_score(deployed):
    pipeline = deployed["prod"]["resources"]["jobs"]["dlpipe_pipeline"]
    order = {
        t["task_key"]: [d["task_key"] for d in t.get("depends_on", [])] for t in pipeline["tasks"]
    }
    assert order == {"ingest": [], "train": ["ingest"], "score": ["train"]}
    commands = [t["python_wheel_task"]["parameters"][0] for t in pipeline["tasks"]]
    assert commands == ["ingest", "train", "score"]
    # The other jobs run the same tasks as the pipeline, parameter for parameter.
    jobs = deployed["prod"]["resources"]["jobs"]
    pipeline_tasks = {t["task_key"]: t["python_wheel_task"] for t in pipeline["tasks"]}
    for job, task in tasks({k: v for k, v in jobs.items() if k != "dlpipe_pipeline"}):
        assert task["python_wheel_task"] == pipeline_tasks[task["task_key"]], job
    train = [t["task_key"] for t in jobs["dlpipe_train"]["tasks"]]
    assert train == ["ingest", "train"]  # the weekly training ingests the new images first
    assert jobs["dlpipe_train"]["tasks"][1]["depends_on"] == [{"task_key": "ingest"}]


def test_every_task_names_a_job_cluster_of_its_job(deployed):
    for tree in deployed.values():
        for job in tree["resources"]["jobs"].values():
            keys = {c["job_cluster_key"] for c in job["job_clusters"]}
            used = {t["job_cluster_key"] for t in job["tasks"]}
            assert used == keys, "a cluster no task uses, or a task without a cluster"


def test_schedule_is_paused_in_dev_and_runs_in_prod(deployed):
    bundle = load_bundle(REPO)
    assert bundle["targets"]["dev"]["mode"] == "development"
    assert bundle["targets"]["prod"]["mode"] == "production"
    # Production mode refuses to deploy without an explicit root path (one copy per workspace).
    assert bundle["targets"]["prod"]["workspace"]["root_path"]
    for target, status in (("dev", "PAUSED"), ("prod", "UNPAUSED")):
        jobs = deployed[target]["resources"]["jobs"]
        scheduled = {name for name, job in jobs.items() if "schedule" in job}
        assert scheduled == {"dlpipe_score", "dlpipe_train"}  # not ingest, not the pipeline
        for name in scheduled:
            schedule = jobs[name]["schedule"]
            assert schedule["pause_status"] == status
            assert schedule["timezone_id"]
            assert jobs[name]["queue"] == {"enabled": True}  # a late night waits, not skipped
        # Quartz (seconds first): scoring every day, training on one day of the week.
        nightly = jobs["dlpipe_score"]["schedule"]["quartz_cron_expression"].split()
        weekly = jobs["dlpipe_train"]["schedule"]["quartz_cron_expression"].split()
        assert len(nightly) in (6, 7) and nightly[3:6] == ["*", "*", "?"]
        assert len(weekly) in (6, 7) and weekly[3] == "?" and weekly[5] not in ("*", "?")


def test_training_cluster_runs_one_rank_per_gpu_worker(deployed):
    bundle = load_bundle(REPO)
    for target, tree in deployed.items():
        variables, _ = target_variables(bundle, target)
        jobs = tree["resources"]["jobs"]
        for job, task in tasks(jobs):
            cluster = next(
                c["new_cluster"]
                for c in jobs[job]["job_clusters"]
                if c["job_cluster_key"] == task["job_cluster_key"]
            )
            assert re.fullmatch(RUNTIMES[target], cluster["spark_version"])
            assert cluster["data_security_mode"] == "SINGLE_USER"  # ML runtime + Unity Catalog
            args = parse_dlpipe(task["python_wheel_task"]["parameters"])
            config = load_config(args.conf, args.set or ())
            if args.command != "train":
                assert "-cpu-ml-" in cluster["spark_version"]
                continue
            assert "-gpu-ml-" in cluster["spark_version"]
            assert cluster["node_type_id"] == variables["gpu_node_type"]
            assert cluster["num_workers"] == variables["num_workers"]
            assert cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
            assert config.train.num_proc == variables["num_workers"]
            assert config.train.use_gpu is True
            if target == "keras":  # Keras 3/JAX ranks, nothing of Horovod
                assert config.train.launcher == "keras"
                assert "DLPIPE_HOROVOD_WHEELS" not in cluster.get("spark_env_vars", {})
                continue
            assert config.train.launcher == "horovod"
            assert cluster["spark_env_vars"]["DLPIPE_HOROVOD_WHEELS"].startswith("/Volumes/")


def test_tasks_install_the_wheel_the_artifact_builds(deployed):
    bundle = load_bundle(REPO)
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl"
    assert "--no-deps" in artifact["build"] and "-w dist" in artifact["build"]
    name = re.sub(r"[-_.]+", "_", PYPROJECT["project"]["name"])
    wheel = f"{name}-{PYPROJECT['project']['version']}-py3-none-any.whl"
    for tree in deployed.values():
        for _, task in tasks(tree["resources"]["jobs"]):
            (library,) = task["libraries"]
            # Paths in resources/*.yml are relative to that file.
            pattern = os.path.normpath(REPO / "resources" / library["whl"])
            assert fnmatch.fnmatch(str(REPO / "dist" / wheel), pattern), library
            assert not fnmatch.fnmatch(str(REPO / "dist" / "horovod-0.28.1-x.whl"), pattern)


def test_entry_point_is_the_cli_and_raises_its_exit_code():
    (script,) = {
        t["python_wheel_task"]["entry_point"]
        for _, t in tasks(load_bundle(REPO)["resources"]["jobs"])
    }
    module, _, attribute = PYPROJECT["project"]["scripts"][script].partition(":")
    console = getattr(importlib.import_module(module), attribute)
    assert callable(console) and (module, attribute) == ("pipelines.cli", "console")
    # A python_wheel_task calls the function: a failure must raise, not just return 1.
    code = (
        "import sys; sys.argv = ['dlpipe', 'train', '--conf', 'no-such-target'];"
        f"from {module} import {attribute}; {attribute}(); print('returned')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "returned" not in done.stdout
    assert "config file not found: no-such-target" in done.stderr


def test_targets_keep_data_and_models_apart(deployed):
    seen = {}
    for target, tree in deployed.items():
        jobs = tree["resources"]["jobs"]
        train = next(t for _, t in tasks(jobs) if t["task_key"] == "train")
        args = parse_dlpipe(train["python_wheel_task"]["parameters"])
        config = load_config(args.conf, args.set or ())
        catalog, schema, model = config.mlflow.model_name.split(".")
        assert config.work_dir.startswith(f"/Volumes/{catalog}/{schema}/")
        assert config.mlflow.tracking_uri == "databricks"
        assert config.mlflow.registry_uri == "databricks-uc"
        seen[target] = (config.work_dir, config.mlflow.model_name, config.mlflow.experiment)
    for one, other in (("dev", "prod"), ("keras", "prod"), ("keras", "dev")):
        pairs = zip(seen[one], seen[other], strict=True)
        assert all(a != b for a, b in pairs), f"{one} would write {other}'s data"


def test_scoring_writes_the_delta_table_of_the_target(deployed):
    for tree in deployed.values():
        score = next(t for _, t in tasks(tree["resources"]["jobs"]) if t["task_key"] == "score")
        args = parse_dlpipe(score["python_wheel_task"]["parameters"])
        config = load_config(args.conf, args.set or ())
        assert config.score.format == "delta"
        assert re.fullmatch(r"\w+\.\w+\.\w+", args.output)  # a Unity Catalog table name
        assert args.output.rsplit(".", 1)[0] == config.mlflow.model_name.rsplit(".", 1)[0]
        assert args.source.startswith(config.work_dir + "/")


def test_every_cluster_runs_the_init_script_in_the_bundle(deployed):
    for target, tree in deployed.items():
        expected = KERAS_INIT_SCRIPT if target == "keras" else INIT_SCRIPT
        for job in tree["resources"]["jobs"].values():
            for cluster in job["job_clusters"]:
                (script,) = cluster["new_cluster"]["init_scripts"]
                destination = script["workspace"]["destination"]
                # ${workspace.file_path} is where the bundle syncs the repository's files.
                relative = destination.removeprefix("${workspace.file_path}/")
                assert (REPO / relative).resolve() == expected
    for script in (INIT_SCRIPT, KERAS_INIT_SCRIPT):
        assert os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_keras_target_has_no_horovod_anywhere(deployed):
    """17.3 LTS ML has no Horovod: its clusters install none, its libraries are the wheel."""
    text = KERAS_INIT_SCRIPT.read_text()
    assert "pip uninstall --quiet --yes horovod petastorm" in text
    assert not re.search(r"pip install[^\n]*horovod", text)
    for job in deployed["keras"]["resources"]["jobs"].values():
        for _, task in tasks({"job": job}):
            assert all("horovod" not in str(library) for library in task["libraries"])
        for cluster in job["job_clusters"]:
            assert "horovod" not in str(cluster["new_cluster"]).lower()


def test_keras_init_script_pins_are_the_pyproject_pins():
    text = KERAS_INIT_SCRIPT.read_text()
    block = re.search(r"# BEGIN PINS.*?\n(.*?)# END PINS", text, re.S)
    assert block, "the PINS block is missing"
    pins = set(re.findall(r'^\s*"([^"]+)"\s*$', block.group(1), re.M))
    project = PYPROJECT["project"]
    listed = [*project["dependencies"], *project["optional-dependencies"]["keras-common"]]
    assert pins == {d for d in listed if not d.startswith("pyspark")}
    (jax,) = [d for d in project["optional-dependencies"]["keras"] if d.startswith("jax")]
    assert f"JAX_VERSION={jax.split('==')[1]}\n" in text


def test_init_script_pins_are_the_pyproject_pins():
    text = INIT_SCRIPT.read_text()
    block = re.search(r"# BEGIN PINS.*?\n(.*?)# END PINS", text, re.S)
    assert block, "the PINS block is missing"
    pins = set(re.findall(r'^\s*"([^"]+)"\s*$', block.group(1), re.M))
    # The pinned stack: the stack-neutral dependencies and the `pinned` extra, less pyspark.
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    listed = [*project["dependencies"], *extras["pinned"]]
    wanted = {d for d in listed if not d.startswith("pyspark")}
    assert pins == wanted
    (tensorflow,) = [d for d in extras["gpu"] if d.startswith("tensorflow")]
    version = tensorflow.split("==")[1]
    assert f"TF_VERSION={version}\n" in text
    horovod = re.search(r"^HOROVOD_VERSION\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert horovod and f"HOROVOD_VERSION={horovod.group(1)}\n" in text


def test_overlay_loads_with_no_unknown_key():
    by_path = load_config(REPO / "conf" / "databricks.yaml")
    by_name = load_config("databricks")  # what the jobs pass; shipped inside the wheel too
    assert by_path == by_name
    assert by_path.spark.master is None
    assert by_path.mlflow.tracking_uri == "databricks"
    assert by_path.mlflow.registry_uri == "databricks-uc"
    catalog, schema, _ = by_path.mlflow.model_name.split(".")
    assert re.fullmatch(r"[a-z0-9_]+", by_path.mlflow.model_name.replace(".", ""))
    volume = f"/Volumes/{catalog}/{schema}/"
    assert by_path.work_dir.startswith(volume)
    assert by_path.ingest.source.startswith(volume) and by_path.score.source.startswith(volume)
    assert by_path.score.format == "delta"
    assert by_path.score.table == f"{catalog}.{schema}.scores"


def test_registry_uri_defaults_to_none():
    # null leaves MLflow's own choice (MLFLOW_REGISTRY_URI, else the tracking store).
    assert load_config().mlflow.registry_uri is None


def test_nothing_in_the_bundle_is_specific_to_one_dataset():
    # Data set, model name, image size, channels, model: variables (the model's default is
    # the zoo's default architecture, which is a choice of the deployment, not of the data).
    files = [REPO / "databricks.yml", *sorted((REPO / "resources").rglob("*"))]
    for path in (p for p in files if p.is_file()):
        assert not re.search(r"digit", path.read_text(), re.I), path


def _configs(tree: dict[str, Any], command: str) -> list[tuple[Any, Any]]:
    """(parsed arguments, config) of every task of the deployed ``tree`` running ``command``."""
    found = []
    for _, task in tasks(tree["resources"]["jobs"]):
        args = parse_dlpipe(task["python_wheel_task"]["parameters"])
        if args.command == command:
            found.append((args, load_config(args.conf, [*(args.set or ()), *args.overrides(args)])))
    return found


def _check_variables_reach_the_tasks(deployed, bundle) -> None:
    for target, tree in deployed.items():
        v, _ = target_variables(bundle, target)
        model_name = f"{v['catalog']}.{v['schema']}.{v['model_name']}"
        for _, config in _configs(tree, "ingest"):
            assert (config.ingest.image_size, config.ingest.channels) == (
                v["image_size"], v["channels"],
            )  # fmt: skip
        trainings = _configs(tree, "train")
        scorings = _configs(tree, "score")
        assert len(trainings) == len(scorings) == 2  # dlpipe_train and dlpipe_score, pipeline
        for _, config in trainings:
            assert config.train.model == v["model"]
            assert config.mlflow.model_name == model_name
            assert config.mlflow.experiment == v["experiment"]
        for _, config in scorings:
            assert config.mlflow.model_name == model_name  # what training registers
            assert config.mlflow.experiment == v["experiment"]  # summaries: <experiment>-scoring


def test_model_name_image_size_channels_and_model_are_variables_of_every_task(deployed):
    _check_variables_reach_the_tasks(deployed, load_bundle(REPO))


def test_a_deployment_for_other_images_changes_only_variables(tmp_path):
    root = bundle_copy(tmp_path)
    edit(
        root / "databricks.yml",
        "      schema: dlpipe\n",
        "      schema: dlpipe\n      model_name: flowers\n      model: resnet_small\n"
        "      image_size: 64\n      channels: 3\n",
    )
    bundle = load_bundle(root)
    deployed = check_bundle(root)
    assert target_variables(bundle, "prod")[0]["model_name"] == "flowers"
    _check_variables_reach_the_tasks(deployed, bundle)
    ingests = _configs(deployed["prod"], "ingest")
    assert len(ingests) == 3  # dlpipe_ingest, dlpipe_train, dlpipe_pipeline
    assert all((c.ingest.image_size, c.ingest.channels) == (64, 3) for _, c in ingests)
    assert all(c.train.model == "resnet_small" for _, c in _configs(deployed["prod"], "train"))


def test_nightly_scoring_writes_one_batch_per_night_of_only_new_files(deployed):
    from pipelines.batch_ids import BatchIdError, resolve_batch_id

    when = datetime(2026, 11, 22, 2, 0, 7, tzinfo=UTC)
    for tree in deployed.values():
        jobs = tree["resources"]["jobs"]
        for name in ("dlpipe_score", "dlpipe_pipeline"):
            job = jobs[name]
            parameters = {p["name"]: p["default"] for p in job["parameters"]}
            # The schedule's trigger date: a retried or repaired night keeps its batch id.
            assert parameters == {"batch_id": "{{job.trigger.time.iso_date}}"}
            (task,) = [t for t in job["tasks"] if t["task_key"] == "score"]
            raw = parse_dlpipe(task["python_wheel_task"]["parameters"])
            assert raw.batch_id == "{{job.parameters.batch_id}}"
            # Outside a job the reference is refused, with why; in the job it is the night.
            with pytest.raises(BatchIdError, match="Databricks dynamic value reference"):
                resolve_batch_id(raw.batch_id, when)
            given = task["python_wheel_task"]["parameters"]
            args = parse_dlpipe([resolve_dynamic(p, parameters) for p in given])
            assert resolve_batch_id(args.batch_id, when) == ("2026-11-22", False)
            config = load_config(args.conf, args.set or ())
            assert config.score.only_new and config.score.identity == "stat"
            assert config.score.format == "delta" and config.score.log_summary


# --- ... and a copy with one mistake fails -----------------------------------------------------


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        # job level
        (
            "resources/score.job.yml",
            "      schedule:\n",
            "      shedule:\n",
            "Unexpected field 'shedule' for class Job",
        ),
        # inside a task
        (
            "resources/train.job.yml",
            "entry_point: dlpipe",
            "entrypoint: dlpipe",
            "Unexpected field 'entrypoint' for class PythonWheelTask",
        ),
        (
            "resources/score.job.yml",
            "          timeout_seconds:",
            "          timeout_second:",
            "Unexpected field 'timeout_second' for class Task",
        ),
        # inside a cluster (the complex variable every job uses)
        (
            "databricks.yml",
            "      num_workers: ${var.num_workers}",
            "      num_worker: ${var.num_workers}",
            "Unexpected field 'num_worker' for class ClusterSpec",
        ),
        (
            "databricks.yml",
            "        spark.task.resource.gpu.amount",
            "        spark.task.resource.gpu.amount: x\n      spark_confs:\n        a",
            "Unexpected field 'spark_confs' for class ClusterSpec",
        ),
        # a value the typed model refuses
        (
            "databricks.yml",
            "      schedule_pause_status: UNPAUSED",
            "      schedule_pause_status: UNPAUSD",
            "'UNPAUSD' is not a valid PauseStatus",
        ),
        # outside the jobs
        ("databricks.yml", "    mode: development", "    mod: development", "unknown field 'mod'"),
        ("databricks.yml", "    build: ", "    bulid: ", "unknown field 'bulid'"),
    ],
)
def test_a_misspelt_field_fails(tmp_path, file, old, new, message):
    root = bundle_copy(tmp_path)
    edit(root / file, old, new)
    with pytest.raises(BundleError, match=re.escape(message)):
        check_bundle(root)


def test_a_dangling_variable_is_reported(tmp_path):
    root = bundle_copy(tmp_path)
    edit(
        root / "resources/train.job.yml",
        "train.num_proc=${var.num_workers}",
        "train.num_proc=${var.num_worker}",
    )
    with pytest.raises(BundleError) as failure:
        check_bundle(root)
    assert "dev: ${var.num_worker} names no variable" in str(failure.value)
    assert "prod: ${var.num_worker} names no variable" in str(failure.value)


def test_a_variable_unset_in_one_target_is_reported(tmp_path):
    root = bundle_copy(tmp_path)
    edit(root / "databricks.yml", "    default: main\n", "")  # no target sets the catalog
    with pytest.raises(BundleError, match="dev: variable catalog has no default"):
        check_bundle(root)


def test_an_unknown_cli_option_fails(tmp_path):
    root = bundle_copy(tmp_path)
    edit(
        root / "resources/train.job.yml",
        "an error\n              - --json\n",
        "an error\n              - --epochs\n              - '3'\n",
    )
    with pytest.raises(
        BundleError,
        match=r"dlpipe_train\.train: dlpipe rejects its arguments: .*"
        r"unrecognized arguments: --epochs 3",
    ):
        check_bundle(root)


def test_an_unknown_config_key_in_a_task_fails(tmp_path):
    root = bundle_copy(tmp_path)
    edit(root / "resources/score.job.yml", "mlflow.model_name=", "mlflow.model=")
    with pytest.raises(
        BundleError, match=r"dlpipe_score\.score: unknown config key mlflow\.model "
    ):
        check_bundle(root)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '"{{job.trigger.time.iso_date}}"',
            '"{{job.trigger.time.iso_dat}}"',
            "dlpipe_score: unknown reference {{job.trigger.time.iso_dat}}",
        ),
        (
            '"{{job.parameters.batch_id}}"',
            '"{{job.parameters.batchid}}"',
            "dlpipe_score: unknown reference {{job.parameters.batchid}}",
        ),
    ],
)
def test_an_unknown_dynamic_value_reference_fails(tmp_path, old, new, message):
    root = bundle_copy(tmp_path)
    edit(root / "resources/score.job.yml", old, new)
    with pytest.raises(BundleError, match=re.escape(message)):
        check_bundle(root)


def test_an_entry_point_missing_from_the_scripts_fails(tmp_path):
    root = bundle_copy(tmp_path)
    edit(root / "resources/ingest.job.yml", "entry_point: dlpipe", "entry_point: dlpipe-ingest")
    with pytest.raises(BundleError, match="entry_point 'dlpipe-ingest' not in scripts"):
        check_bundle(root)
