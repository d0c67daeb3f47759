"""The ``jobs/`` entry points through a real ``spark-submit``, as a cluster user submits them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from pipelines.demo import write_demo_digits

REPO = Path(__file__).resolve().parents[2]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


def _submit(env: dict[str, str], job: str, *args: str) -> dict:
    done = subprocess.run(
        [str(SPARK_SUBMIT), "--master", "local[2]", str(REPO / "jobs" / job), "--json", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ingest_train_score_through_spark_submit(dlpipe_env, tmp_path):
    source = write_demo_digits(tmp_path / "digits").path
    prepared = tmp_path / "prepared"
    sets = [
        f"work_dir={tmp_path / 'work'}",
        "ingest.image_size=16",
        "train.model=mlp",
        "train.hidden_units=32",
        "train.epochs=1",
        "train.early_stopping_patience=0",
    ]
    options = [arg for item in sets for arg in ("--set", item)]

    ingested = _submit(
        dlpipe_env, "ingest.py", "--source", str(source), "--output", str(prepared), *options
    )
    assert ingested["ingested"] == 1797
    assert json.loads((prepared / "_manifest.json").read_text())["image_shape"] == [16, 16, 1]

    trained = _submit(dlpipe_env, "train.py", "--dataset", str(prepared), *options)
    assert trained["world_size"] == 2 and trained["model_version"] == "1"

    table = tmp_path / "scores"
    scored = _submit(
        dlpipe_env, "score.py", "--source", str(source / "3"), "--output", str(table),
        "--batch-id", "threes-{date}", *options,
    )  # fmt: skip
    assert scored["rows"] == scored["scored"] == len(list((source / "3").glob("*.png")))
    assert re.fullmatch(r"threes-\d{4}-\d{2}-\d{2}", scored["batch_id"])  # the UTC date
    assert (table / f"batch_id={scored['batch_id']}").is_dir()
