"""The benchmarks on a real local SparkSession, at a tiny size (no timing asserted).

Every benchmark runs for real (Spark, Petastorm, TensorFlow, Horovod, MLflow), once, on a
few dozen generated images; the tests check the structure and consistency of what comes
back (counts, units, ratio = value / baseline, target verdicts, clean-up), never speed.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict

import pytest

from pipelines.bench import (
    BENCHMARKS,
    CSV_COLUMNS,
    Measurement,
    bench_feed,
    bench_ingest,
    bench_reader,
    bench_score,
    bench_train,
    format_table,
    generate_jpegs,
    machine_facts,
    prepared_dataset,
    run_benchmarks,
)
from pipelines.bench.stats import meets, pair
from pipelines.config import Config, IngestConfig
from pipelines.errors import UserError
from pipelines.store import Store

IMAGES = 40
#: Small row groups, so that the tiny training split still has several (two ranks).
ROWS_PER_ROW_GROUP = 8


@pytest.fixture(scope="module")
def ingest_config(spark, tmp_path_factory: pytest.TempPathFactory) -> Config:
    # The session fixture is already active: get_spark hands it back to the benchmark.
    work = tmp_path_factory.mktemp("bench-ingest")
    return Config(work_dir=str(work), ingest=IngestConfig(rows_per_row_group=ROWS_PER_ROW_GROUP))


@pytest.fixture(scope="module")
def config(spark, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A work directory shared by feed, reader, train and score (one cached dataset)."""
    work = tmp_path_factory.mktemp("bench-work")
    return Config(work_dir=str(work), ingest=IngestConfig(rows_per_row_group=ROWS_PER_ROW_GROUP))


@pytest.fixture(scope="module")
def measurements(ingest_config: Config) -> list[Measurement]:
    return bench_ingest(ingest_config, images=IMAGES, repeats=1)


def _check_pairing(m: Measurement, benchmark: str, unit: str) -> None:
    """What every measurement must satisfy, whatever the machine's speed."""
    assert m.benchmark == benchmark
    assert m.unit == unit
    assert m.value > 0 and m.baseline_value > 0
    assert m.ratio == pytest.approx(m.value / m.baseline_value)
    assert m.met == meets(m.ratio, m.target)
    runs = m.details["runs"]
    assert m.value == pytest.approx(statistics.median(runs["measured"]), rel=1e-5)
    assert m.baseline_value == pytest.approx(statistics.median(runs["baseline"]), rel=1e-5)
    assert len(runs["measured"]) == len(runs["baseline"]) == m.details["repeats"]
    json.dumps(asdict(m))  # JSON-ready


# --- ingest ----------------------------------------------------------------------------------


def test_every_measurement_pairs_a_value_with_a_positive_baseline(measurements):
    assert [m.baseline for m in measurements] == ["plain PIL loop", "decode_image, 1 process"]
    for m in measurements:
        _check_pairing(m, "ingest", "images/s")
        assert m.details["images"] == IMAGES
        assert all(len(s) == 1 for s in m.details["seconds"].values())
        assert set(m.details["cpu_seconds"]) == {"spark", "plain", "same"}
        for kind in ("driver", "jvm", "python_worker"):
            assert m.details["processes"][kind]["cpu_seconds"] > 0
    target, info = measurements
    assert target.target == ">= 1.6" and target.met == (target.ratio >= 1.6)
    assert info.target == "" and info.met is None
    assert info.details["parallel_efficiency"] == pytest.approx(
        info.ratio / info.details["task_slots"], abs=1e-3
    )
    _check_ceiling_and_fixed_cost(info, jobs=1)


