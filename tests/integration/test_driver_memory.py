"""The driver's memory while it evaluates does not grow with the test split (issue 27).

Two datasets of the same generated photos, the second with 4x the test rows, are evaluated
by the driver's own :func:`pipelines.train.driver.evaluate` (streaming, one row group at a
time, a bounded report sample) in a fresh process each, whose RSS is sampled throughout.
The same process then reads the whole split the way the driver used to (``read_split`` +
``normalise``), which shows that the measurement sees a split held in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.config import IngestConfig, SplitConfig

SIDE = 96
#: Test rows at 1x (about; the split is by hash) and the report sample, below both sizes.
BASE_IMAGES, SAMPLE_LIMIT = 500, 200
#: Most the evaluation's peak may grow from 1x to 4x: a quarter of what the extra test
#: rows take as float32 (about 1,200 x 110 KB = 130 MB).
SLACK_SHARE = 0.25

_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil
    from pipelines.config import TrainConfig
    from pipelines.models import build_model
    from pipelines.store import DatasetDir
    from pipelines.tasks import CLASSIFICATION
    from pipelines.train.driver import evaluate
    from pipelines.train.feed import read_split
    from pipelines.images import normalise

    me = psutil.Process()

    def peak_growth(work):
        base, peak, done = me.memory_info().rss, [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.005)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = work()
            peak[0] = max(peak[0], me.memory_info().rss)
        finally:
            done.set()
            thread.join()
        return (peak[0] - base) / 2**20, result

    dataset = DatasetDir(sys.argv[1])
    manifest = dataset.read_manifest()
    shape = tuple(manifest.image_shape)
    model = build_model(TrainConfig(model="mlp", seed=0), shape, len(manifest.label_names))
    model.predict(normalise(read_split(dataset.split("train"), shape).images[:8]), verbose=0)
    evaluate(model, dataset, manifest, CLASSIFICATION, sample_limit=int(sys.argv[2]))  # warm
    grew, evaluation = peak_growth(
        lambda: evaluate(model, dataset, manifest, CLASSIFICATION, sample_limit=int(sys.argv[2]))
    )
    held, _ = peak_growth(lambda: normalise(read_split(dataset.split("test"), shape).images))
    print(json.dumps({"evaluate_mib": grew, "held_mib": held, "rows": evaluation.rows,
                      "sample": len(evaluation.sample)}))
    """
)


def _photos(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
            folder / f"p{i:05d}.png"
        )
    return root


def _probe(dataset: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(dataset), str(SAMPLE_LIMIT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_driver_evaluation_memory_is_flat_when_the_test_split_grows_4x(spark, tmp_path) -> None:
    from pipelines.ingest import ingest

    config = IngestConfig(
        image_size=SIDE,
        channels=3,
        rows_per_row_group=64,
        splits=SplitConfig(train=0.1, val=0.1, test=0.8),
    )
    sizes = {}
    for scale in (1, 4):
        source = _photos(tmp_path / f"src{scale}", BASE_IMAGES * scale)
        ingest(spark, config, source, tmp_path / f"prepared{scale}")
        sizes[scale] = _probe(tmp_path / f"prepared{scale}")
    small, large = sizes[1], sizes[4]
    assert large["rows"] > 3.5 * small["rows"] > 3.5 * SAMPLE_LIMIT
    assert small["sample"] == large["sample"] == SAMPLE_LIMIT  # the report's bounded sample
    extra_mib = (large["rows"] - small["rows"]) * SIDE * SIDE * 3 * 4 / 2**20
    # Holding the split, as the driver once did, grows by about the extra rows' float32.
    assert large["held_mib"] - small["held_mib"] > 0.5 * extra_mib
    # Streaming evaluation does not.
    assert large["evaluate_mib"] - small["evaluate_mib"] < SLACK_SHARE * extra_mib, sizes
