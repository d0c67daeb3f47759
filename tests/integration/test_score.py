"""Batch scoring and REST serving against a real registered model, real Spark, real HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

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
    assert result.batch_id == "incoming-2026-11-22"
    assert result.model_version == "1"

    rows = read_table(spark, table).toPandas()
    assert list(rows.columns) == [c for c in TABLE_COLUMNS if c != "batch_id"] + ["batch_id"]
    assert len(rows) == 43 and rows.path.is_unique
    errors = rows[rows.error.notna()]
    assert sorted(Path(p).name for p in errors.path) == ["corrupt.png", "empty.jpg", "gone.png"]
    assert errors.predicted_label.isna().all() and errors.probabilities.isna().all()

    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    model = mlflow.pyfunc.load_model("models:/digits-classifier@champion")
    good = rows[rows.error.isna()].sort_values("path")
    expected = model.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in good.path]}))
    assert list(good.predicted_label) == list(expected.predicted_label)
    assert list(good.probability) == pytest.approx(list(expected.probability), abs=1e-6)
    assert (good.model_uri == "models:/digits-classifier/1").all()
    classes = json.loads(Path(result.classes_file).read_text())
    assert classes["label_names"] == [str(d) for d in range(10)]


def test_rerunning_a_batch_replaces_only_that_batch(spark, trained, incoming, tmp_path):
    config, _ = trained
    table = str(tmp_path / "scores")
    score(spark, config, str(incoming), table=table)
    score(spark, config, str(incoming), table=table, batch_id="other")
    # Spark escapes ':' in the partition folder's name: counted by Spark, not from the files.
    odd = score(spark, config, str(incoming), table=table, batch_id="2026-11-22T10:00")
    again = score(spark, config, str(incoming), table=table)
    frame = read_table(spark, table)
    counts = {r["batch_id"]: r["count"] for r in frame.groupBy("batch_id").count().collect()}
    assert counts == {"incoming-2026-11-22": 43, "other": 43, "2026-11-22T10:00": 43}
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
