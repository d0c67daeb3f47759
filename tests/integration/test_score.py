"""Batch scoring and REST serving against a real registered model, real Spark, real HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines import schema, tracking
from pipelines.cli import main
from pipelines.config import Config, IngestConfig, load_config
from pipelines.demo import write_demo_digits
from pipelines.ingest import ingest
from pipelines.registry import ModelNotFoundError
from pipelines.rest_server import serve_command
from pipelines.score import TABLE_COLUMNS, read_table, score
from pipelines.sources import SourceError
from pipelines.store import Store
from pipelines.train.driver import train
from pipelines.train.launchers import LocalLauncher
from tests.integration.rest import free_port, post_images, stop, wait_until_serving


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory) -> tuple[Config, Path]:
    """A small registered champion trained on the digits at 16x16; returns config + PNGs."""
    root = tmp_path_factory.mktemp("score")
    digits = write_demo_digits(root / "png").path
    prepared = root / "prepared"
    ingest(spark, IngestConfig(image_size=16, rows_per_row_group=64), digits, prepared)
    config = load_config(
        overrides=[
            f"work_dir={root / 'work'}",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "train.launcher=local",
            "train.model=mlp",
            "train.hidden_units=64",
            "train.epochs=3",
            "train.early_stopping_patience=0",
            "score.arrow_batch_size=16",
        ]
    )
    train(config, LocalLauncher(), prepared)
    return config, digits


@pytest.fixture()
def incoming(trained, tmp_path) -> Path:
    """Forty real digit images in nested folders, plus a corrupt, an empty and a lost one."""
    _, digits = trained
    folder = tmp_path / "incoming-2026-11-22"
    for i, png in enumerate(sorted(digits.rglob("*.png"))[::45][:40]):
        # Names that URI encoding gets wrong: space, plus, percent, non-ASCII.
        name = f"img {i:02d}+%41é.png" if i == 1 else f"img{i:02d}.png"
        target = folder / ("a/b" if i % 3 else "") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "gone.png").symlink_to(folder / "deleted-meanwhile.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_one_row_per_file_matching_the_in_process_model(spark, trained, incoming, tmp_path):
    import mlflow

    config, _ = trained
    table = str(tmp_path / "scores")
    result = score(spark, config, str(incoming), table=table)
    assert (result.rows, result.errors, result.skipped) == (43, 3, 1)
    assert re.fullmatch(r"\d{8}T\d{6}Z", result.batch_id)  # the run's UTC date-time
    assert result.model_version == "1"
    # Where the time went: each phase once, together the run's wall time.
    phases = ["resolve_model", "wait_spark", "read_source", "ship_model", "score_job", "summary"]
    assert list(result.phases) == phases and min(result.phases.values()) >= 0
    assert sum(result.phases.values()) == pytest.approx(result.seconds, abs=0.2)

    rows = read_table(spark, table).toPandas()
    assert list(rows.columns) == list(TABLE_COLUMNS)
    assert len(rows) == 43 and rows.path.is_unique
    errors = rows[rows.error.notna()]
    assert sorted(Path(p).name for p in errors.path) == ["corrupt.png", "empty.jpg", "gone.png"]
    assert errors.predicted_label.isna().all() and errors.probabilities.isna().all()
    assert errors.top_labels.isna().all() and errors.top_probabilities.isna().all()

    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    model = mlflow.pyfunc.load_model("models:/digits-classifier@champion")
    good = rows[rows.error.isna()].sort_values("path")
    expected = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in good.path]}))
    assert list(good.predicted_label) == list(expected.predicted_label)
    assert list(good.probability) == pytest.approx(list(expected.probability), abs=1e-6)
    assert (good.model_uri == "models:/digits-classifier/1").all()
    classes = json.loads(Path(result.classes_file).read_text())
    assert classes["label_names"] == [str(d) for d in range(10)]
    assert result.class_order == result.classes_file
    # The top classes: names and probabilities read from probabilities and the class order.
    for row in good.itertuples():
        order = sorted(range(10), key=lambda k: -row.probabilities[k])[:3]
        assert list(row.top_labels) == [classes["label_names"][k] for k in order]
        assert list(row.top_probabilities) == pytest.approx([row.probabilities[k] for k in order])
        assert row.top_labels[0] == row.predicted_label
    # The file's identity: its size and modification time (to the microsecond).
    identity = (
        read_table(spark, table)
        .where("error IS NULL")
        .selectExpr("path", "file_size", "unix_micros(file_modified) AS modified_us", "file_sha256")
    )
    for row in identity.collect():
        stat = Path(row.path).stat()
        assert (row.file_size, row.modified_us) == (stat.st_size, stat.st_mtime_ns // 1000)
        assert row.file_sha256 is None  # score.identity=stat: no digest


def test_rerunning_a_batch_replaces_only_that_batch(spark, trained, incoming, tmp_path):
    config, _ = trained
    table = str(tmp_path / "scores")
    first = score(spark, config, str(incoming), table=table)
    score(spark, config, str(incoming), table=table, batch_id="other")
    # Spark escapes ':' in the partition folder's name: counted by Spark, not from the files.
    odd = score(spark, config, str(incoming), table=table, batch_id="2026-11-22T10:00")
    again = score(spark, config, str(incoming), table=table, batch_id="other")
    later = score(spark, config, str(incoming), table=table)  # a later night: its own batch
    frame = read_table(spark, table)
    counts = {r["batch_id"]: r["count"] for r in frame.groupBy("batch_id").count().collect()}
    assert counts == {first.batch_id: 43, "other": 43, "2026-11-22T10:00": 43, later.batch_id: 43}
    assert first.batch_id < later.batch_id  # generated ids sort as the runs started
    assert (again.rows, again.errors, odd.rows, odd.errors) == (43, 3, 43, 3)


def test_table_source_with_path_and_bytes(spark, trained, incoming, tmp_path):
    config, _ = trained
    files = sorted(p for p in incoming.rglob("*.png") if p.exists())
    rows = [(str(p), p.read_bytes()) for p in files] + [("lost.png", None)]
    source = tmp_path / "bytes_table"
    spark.createDataFrame(rows, "path string, content binary").write.parquet(str(source))
    # The table as a URI, as on a cluster: counted by Spark, class order via Hadoop's FS.
    table = f"file://{tmp_path / 't'}"
    result = score(spark, config, str(source), table=table, batch_id="b1")
    assert (result.rows, result.errors) == (len(files) + 1, 2)  # corrupt.png and lost.png
    lost = read_table(spark, table).where("path = 'lost.png'").first()
    assert lost.error == "no image bytes in column content" and lost.predicted_label is None
    classes = json.loads((tmp_path / "t" / "_classes" / "digits-classifier-v1.json").read_text())
    assert result.classes_file == f"{table}/_classes/digits-classifier-v1.json"
    assert classes["label_names"] == [str(d) for d in range(10)]


def _night_config(config: Config, **score_keys) -> Config:
    """``config`` with ``score.only_new`` on (and other ``score`` keys as given)."""
    return dataclasses.replace(
        config, score=dataclasses.replace(config.score, only_new=True, **score_keys)
    )


def _copy_digits(digits: Path, folder: Path, first: int, count: int) -> list[Path]:
    """Digit PNGs number ``first`` to ``first + count - 1`` of the bundled ones, in ``folder``."""
    copied = []
    for i, png in enumerate(sorted(digits.rglob("*.png"))[first : first + count], start=first):
        target = folder / ("nested" if i % 2 else "") / f"digit{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
        copied.append(target)
    return copied


def _batches(spark, table: str) -> dict[str, set[str]]:
    """The table's paths per batch."""
    batches: dict[str, set[str]] = {}
    for row in read_table(spark, table).select("batch_id", "path").collect():
        batches.setdefault(row.batch_id, set()).add(row.path)
    return batches


