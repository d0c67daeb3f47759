"""``dlpipe bench scale`` and its process sampler, for real at a tiny size (no timing asserted).

The scale benchmark runs once on 4 and 40 generated images (ingest, scoring, listing) and
on 20 and 80 digits (training, 2 epochs, Horovod ranks); the tests check the structure and
consistency of each point, memory seen in every kind of process, outputs growing with the
data, and that ``all`` leaves it out. The sampler is checked against a real child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from dataclasses import asdict

import psutil
import pytest

from pipelines.bench import BENCHMARKS, ON_REQUEST, bench_scale, format_scale_table, machine_facts
from pipelines.bench.processes import ProcessSampler
from pipelines.bench.scale import check_disk, scale_sizes
from pipelines.bench.stats import meets
from pipelines.config import Config, IngestConfig
from pipelines.errors import UserError
from pipelines.store import Store

IMAGES = 40
#: The digits used as 1x in the tests (the smallest training that still has every split).
DIGITS = 20
#: Small row groups, so that the tiny training split has a row group per rank.
ROWS_PER_ROW_GROUP = 4


@pytest.fixture(scope="module")
def config(spark, tmp_path_factory: pytest.TempPathFactory) -> Config:
    # The session fixture is already active: get_spark hands it back to the benchmark.
    work = tmp_path_factory.mktemp("bench-scale")
    return Config(work_dir=str(work), ingest=IngestConfig(rows_per_row_group=ROWS_PER_ROW_GROUP))


@pytest.fixture(scope="module")
def measurements(config: Config) -> list:
    return bench_scale(config, images=IMAGES, repeats=1, digits=DIGITS, photos=0)


def _points(measurements: list, stage: str) -> list:
    return [m for m in measurements if m.details.get("stage") == stage]


def test_every_point_has_seconds_a_consistent_cost_and_a_ratio_to_the_reference(measurements):
    for stage, sizes in (("ingest", [4, 40]), ("score", [4, 40]), ("train", [1, 4])):
        points = _points(measurements, stage)
        assert [m.details["size"] for m in points] == sizes, stage
        reference = points[1] if stage != "train" else points[0]
        for m in points:
            d = m.details
            assert m.benchmark == "scale" and m.unit == "ms/image"
            assert d["seconds"] > 0 and d["images"] > 0
            assert m.value == pytest.approx(1000 * d["seconds"] / d["images"], rel=1e-6)
            assert m.baseline_value == pytest.approx(reference.value, rel=1e-6)
            assert m.ratio == pytest.approx(m.value / m.baseline_value)
            assert m.met == meets(m.ratio, m.target)
            json.dumps(asdict(m))
        # The target applies above the reference only (train: 4x over 1x).
        assert [m.target for m in points] == (["", ""] if stage != "train" else ["", "<= 1.1"])
    train_1x, train_4x = _points(measurements, "train")
    assert train_4x.details["images"] == 4 * train_1x.details["images"] == 4 * DIGITS
    assert train_1x.details["epochs"] == train_4x.details["epochs"] == 2


def test_memory_is_seen_in_the_driver_the_jvm_and_the_python_workers(measurements):
    for m in [*_points(measurements, "ingest"), *_points(measurements, "score")]:
        procs = m.details["processes"]
        for kind in ("driver", "jvm", "python_worker"):
            assert procs[kind]["peak_rss_mib"] > 0, (m.measured, kind)
            assert procs[kind]["peak_total_rss_mib"] >= procs[kind]["peak_rss_mib"]
            assert procs[kind]["cpu_seconds"] >= 0
        assert procs["samples"] >= 2
    for m in _points(measurements, "train"):
        procs = m.details["processes"]
        assert procs["driver"]["peak_rss_mib"] > 0 and procs["jvm"]["peak_rss_mib"] > 0
        assert procs["horovod_rank"]["processes"] >= 1, procs  # ranks run beside the workers
        assert procs["horovod_rank"]["peak_rss_mib"] > 0


def test_every_job_point_has_its_fixed_cost_and_the_driver_slope(measurements):
    for stage in ("ingest", "score"):
        points = _points(measurements, stage)
        for m in points:
            fixed = m.details["fixed_cost"]
            assert fixed["jobs"] >= 1 and fixed["to_first_task_s"] > 0
            assert fixed["fixed_s"] <= fixed["seconds"]
        # One slope per stage, from the smallest point to the largest: the same on each.
        slopes = {m.details["driver_s_per_million_files"] for m in points}
        assert len(slopes) == 1


def test_outputs_are_measured_and_grow_with_the_data(measurements, config):
    for stage in ("ingest", "score"):
        small, large = _points(measurements, stage)
        assert 0 < small.details["output_bytes"] < large.details["output_bytes"], stage
    for m in _points(measurements, "train"):
        assert m.details["output_bytes"] > 0 and m.details["dataset_bytes"] > 0
    # Outputs and temporary stores are gone; generated data stays cached.
    bench = Store.of(config).bench
    assert not [p for p in bench.iterdir() if p.name.startswith(("tmp-", "."))]
    assert (bench / f"jpeg-v1-{IMAGES}x256-c4-s0").is_dir()


def test_listing_cost_is_extrapolated_per_million_files(measurements):
    seconds, memory = (m for m in measurements if m.measured.startswith("list_tree"))
    assert (seconds.unit, memory.unit) == ("s/1e6 files", "MiB/1e6 files")
    assert seconds.value > 0 and memory.value > 0
    assert seconds.details["files"] == IMAGES
    per_size = seconds.details["per_size"]
    assert set(per_size) == {"4", "40"}
    assert all(v["seconds_per_million"] > 0 and v["mib_per_million"] > 0 for v in per_size.values())


def test_the_scale_table_has_a_row_per_point(measurements):
    report = {"machine": machine_facts(), "results": [asdict(m) for m in measurements]}
    lines = format_scale_table(report).splitlines()
    assert "driver MiB" in lines[0] and "worker cpu s/run" in lines[0] and "output MiB" in lines[0]
    points = [m for m in measurements if "stage" in m.details]
    assert len(lines) == 2 + len(points)
    for m, line in zip(points, lines[2:], strict=True):
        assert line.startswith(m.measured)


def test_scale_runs_by_name_only_never_in_all():
    assert "scale" not in BENCHMARKS and ON_REQUEST["scale"] is bench_scale
    assert "peer" not in BENCHMARKS and list(ON_REQUEST) == ["scale", "peer", "storage"]


def test_sizes_follow_images_and_max():
    assert scale_sizes(None, False) == (3_000, 30_000)
    assert scale_sizes(None, True) == (3_000, 30_000, 100_000)
    assert scale_sizes(40, False) == (4, 40)
    assert scale_sizes(30, True) == (3, 30, 100)


def test_bad_sizes_and_too_little_disk_are_user_errors_before_any_work(tmp_path, monkeypatch):
    config = Config(work_dir=str(tmp_path / "work"))
    with pytest.raises(UserError, match="bench scale: --images must be >= 1"):
        bench_scale(config, images=0)
    with pytest.raises(UserError, match="repeats >= 1"):
        bench_scale(config, images=10, repeats=0)
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("U", (), {"free": 2**20})())
    with pytest.raises(UserError, match=r"^bench scale: needs about \d+\.\d GiB free under"):
        check_disk(config, (30_000, 100_000))
    assert not (tmp_path / "work").exists()


def test_max_is_refused_for_other_benchmarks(tmp_path):
    from pipelines.bench import run_benchmarks

    with pytest.raises(UserError, match="--max applies to bench scale only"):
        run_benchmarks(Config(work_dir=str(tmp_path)), "all", max_size=True)


# --- the process sampler ---------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import time
    block = bytearray(b"x") * (50 << 20)  # written, so resident
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    time.sleep(0.6)
    """
)


def test_the_sampler_sees_a_child_process_peak_memory_and_cpu():
    with ProcessSampler(interval=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", _CHILD])
        assert child.wait(timeout=30) == 0
    kind, peak_rss, cpu = sampler.figures(child.pid)
    assert kind == "other"  # a plain python child: neither JVM nor Spark nor Horovod
    assert peak_rss >= 40 * 2**20 and cpu >= 0.2
    usage = sampler.usage
    other = usage.kinds["other"]  # other children of this process may be counted too
    assert other.peak_rss_bytes >= peak_rss and other.cpu_seconds >= cpu
    assert usage.kinds["driver"].peak_rss_bytes > 0 and usage.samples >= 5
    assert not psutil.pid_exists(child.pid)  # reaped: nothing left behind
    assert "process-sampler" not in {t.name for t in threading.enumerate()}
    described = usage.describe()
    assert described["other"]["peak_rss_mib"] == usage.peak_rss_mib("other") >= 40
    json.dumps(described)
