"""Training end to end: real Horovod ranks on local[2] Spark, real Petastorm, real MLflow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.pipeline import log_run_report
from pipelines.store import DatasetDir, RunDir, Store
from pipelines.train.driver import train
from pipelines.train.horovod_launcher import HorovodSparkLauncher
from pipelines.train.launchers import LocalLauncher
from pipelines.train.worker import WorkerSpec, train_worker


def _spec(config: Config, dataset: Path, out: Path, launcher: str) -> WorkerSpec:
    manifest = DatasetDir(str(dataset)).read_manifest()
    return WorkerSpec(
        train=config.train,
        launcher=launcher,
        dataset=DatasetDir(str(dataset)),
        image_shape=tuple(manifest.image_shape),
        num_classes=len(manifest.label_names),
        rows=manifest.splits,
        run_dir=RunDir(str(out)),
    )


def test_two_horovod_ranks_end_with_identical_weights(
    spark, digits, tmp_path, monkeypatch, small_config
):
    config = small_config("train.epochs=2")
    ranks = HorovodSparkLauncher(spark, 2).run(
        train_worker, [_spec(config, digits, tmp_path / "out", "horovod")]
    )
    assert sorted(r.rank for r in ranks) == [0, 1]
    assert all(r.size == 2 for r in ranks)
    # The one guard against silently un-averaged gradients (e.g. Keras 3): same weights.
    assert ranks[0].weights_sha256 == ranks[1].weights_sha256
    # Metrics were averaged across ranks, so both saw the same epoch numbers.
    assert ranks[0].history["val_loss"] == pytest.approx(ranks[1].history["val_loss"])
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    assert (tmp_path / "out" / "model.h5").is_file()


def test_train_registers_a_model_that_reads_raw_png_bytes(
    spark, digits, tmp_path, monkeypatch, small_config
):
    import mlflow

    from pipelines.images import encode_png
    from pipelines.train.feed import read_split

    config = small_config("train.num_proc=2")
    # The run report step, as the orchestrator (dlpipe train, dlpipe run) passes it.
    result = train(config, HorovodSparkLauncher(spark, 2), digits, report=log_run_report)
    assert result.world_size == 2
    assert result.test_metrics["test_accuracy"] > 0.8
    assert result.promoted and result.model_version == "1"
    # Where the wall time went: every phase, fit the ranks' own figure, nothing counted twice.
    phases = result.phases
    assert list(phases) == ["prepare", "rank_start", "fit", "log_register", "evaluate", "report"]
    assert all(seconds >= 0 for seconds in phases.values()) and phases["fit"] > 0
    assert sum(phases.values()) == pytest.approx(result.seconds, abs=0.5)

    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.model"] == "mlp"
    assert run.data.params["world_size"] == "2"
    assert len(mlflow.MlflowClient().get_metric_history(result.run_id, "val_loss")) == 3

    test = read_split(DatasetDir(str(digits)).split("test"), (16, 16, 1))
    model = mlflow.pyfunc.load_model(f"models:/{config.mlflow.model_name}@champion")
    frame = pd.DataFrame({"image": [encode_png(img) for img in test.images]})
    predicted = model.predict(frame)
    names = DatasetDir(str(digits)).read_manifest().label_names
    accuracy = np.mean(predicted["predicted_label"] == [names[i] for i in test.labels])
    assert accuracy == pytest.approx(result.test_metrics["test_accuracy"], abs=1e-9)

    # The run report was logged beside the model, and its numbers are the model's own.
    client = mlflow.MlflowClient()
    logged = {f.path for f in client.list_artifacts(result.run_id, "report")}
    for name in ("learning_curves.png", "confusion_matrix.csv", "embeddings.png", "summary.json"):
        assert f"report/{name}" in logged
    summary = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/report/summary.json"))
    cm = np.array(summary["confusion_matrix"])
    assert cm.sum() == len(test.labels)
    assert np.trace(cm) == round(accuracy * len(test.labels))


def test_resume_continues_from_the_saved_epoch(digits, tmp_path, monkeypatch, small_config):
    first = train(
        small_config("train.epochs=2", "train.launcher=local"),
        LocalLauncher(),
        digits,
    )
    config = small_config("train.epochs=4", "train.launcher=local")
    state = json.loads(
        (Store.of(config).last_run_dir(config.mlflow.model_name).checkpoint_state).read_text()
    )
    assert state["epoch"] == 2
    resumed = train(config, LocalLauncher(), digits, resume=True)
    assert resumed.run_id == first.run_id  # the same MLflow run goes on
    assert resumed.epochs == 4
    state = json.loads(
        (Store.of(config).last_run_dir(config.mlflow.model_name).checkpoint_state).read_text()
    )
    assert state["epoch"] == 4 and len(state["history"]["loss"]) == 4


def test_champion_moves_only_on_improvement(digits, tmp_path, monkeypatch, small_config):
    good = train(small_config("train.launcher=local"), LocalLauncher(), digits)
    worse = train(
        small_config(
            "train.launcher=local",
            "train.epochs=1",
            "train.optimizer=sgd",
            "train.learning_rate=0.0001",
        ),
        LocalLauncher(),
        digits,
    )
    assert good.promoted and not worse.promoted
    assert worse.model_version == "2"
    assert "kept" in worse.decision


def test_the_champion_is_evaluated_on_the_new_runs_split_before_the_alias_moves(
    spark, digits, tmp_path, small_config
):
    """Both models are compared on the new dataset's test split, not on their own."""
    import mlflow
    from sklearn.metrics import f1_score

    from pipelines.config import IngestConfig, SplitConfig
    from pipelines.ingest import ingest
    from pipelines.keras_api import keras
    from pipelines.train.feed import read_split

    first = train(small_config("train.launcher=local"), LocalLauncher(), digits)
    # The same images split anew: another test split, as after a new ingest.
    other = tmp_path / "other"
    splits = SplitConfig(train=0.6, val=0.1, test=0.3)
    ingest(spark, IngestConfig(image_size=16, rows_per_row_group=64, splits=splits),
           digits.parent / "png", other)  # fmt: skip
    config = small_config("train.launcher=local", "registry.metric=macro_f1")
    second = train(config, LocalLauncher(), other)
    assert (first.model_version, second.model_version) == ("1", "2")
    assert second.promotion_metric == "test_macro_f1" and second.previous_champion == "1"
    assert "challenge" in second.phases

    # The champion's score, computed here from its registered files on the new test split.
    store = Store.of(config)
    mlflow.set_tracking_uri(store.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/digits-classifier/1"))
    champion = keras().models.load_model(folder / "artifacts" / "model.h5", compile=False)
    test = read_split(DatasetDir(str(other)).split("test"), (16, 16, 1))
    predicted = champion.predict(test.images.astype(np.float32) / 255.0, verbose=0).argmax(1)
    expected = f1_score(test.labels, predicted, average="macro")
    assert second.champion_score == pytest.approx(expected, abs=1e-9)
    new_score = second.test_metrics["test_macro_f1"]
    assert second.promoted == (new_score > expected)

    client = mlflow.MlflowClient()
    tags = client.get_model_version("digits-classifier", "2").tags
    assert float(tags["promotion_champion_score"]) == pytest.approx(expected, abs=1e-9)
    assert float(tags["promotion_score"]) == pytest.approx(new_score)
    assert tags["promotion_metric"] == "test_macro_f1" and tags["promotion_split"] == "test"
    params = client.get_run(second.run_id).data.params
    assert tags["promotion_split_sha256"] == params["dataset_manifest_sha256"]
    assert tags["promotion_dataset"] == str(other)
    assert tags["promotion_decision"] == second.decision
    logged = client.get_run(second.run_id).data.metrics["champion_test_macro_f1"]
    assert logged == pytest.approx(expected, abs=1e-9)

    # A champion for other images (16x16) cannot be evaluated on 12x12 ones: not comparable,
    # and by the default rule the new version takes the alias.
    small = tmp_path / "small"
    ingest(spark, IngestConfig(image_size=12, rows_per_row_group=64), digits.parent / "png", small)
    third = train(config, LocalLauncher(), small)
    holder = client.get_model_version_by_alias("digits-classifier", "champion").version
    assert third.promoted and str(holder) == third.model_version == "3"
    assert third.champion_score is None
    assert "is not comparable (input 16x16x1, this dataset 12x12x1)" in third.decision


def test_a_failing_run_is_marked_failed(digits, tmp_path, monkeypatch, small_config):
    import mlflow

    # lenet5 needs at least 12x12 input; an 8x8 view of the data cannot be built.
    config = small_config("train.launcher=local", "train.model=lenet5")
    bad = digits.parent / "tiny"
    if not bad.exists():
        manifest = DatasetDir(str(digits)).read_manifest()
        bad.mkdir()
        for child in digits.iterdir():
            (bad / child.name).symlink_to(child)
        (bad / "_manifest.json").unlink()
        DatasetDir(str(bad)).write_manifest(dataclasses.replace(manifest, image_shape=[8, 8, 1]))
    with pytest.raises(ValueError):
        train(config, LocalLauncher(), bad)
    mlflow.set_tracking_uri(Store.of(config).tracking_uri)
    runs = mlflow.search_runs(experiment_names=[config.mlflow.experiment])
    assert list(runs["status"]) == ["FAILED"]
    assert "lenet5" in runs["tags.error"][0]


def test_missing_dataset_is_a_one_line_user_error(tmp_path, monkeypatch, small_config):
    config = small_config("train.launcher=local")
    with pytest.raises(UserError, match="no prepared dataset at .*; run 'dlpipe ingest' first"):
        train(config, LocalLauncher(), tmp_path / "nothing")
