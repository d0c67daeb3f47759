"""Concurrent jobs on one work directory: real ``dlpipe`` processes started at one moment.

Two ``dlpipe train`` runs of one model name (each its own run folder; two versions; the
alias on the better one), and two ``dlpipe score`` runs on different batches meeting a
model version no job has downloaded or archived yet. A real sqlite MLflow store, the CLI
via subprocess, the scoring table read back with pyarrow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from mlflow import MlflowClient

from pipelines.registry import DECIDING_TAG
from pipelines.store import Store

MODEL = "digits-classifier"


def _cli(command: str, sets: list[str], *args: str) -> list[str]:
    flags = [arg for item in sets for arg in ("--set", item)]
    return [sys.executable, "-m", "pipelines.cli", command, "--json", *args, *flags]


def _together(commands: list[list[str]], env: dict, started: list) -> list[dict[str, Any]]:
    """Start every command at once; wait for all; each one's JSON result (all must succeed)."""
    procs = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    started.extend(procs)
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[:2000] + " ... " + stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def test_two_trainings_of_one_model_keep_their_folders_and_the_alias_ends_on_the_better(
    digits, tmp_path, dlpipe_env, started, small_config
):
    common = ("train.launcher=local", "train.epochs=2")
    # The same work at the same pace, so both reach the registry together; one learns
    # almost nothing (a rate 10^4 times smaller).
    good = small_config.sets(*common)
    poor = small_config.sets(*common, "train.learning_rate=0.0000001")
    dataset = ("--dataset", str(digits))
    results = _together(
        [_cli("train", good, *dataset), _cli("train", poor, *dataset)], dlpipe_env, started
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert all(DECIDING_TAG not in v.tags for v in versions)  # every decision recorded
    accuracy = {
        str(v.version): client.get_run(v.run_id).data.metrics["test_accuracy"] for v in versions
    }
    better = max(accuracy, key=accuracy.get)
    assert accuracy["1"] != accuracy["2"], accuracy
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == better, (accuracy, [r["decision"] for r in results])
    # The later version decided against the earlier one, which had decided first.
    later = max(versions, key=lambda v: int(v.version))
    assert later.tags["promotion_champion_version"] in ("1", better)

    # Each run trained in its own folder: both checkpoints complete, neither clobbered.
    store = Store.of(small_config())
    for result in results:
        run_dir = store.run_dir(MODEL, result["run_id"])
        state = json.loads(run_dir.checkpoint_state.read_text())
        assert state["epoch"] == 2 and run_dir.final_model.is_file()
        assert run_dir.remembered_run() == result["run_id"]


def test_two_scorings_meeting_a_new_model_version_both_write_their_batch(
    digits, tmp_path, dlpipe_env, started, small_config
):
    from pipelines.demo import write_demo_digits
    from pipelines.train.driver import train
    from pipelines.train.launchers import LocalLauncher

    trained = train(small_config("train.launcher=local", "train.epochs=1"), LocalLauncher(), digits)
    images = sorted(write_demo_digits(tmp_path / "png").path.rglob("*.png"))
    batches = {"a": images[:40], "b": images[40:70]}
    sources = {}
    for batch, files in batches.items():
        sources[batch] = tmp_path / f"batch-{batch}"
        for file in files:
            target = sources[batch] / file.parent.name / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
    cache = Store.of(small_config()).model_cache
    assert not cache.exists()  # a version no job has met yet

    sets = small_config.sets()
    commands = [_cli("score", sets, "--source", str(sources[b]), "--batch-id", b) for b in batches]
    results = _together(commands, dlpipe_env, started)

    assert [r["rows"] for r in results] == [40, 30]
    assert all(r["errors"] == 0 for r in results)
    table = ds.dataset(tmp_path / "work" / "tables" / "scores", partitioning="hive").to_table()
    rows = table.select(["batch_id", "path", "model_version"]).to_pylist()
    for batch, files in batches.items():
        scored = sorted(Path(r["path"]).name for r in rows if r["batch_id"] == batch)
        assert scored == sorted(f.name for f in files), batch  # every image once
    assert {r["model_version"] for r in rows} == {trained.model_version}
    # One copy of the version and one archive, no staging left behind.
    folders = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    assert sorted(p.name for p in cache.iterdir()) == [folders[0], f"{folders[0]}.zip"]