def test_nights_in_a_row_keep_every_batch_and_score_only_what_is_new(spark, trained, tmp_path):
    config, digits = trained
    nightly = _night_config(config)
    incoming, table = tmp_path / "incoming", str(tmp_path / "scores")
    first_files = _copy_digits(digits, incoming, 0, 20)
    (incoming / "corrupt.png").write_bytes(b"\x89PNG not really")
    corrupt = str(incoming / "corrupt.png")

    night1 = score(spark, nightly, str(incoming), table=table)
    assert (night1.rows, night1.errors, night1.skipped_already_scored) == (21, 1, 0)
    # Night 2, nothing new: only the file that failed is tried again.
    night2 = score(spark, nightly, str(incoming), table=table)
    assert (night2.rows, night2.errors, night2.skipped_already_scored) == (1, 1, 20)
    # Night 3: five new files, and one rewritten (its modification time moves on).
    new_files = _copy_digits(digits, incoming, 100, 5)
    os.utime(first_files[3], ns=(time.time_ns(), time.time_ns() + 10**9))
    night3 = score(spark, nightly, str(incoming), table=table)
    expected3 = {str(f) for f in new_files} | {str(first_files[3]), corrupt}
    assert (night3.rows, night3.skipped_already_scored) == (7, 19)

    batches = _batches(spark, table)
    assert len({night1.batch_id, night2.batch_id, night3.batch_id}) == 3
    assert batches == {
        night1.batch_id: {str(f) for f in first_files} | {corrupt},
        night2.batch_id: {corrupt},
        night3.batch_id: expected3,
    }
    # Re-running night 3 replaces exactly that batch, with what it held.
    again = score(spark, nightly, str(incoming), table=table, batch_id=night3.batch_id)
    assert (again.rows, again.skipped_already_scored) == (7, 19)
    assert _batches(spark, table) == batches

    # A new version of the model scores every file again, unless told otherwise.
    import mlflow

    store = Store.of(config)
    with tracking.pointed_at(store.tracking_uri):
        source = mlflow.MlflowClient().get_model_version("digits-classifier", "1").source
        version = str(mlflow.register_model(source, "digits-classifier").version)
    v2 = f"models:/digits-classifier/{version}"
    kept = score(
        spark, _night_config(config, rescore_on_new_version=False), str(incoming), table=table,
        model=v2,
    )  # fmt: skip
    assert (kept.rows, kept.skipped_already_scored) == (1, 25)  # the corrupt file only
    rescored = score(spark, nightly, str(incoming), table=table, model=v2)
    assert (rescored.rows, rescored.errors, rescored.skipped_already_scored) == (26, 1, 0)
    assert rescored.model_version == version != night1.model_version
    assert len(_batches(spark, table)) == 5  # nothing a later night did removed a batch


