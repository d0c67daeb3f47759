"""Sources by content, and every failed Spark read or write as one line (issue 23, item 1).

The real ``dlpipe`` command in a subprocess, on real files: a folder of images with stray
files, a Parquet table whose data pages are corrupt, outputs that cannot be created, a
dataset whose Parquet files are not Parquet. Each failure must end the command with exit
code 1 and, as the last line of stderr, one line that names the location and the fix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: A secret a user put in the config's Spark properties (better: spark-submit's own file).
SPARK_SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.fixture(scope="module")
def model(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A registered champion (one epoch, local launcher), as ``--set`` items for the CLI."""
    from pipelines.config import load_config
    from pipelines.train.driver import train
    from pipelines.train.launchers import LocalLauncher

    root = tmp_path_factory.mktemp("model")
    sets = {
        "work_dir": str(root / "work"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    config = load_config(
        overrides=[
            *(f"{key}={value}" for key, value in sets.items()),
            f"spark.conf={{spark.authenticate.secret: {SPARK_SECRET}}}",
            "train.launcher=local",
            "train.model=mlp",
            "train.hidden_units=16",
            "train.epochs=1",
            "train.early_stopping_patience=0",
        ]
    )
    train(config, LocalLauncher(), digits)
    return sets


def test_a_secret_in_the_config_is_not_recorded(model):
    from mlflow import MlflowClient

    from pipelines.tracking import REDACTED

    client = MlflowClient(tracking_uri=model["mlflow.tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("spark-dl-pipelines").experiment_id])
    assert run.data.params["spark.conf.spark.authenticate.secret"] == REDACTED
    store = Path(model["mlflow.tracking_uri"].removeprefix("sqlite:///"))
    assert SPARK_SECRET.encode() not in store.read_bytes()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits as PNG files in class folders."""
    from pipelines.demo import write_demo_digits

    return write_demo_digits(tmp_path_factory.mktemp("pngs") / "digits").path


def _dlpipe(
    env: dict[str, str], command: str, *args: str, sets: dict[str, str]
) -> subprocess.CompletedProcess:
    flags = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", command, *args, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(done: subprocess.CompletedProcess, command: str, *names: str) -> str:
    """The last stderr line, after checking that it is the command's one-line error."""
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith(f"dlpipe {command}: error: cannot "), done.stderr[-3000:]
    for name in names:
        assert name in last, last
    # Spark's own log (log4j, WARN) may show a failed task's stack traces; the driver's
    # Python shows none: no Py4J error, no traceback through the CLI.
    assert "Py4JJavaError" not in done.stderr, done.stderr[-3000:]
    assert 'pipelines/cli.py", line' not in done.stderr, done.stderr[-3000:]
    return last


def _blocked(tmp_path: Path) -> Path:
    """A location no one can create (tests run as root): its parent is a regular file."""
    parent = tmp_path / "a-file"
    parent.write_text("not a folder\n")
    return parent / "output"


def test_a_folder_of_images_with_stray_files_is_scored_as_images(model, pngs, dlpipe_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "incoming"
    shutil.copytree(pngs / "3", folder)
    images = len(list(folder.glob("*.png")))
    (folder / "_SUCCESS").write_bytes(b"")  # copied from a Spark output
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "README").write_text("scans of 2026-12-01\n")
    # A valid Parquet file of something else: a table, but not one of images.
    pq.write_table(pa.table({"id": [1, 2], "note": ["a", "b"]}), folder / "inventory.parquet")

    done = _dlpipe(
        dlpipe_env, "score", "--source", str(folder), "--json",
        sets={**model, "score.table": str(tmp_path / "scores")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["rows"], result["scored"], result["errors"]) == (images, images, 0)
    assert result["skipped"] == 5

    forced = _dlpipe(
        dlpipe_env, "score", "--source", str(folder), "--source-format", "table",
        sets={**model, "score.table": str(tmp_path / "scores")},
    )  # fmt: skip
    _one_line_error(forced, "score", f"read the source {folder}", "--source-format images")


def test_score_of_a_table_with_corrupt_data_fails_in_one_line(model, pngs, dlpipe_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "images_table"
    table.mkdir()
    files = sorted((pngs / "5").glob("*.png"))[:40]
    part = table / "part-00000.parquet"
    pq.write_table(
        pa.table({"path": [str(f) for f in files], "content": [f.read_bytes() for f in files]}),
        part,
    )
    (table / "_SUCCESS").write_bytes(b"")
    # Bit rot in the image column's pages; the footer (schema, offsets) stays valid.
    start = pq.read_metadata(part).row_group(0).column(1).data_page_offset
    with part.open("r+b") as file:
        file.seek(start)
        file.write(b"\xff" * 64)

    done = _dlpipe(
        dlpipe_env, "score", "--source", str(table),
        sets={**model, "score.table": str(tmp_path / "scores")},
    )  # fmt: skip
    last = _one_line_error(done, "score", f"cannot read the source {table}: ", str(part))
    assert "a Parquet table must be whole" in last


def test_score_into_a_table_that_cannot_be_created_fails_in_one_line(
    model, pngs, dlpipe_env, tmp_path
):
    output = _blocked(tmp_path)
    done = _dlpipe(
        dlpipe_env, "score", "--source", str(pngs / "4"), "--output", str(output), sets=model
    )
    last = _one_line_error(done, "score", f"cannot write the scoring table {output}: ")
    assert str(output.parent) in last and "--output (score.table)" in last


def test_ingest_into_an_output_that_cannot_be_created_fails_in_one_line(pngs, dlpipe_env, tmp_path):
    output = _blocked(tmp_path)
    done = _dlpipe(
        dlpipe_env, "ingest", "--source", str(pngs), "--output", str(output),
        sets={"work_dir": str(tmp_path / "work")},
    )  # fmt: skip
    last = _one_line_error(done, "ingest", f"cannot write the dataset {output}: ")
    assert str(output.parent) in last and "--output (ingest.output)" in last


def test_train_on_a_dataset_of_corrupt_files_fails_in_one_line(digits, dlpipe_env, tmp_path):
    dataset = tmp_path / "prepared"
    shutil.copytree(digits, dataset)
    broken = sorted((dataset / "split=train").glob("*.parquet"))
    for part in broken[:3]:
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # cut short
    done = _dlpipe(
        dlpipe_env, "train", "--dataset", str(dataset),
        sets={"work_dir": str(tmp_path / "work"), "train.epochs": "1"},
    )  # fmt: skip
    last = _one_line_error(
        done, "train", f"cannot read the dataset {dataset}: ", f"split=train/{broken[0].name}"
    )
    assert "(and 2 more)" in last and "dlpipe ingest" in last
    assert not (tmp_path / "work" / "mlflow.db").exists()  # failed before a run was opened


def test_run_into_an_output_that_cannot_be_created_fails_in_one_line(pngs, dlpipe_env, tmp_path):
    output = _blocked(tmp_path)
    done = _dlpipe(
        dlpipe_env, "run",
        sets={
            "work_dir": str(tmp_path / "work"),
            "ingest.source": str(pngs),
            "ingest.output": str(output),
        },
    )  # fmt: skip
    _one_line_error(done, "run", f"cannot write the dataset {output}: ")