def _check_ceiling_and_fixed_cost(m, jobs: int) -> None:
    """The parallel ceiling is within the slots; the fixed cost adds up to the job's time."""
    slots = m.details["task_slots"]
    assert 0 < m.details["parallel_ceiling"] <= slots
    assert m.details["share_of_ceiling"] == pytest.approx(
        m.ratio / m.details["parallel_ceiling"], abs=2e-3
    )
    fixed = m.details["fixed_cost"]
    assert fixed["jobs"] >= jobs and fixed["tasks"] >= slots
    assert fixed["to_first_task_s"] > 0 and fixed["after_last_stage_s"] >= 0
    parts = fixed["to_first_task_s"] + fixed["running_s"] + fixed["after_last_stage_s"]
    assert parts == pytest.approx(fixed["seconds"], abs=0.01)


def test_outputs_are_cleaned_up_and_the_data_is_cached(ingest_config, measurements):
    bench = Store.of(ingest_config).bench
    assert not [p for p in bench.iterdir() if p.name.startswith(("tmp-", "."))]
    sets = sorted(p.name for p in bench.iterdir())
    assert len(sets) == 2  # the measured set and the warm-up set
    source = next(p for p in bench.iterdir() if f"-{IMAGES}x" in p.name)
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*.jpg")}
    assert len(before) == IMAGES
    generate_jpegs(source, IMAGES)  # complete: reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*.jpg")} == before