def test_a_content_digest_ignores_a_touched_file_that_stat_rescores(spark, trained, tmp_path):
    config, digits = trained
    incoming, table = tmp_path / "incoming", str(tmp_path / "scores")
    files = _copy_digits(digits, incoming, 200, 4)
    by_digest = _night_config(config, identity="sha256")
    first = score(spark, by_digest, str(incoming), table=table)
    rows = read_table(spark, table).toPandas().set_index("path")
    for file in files:
        assert rows.loc[str(file), "file_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()

    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # the same content
    unchanged = score(spark, by_digest, str(incoming), table=table)
    assert (unchanged.rows, unchanged.skipped_already_scored) == (0, 4)
    assert set(_batches(spark, table)) == {first.batch_id}  # nothing new: no batch written
    assert unchanged.summary["rows"] == 0
    touched = score(spark, _night_config(config), str(incoming), table=table)
    assert (touched.rows, touched.skipped_already_scored) == (1, 3)
    assert _batches(spark, table)[touched.batch_id] == {str(files[0])}


def test_batches_written_before_the_new_columns_stay_readable(spark, trained, tmp_path):
    """An older batch lacks top-k and identity: read as null, and it never counts as scored."""
    config, digits = trained
    incoming, table = tmp_path / "incoming", str(tmp_path / "scores")
    files = _copy_digits(digits, incoming, 300, 3)
    old_columns = {**schema.SCORED_ROW, **schema.SCORING_PROVENANCE}  # the table until 2026-12
    old = [
        (str(f), "1", 0.9, [0.1] * 10, None, None, "digits-classifier", "1",
         "models:/digits-classifier/1", None, "2026-11-01")
        for f in files
    ]  # fmt: skip
    spark.createDataFrame(old, schema.ddl(old_columns)).write.partitionBy("batch_id").parquet(table)
    result = score(spark, _night_config(config), str(incoming), table=table)
    assert (result.rows, result.skipped_already_scored) == (3, 0)
    rows = read_table(spark, table).toPandas()
    assert list(rows.columns) == list(TABLE_COLUMNS)
    earlier = rows[rows.batch_id == "2026-11-01"]
    assert len(earlier) == 3 and earlier.top_labels.isna().all() and earlier.file_size.isna().all()
    assert rows[rows.batch_id == result.batch_id].top_labels.notna().all()


def test_the_batch_summary_is_the_tables_and_goes_to_mlflow_and_json(
    spark, trained, incoming, tmp_path, capsys
):
    import mlflow

    config, _ = trained
    store = Store.of(config)
    table = str(tmp_path / "scores")
    code = main(
        [
            "score", "--source", str(incoming), "--output", table, "--batch-id", "night-{date}",
            "--set", f"work_dir={store.work}", "--set", f"mlflow.tracking_uri={store.tracking_uri}",
            "--set", "score.low_confidence_below=0.9", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert re.fullmatch(r"night-\d{4}-\d{2}-\d{2}", result["batch_id"])
    assert result["skipped_already_scored"] == 0
    summary = result["summary"]

    rows = read_table(spark, table).toPandas()
    good = rows[rows.error.isna()]
    assert (summary["rows"], summary["errors"], summary["scored"]) == (43, 3, 40)
    assert summary["mean_probability"] == pytest.approx(good.probability.mean())
    assert summary["low_confidence_below"] == 0.9
    assert summary["low_confidence_share"] == pytest.approx((good.probability < 0.9).mean())
    predicted = good.predicted_label.value_counts().to_dict()
    assert {k: v for k, v in summary["predicted_classes"].items() if v} == predicted
    # Against the training split's classes, from the manifest the training run logged.
    manifest = json.loads((store.work.parent / "prepared" / "_manifest.json").read_text())
    train = manifest["split_classes"]["train"]
    assert summary["training_classes"] == train
    tvd = 0.5 * sum(abs(predicted.get(c, 0) / 40 - train[c] / sum(train.values())) for c in train)
    assert summary["class_tvd"] == pytest.approx(tvd)

    # The same numbers in a run of the scoring experiment, named after the batch.
    client = mlflow.MlflowClient(store.tracking_uri)
    run = client.get_run(result["summary_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "spark-dl-pipelines-scoring"
    assert run.info.run_name == result["batch_id"] and run.info.status == "FINISHED"
    assert run.data.tags["batch_id"] == result["batch_id"]
    assert run.data.tags["model_version"] == "1" and run.data.tags["table"] == table
    metrics = run.data.metrics
    assert (metrics["rows"], metrics["errors"], metrics["skipped_already_scored"]) == (43, 3, 0)
    assert metrics["class_tvd"] == pytest.approx(tvd)
    assert sum(v for k, v in metrics.items() if k.startswith("class_share/")) == pytest.approx(1)
    with tracking.pointed_at(store.tracking_uri):
        logged = json.loads(
            mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/batch_summary.json")
        )
    assert logged == summary


def test_missing_model_or_alias_is_a_one_line_error(spark, trained, incoming, tmp_path, capsys):
    config, _ = trained
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        score(
            spark,
            config,
            str(incoming),
            table=str(tmp_path / "t"),
            model="models:/no-such-model@champion",
        )
    code = main(
        [
            "score", "--source", str(incoming), "--output", str(tmp_path / "t"),
            "--set", f"mlflow.tracking_uri={Store.of(config).tracking_uri}",
            "--model", "models:/digits-classifier@nope",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert "alias nope" in err[-1] and "digits-classifier" in err[-1]


def test_a_folder_without_images_is_a_one_line_error(spark, trained, tmp_path, capsys):
    config, _ = trained
    folder = tmp_path / "no-images"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match=r"no image files in .*no-images \(1 other files"):
        score(spark, config, str(folder), table=str(tmp_path / "t"))
    code = main(
        [
            "score", "--source", str(folder), "--output", str(tmp_path / "t"),
            "--set", f"mlflow.tracking_uri={Store.of(config).tracking_uri}",
        ]
    )  # fmt: skip
    assert code != 0 and "no image files" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "t").exists()


def test_rest_server_answers_like_the_in_process_model(trained, incoming):
    import mlflow

    config, _ = trained
    port = free_port()
    command, env, uri = serve_command(config, None, "127.0.0.1", port)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server, lambda: server.stderr.read().decode())
        images = sorted(incoming.rglob("*.png"))[:5]
        served = post_images(base, [p.read_bytes() for p in images], timeout=60)
    finally:
        stop(server, 30)
    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    local = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [p.read_bytes() for p in images]})
    )
    assert [row["predicted_label"] for row in served] == list(local.predicted_label)
    assert [row["probability"] for row in served] == pytest.approx(
        list(local.probability), abs=1e-6
    )


def test_serve_binds_to_localhost_by_default():
    from pipelines.cli import _parser

    args = _parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 5000)


def test_an_autoencoders_reconstruction_error_reaches_the_scoring_table(
    spark, trained, incoming, tmp_path
):
    """The reconstruction task's own column is in the table; a classifier's batch has it null."""
    import mlflow

    config, _ = trained
    store = Store.of(config)
    prepared = store.work.parent / "prepared"
    autoencoder = load_config(
        overrides=[
            f"work_dir={store.work}",
            f"mlflow.tracking_uri={store.tracking_uri}",
            "mlflow.model_name=digits-autoencoder",
            "train.launcher=local",
            "train.model=autoencoder",
            "train.hidden_units=32",
            "train.latent_dim=8",
            "train.epochs=2",
            "train.early_stopping_patience=0",
        ]
    )
    trained_ae = train(autoencoder, LocalLauncher(), prepared)
    table = str(tmp_path / "scores")
    score(spark, config, str(incoming), table=table, batch_id="classifier")
    result = score(spark, autoencoder, str(incoming), table=table, batch_id="autoencoder")
    assert (result.rows, result.errors) == (43, 3)

    rows = read_table(spark, table).toPandas()
    assert list(rows.columns) == list(TABLE_COLUMNS)
    ae = rows[rows.batch_id == "autoencoder"].set_index("path")
    good = ae[ae.error.isna()]
    assert len(good) == 40 and good.reconstruction_error.notna().all()
    assert good.predicted_label.isna().all() and good.probability.isna().all()
    assert ae[ae.error.notna()].reconstruction_error.isna().all()
    # The same errors as the logged model computes in this process.
    model = mlflow.pyfunc.load_model(trained_ae.model_uri)
    files = sorted(incoming.rglob("img*.png"))[:5]
    local = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    expected = dict(zip((str(f) for f in files), local.reconstruction_error, strict=True))
    for path, value in expected.items():
        assert ae.loc[path, "reconstruction_error"] == pytest.approx(float(value), rel=1e-5)
    classifier = rows[rows.batch_id == "classifier"]
    assert classifier.reconstruction_error.isna().all()
    assert classifier.predicted_label.notna().sum() == 40