def test_generated_jpegs_are_deterministic_and_a_foreign_directory_is_refused(tmp_path):
    a = generate_jpegs(tmp_path / "a", 6, size=32, classes=2, seed=3)
    b = generate_jpegs(tmp_path / "b", 6, size=32, classes=2, seed=3)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.jpg"))
    assert files[:2] == ["class_0/img_000000.jpg", "class_0/img_000002.jpg"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(UserError, match="not a generated set"):
        generate_jpegs(tmp_path / "a", 7, size=32, classes=2, seed=3)


# --- the shared dataset, feed, reader --------------------------------------------------------


def test_the_prepared_dataset_is_ingested_once_and_reused(config):
    first = prepared_dataset(config, IMAGES)
    manifest = first.path / "_manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = prepared_dataset(config, IMAGES)
    assert again == first and manifest.stat().st_mtime_ns == stamp
    assert first.image_shape == (28, 28, 1)
    assert sum(first.rows.values()) == IMAGES and first.rows["train"] > 0
    assert first.label_names == ["class_0", "class_1", "class_2", "class_3"]
    assert first.rows_per_row_group == ROWS_PER_ROW_GROUP


def test_feed_reports_epoch_time_and_images_per_second_of_both_feeds(config):
    epoch, rate = bench_feed(config, images=IMAGES, repeats=1)
    _check_pairing(epoch, "feed", "s/epoch")
    _check_pairing(rate, "feed", "images/s")
    assert (epoch.measured, epoch.baseline) == (
        "petastorm -> tf.data epoch",
        "in-memory tensors epoch",
    )
    assert epoch.target == "<= 1.1" and epoch.met == (epoch.ratio <= 1.1)
    assert rate.target == "" and rate.met is None
    details = epoch.details
    assert details["train_rows"] == details["rows"]["train"]
    assert details["steps_per_epoch"] == -(-details["train_rows"] // details["batch_size"])
    images_per_epoch = details["steps_per_epoch"] * details["batch_size"]
    # Same runs seen two ways: images/s is the images of an epoch over its seconds.
    assert rate.value == pytest.approx(images_per_epoch / epoch.value, rel=1e-4)
    assert rate.baseline_value == pytest.approx(images_per_epoch / epoch.baseline_value, rel=1e-4)
    assert rate.ratio == pytest.approx(1 / epoch.ratio, rel=1e-4)


def test_reader_reads_every_training_row_with_both_readers(config):
    (m,) = bench_reader(config, images=IMAGES, repeats=2)
    _check_pairing(m, "reader", "rows/s")
    assert (m.measured, m.baseline) == ("petastorm make_batch_reader", "pyarrow dataset")
    assert m.target == "" and m.met is None
    assert len(m.details["runs"]["measured"]) == 2


# --- train and score (Horovod ranks, MLflow, Spark scoring jobs) -----------------------------


@pytest.mark.slow
def test_train_times_one_and_two_horovod_ranks_against_plain_keras(config, spark):
    knobs = {"5 ms cycle": {"cycle_time_ms": 5.0}}
    step, scaling, ideal, host, knob, layer_stats = bench_train(
        config, images=IMAGES, repeats=1, knobs=knobs
    )
    _check_pairing(step, "train", "s/step")
    for m in (scaling, ideal, host, knob):
        _check_pairing(m, "train", "images/s")
    # Two processes that exchange nothing, against the same ideal: the host's own limit.
    assert (host.measured, host.baseline, host.target) == (
        "2 independent 1-thread processes",
        "2 x one 1-thread rank",
        "",
    )
    assert host.baseline_value == ideal.baseline_value
    (both,) = host.details["epoch_seconds"]["side_by_side"]
    assert len(both) == 2  # two processes, each timed
    assert (ideal.measured, ideal.baseline, ideal.target) == (
        "horovod 2 ranks",
        "2 x one 1-thread rank",
        ">= 0.9",
    )
    assert ideal.value == scaling.value
    one_thread = ideal.details["images_per_second"]["horovod_1_thread"]
    assert ideal.baseline_value == pytest.approx(2 * one_thread[0], rel=1e-4)
    assert knob.measured == "horovod 2 ranks, 5 ms cycle"
    assert knob.baseline == "horovod 2 ranks"
    assert knob.details["horovod"] == {"cycle_time_ms": 5.0}
    # The knob reached the ranks (it once stopped at the spec), and only its own launch.
    seen = knob.details["horovod_env"]
    assert seen["5 ms cycle"] == {"HOROVOD_CYCLE_TIME": "5.0"}
    assert seen["horovod_2"] == seen["horovod_1"] == {}
    _check_pairing(layer_stats, "train", "s/epoch")
    assert (layer_stats.measured, layer_stats.baseline) == (
        "fit epoch with layer stats",
        "fit epoch without",
    )
    assert layer_stats.target == "<= 1.05"
    assert 0 < layer_stats.details["callback_seconds_median"] < layer_stats.value
    assert (step.measured, step.baseline) == ("horovod 1 rank step", "plain keras fit step")
    assert (scaling.measured, scaling.baseline) == ("horovod 2 ranks", "plain keras fit")
    assert step.target == "<= 1.05" and scaling.target == ""
    details = step.details
    assert details["task_slots"] == spark.sparkContext.defaultParallelism >= 2
    train_rows, batch = details["rows"]["train"], details["batch_size_per_rank"]
    steps = details["steps_per_epoch"]
    assert steps["plain"] == steps["horovod_1"] == -(-train_rows // batch)
    assert steps["horovod_2"] == -(-train_rows // (2 * batch))
    for name, ranks in (("plain", 1), ("horovod_1", 1), ("horovod_2", 2)):
        (launch,) = details["epoch_seconds"][name]  # one launch (repeats=1)
        assert len(launch) == ranks
        assert all(len(epochs) == details["measured_epochs"] for epochs in launch)
        # images/s of all ranks = ranks * batch * steps / epoch = ranks * batch / step time
        (rate,) = details["images_per_second"][name]
        (step_s,) = details["step_seconds"][name]
        assert rate == pytest.approx(ranks * batch / step_s, rel=1e-3)
    assert len(details["launch_seconds"]["horovod_2"]) == 1
    # The one-thread rank ran on one TensorFlow thread; on 2 cores, so did each of 2 ranks.
    threads = details["intra_op_threads"]
    assert threads["horovod_1_thread"] == threads["horovod_2"] == threads["side_by_side"] == [1]
    for name in details["steps_per_epoch"]:
        assert 0 < details["cores_busy_per_rank"][name] <= details["task_slots"] + 0.5
        assert 0 < details["reader_cpu_share"][name] < 1  # the feed's readers did work


@pytest.mark.slow
def test_score_compares_spark_scoring_with_in_process_predict(config):
    import mlflow

    before = mlflow.get_tracking_uri()
    against_arrays, against_bytes, against_one_thread = bench_score(
        config, images=IMAGES, repeats=1
    )
    for m in (against_arrays, against_bytes, against_one_thread):
        _check_pairing(m, "score", "images/s")
        assert m.measured == "spark batch scoring"
        assert m.value == against_arrays.value  # the same Spark runs
    assert against_arrays.baseline == "pyfunc predict, decoded arrays"
    assert against_arrays.target == ">= 0.7"
    assert against_bytes.baseline == "pyfunc predict, file bytes" and against_bytes.met is None
    assert against_one_thread.baseline == "pyfunc predict, file bytes, 1 thread"
    assert against_one_thread.target == ">= 1.7"
    slots = against_bytes.details["task_slots"]
    for m in (against_bytes, against_one_thread):
        assert m.details["parallel_efficiency"] == pytest.approx(m.ratio / slots, abs=1e-3)
        _check_ceiling_and_fixed_cost(m, jobs=1)
    # Its TensorFlow on one thread keeps about one core busy: the ceiling is near the slots.
    assert against_one_thread.details["parallel_ceiling"] > 0.75 * slots
    # Where one more (untimed) scoring job's CPU went, per kind of process.
    processes = against_bytes.details["processes"]
    for kind in ("driver", "jvm", "python_worker"):
        assert processes[kind]["cpu_seconds"] > 0 and processes[kind]["peak_rss_mib"] > 0
    # The temporary MLflow store and the tables are gone; the caller's store is back.
    assert not list(Store.of(config).bench.glob("tmp-*"))
    assert mlflow.get_tracking_uri() == before


# --- running, reporting, CSV -----------------------------------------------------------------


def test_run_benchmarks_appends_csv_rows_with_one_header(config, tmp_path, monkeypatch):
    calls = []

    def recorded(cfg, *, images=3000, repeats=3):  # the registry and CSV are tested here
        calls.append((images, repeats))
        return [_measurement(2.0, 1.0), _measurement(3.0, 2.0, target="")]

    monkeypatch.setattr("pipelines.bench.BENCHMARKS", {"ingest": recorded})
    history = tmp_path / "hist" / "bench.csv"
    first = run_benchmarks(config, "ingest", images=12, repeats=2, csv_path=history)
    run_benchmarks(config, "all", csv_path=history)
    assert calls == [(12, 2), (3000, 3)]
    assert set(first) == {"machine", "results", "skipped"} and first["skipped"] == []
    assert first["results"][0]["ratio"] == 2.0
    lines = history.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert sum(line.startswith("timestamp,") for line in lines) == 1
    rows = list(csv.DictReader(history.open()))
    assert len(rows) == 4
    assert [float(r["ratio"]) for r in rows] == [2.0, 1.5, 2.0, 1.5]
    assert rows[0]["met"] == "true" and rows[1]["met"] == ""
    assert rows[0]["cores"] == str(first["machine"]["cores"])


def test_cli_bench_prints_a_table_and_json(config, capsys):
    from pipelines.cli import main

    code = main(
        [
            "bench", "feed", "--images", str(IMAGES), "--repeats", "1", "--json",
            "--set", f"work_dir={config.work_dir}",
            "--set", f"ingest.rows_per_row_group={ROWS_PER_ROW_GROUP}",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads(captured.out)  # --json: stdout is the JSON alone
    assert [r["unit"] for r in report["results"]] == ["s/epoch", "images/s"]
    assert all(r["benchmark"] == "feed" and r["ratio"] > 0 for r in report["results"])
    table = [line for line in captured.err.splitlines() if "dlpipe:" not in line]  # no logs
    assert table[0].startswith("machine:")  # the table for people goes to stderr
    assert sum(line.startswith("feed ") for line in table) == 2  # the table's rows


def test_format_table_has_a_row_per_measurement(measurements):
    report = {"machine": machine_facts(), "results": [asdict(m) for m in measurements]}
    table = format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("machine:")
    assert "baseline value" in lines[1] and "ratio" in lines[1]
    assert len(lines) == 3 + len(measurements)
    for m, line in zip(measurements, lines[3:], strict=True):
        assert line.startswith("ingest") and m.baseline in line and f"{m.ratio:.2f}x" in line


def test_machine_facts_record_cores_memory_and_versions():
    facts = machine_facts()
    assert facts["cores"] >= 1 and facts["memory_gib"] > 0
    for package in ("python", "numpy", "pyspark", "pyarrow", "petastorm", "mlflow"):
        assert facts[package], package
    assert "tensorflow" in facts and "horovod" in facts
    json.dumps(facts)


def test_every_stage_of_the_issue_is_registered_and_all_runs_them_in_pipeline_order():
    assert list(BENCHMARKS) == ["ingest", "feed", "reader", "train", "score", "overhead"]


def test_unknown_benchmark_is_a_user_error_listing_the_registered_ones(config, monkeypatch):
    available = "ingest, feed, reader, train, score, overhead, all, scale, peer, storage"
    with pytest.raises(UserError, match=f"^unknown benchmark 'nope'; available: {available}$"):
        run_benchmarks(config, "nope")
    monkeypatch.setattr("pipelines.bench.BENCHMARKS", {"ingest": BENCHMARKS["ingest"]})
    with pytest.raises(
        UserError, match="^unknown benchmark 'feed'; available: ingest, all, scale, peer, storage$"
    ):
        run_benchmarks(config, "feed")


def test_a_peer_that_cannot_be_built_is_a_skipped_row_not_a_failure(config, tmp_path, monkeypatch):
    # An empty wheel cache: the peer environment cannot get its Horovod.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    report = run_benchmarks(config, "peer", repeats=1)
    assert report["results"] == []
    [skipped] = report["skipped"]
    assert skipped.startswith("peer row skipped: no Horovod 0.28.1 wheel")
    assert "\n" not in skipped
    assert format_table(report).endswith(skipped)


@pytest.mark.parametrize("name", ["ingest", "feed", "reader", "train", "score"])
def test_bad_sizes_are_a_user_error_before_any_work(name, tmp_path):
    config = Config(work_dir=str(tmp_path / "work"))
    with pytest.raises(UserError, match=f"bench {name}: --images must be >= 1"):
        BENCHMARKS[name](config, images=0)
    with pytest.raises(UserError, match="repeats >= 1"):
        BENCHMARKS[name](config, images=10, repeats=0)
    assert not (tmp_path / "work").exists()


def test_pair_takes_medians_and_judges_the_ratio_against_the_target():
    m = pair("x", "a", [3.0, 1.0, 2.0], "b", [4.0, 4.0, 5.0], unit="s", target="<= 0.6")
    assert (m.value, m.baseline_value, m.ratio, m.met) == (2.0, 4.0, 0.5, True)
    assert m.details["runs"] == {"measured": [3.0, 1.0, 2.0], "baseline": [4.0, 4.0, 5.0]}
    assert pair("x", "a", [1.0], "b", [2.0], unit="s", target=">= 0.6").met is False
    assert pair("x", "a", [1.0], "b", [2.0], unit="s").met is None
    assert meets(1.6, ">= 1.6") is True and meets(1.11, "<= 1.1") is False
    with pytest.raises(ValueError, match="'>= x' or '<= x'"):
        meets(1.0, "> 1")
    with pytest.raises(ValueError, match="baseline"):
        pair("x", "a", [1.0], "b", [0.0], unit="s")


def _measurement(value: float, baseline: float, target: str = ">= 1.6") -> Measurement:
    ratio = value / baseline
    return Measurement(
        benchmark="ingest",
        measured="m",
        value=value,
        unit="images/s",
        baseline="b",
        baseline_value=baseline,
        ratio=ratio,
        target=target,
        met=(ratio >= 1.6) if target else None,
        details={},
    )
