"""Per-layer training statistics: the callback's numbers, the report section, the driver.

Real Keras on a small MLP: every recorded number is checked against an independent
computation (numpy norms of the weights, a GradientTape on the same probe batch, the layer
outputs of :func:`pipelines.report.probe.layer_outputs`). The section's files are read
back (CSV, PNG, TensorBoard events); one training run through the real driver checks the
MLflow metrics, and its resume.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.report.layers import (
    HISTOGRAM_EVENTS,
    LayerRecords,
    gradient_warnings,
    plot_layer_stats,
    write_layer_section,
)
from pipelines.store import Store
from pipelines.train.layer_stats import STATS, histogram_rows, layer_stats_callback
from tests.unit.test_plot_text_fits import assert_text_fits

EPOCHS = 3


@dataclass(frozen=True)
class Fitted:
    """A fitted model, what the callback recorded, and what the test recorded itself."""

    model: object
    probe: tuple[np.ndarray, np.ndarray]
    stats: dict[str, list[float]]
    histograms: dict[str, list]
    layers: list[str]
    weights: list[dict[str, np.ndarray]]  # per epoch end, and at train begin first
    grads: list[dict[str, np.ndarray]]  # per epoch end
    activations: list[dict[str, np.ndarray]]  # per epoch end


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    import tensorflow as tf

    from pipelines.config import TrainConfig
    from pipelines.keras_api import keras
    from pipelines.models import build_model
    from pipelines.report.probe import layer_outputs

    k = keras()
    k.utils.set_random_seed(7)
    # Dropout and weight decay: inference mode and the regularisation loss both matter.
    cfg = TrainConfig(model="mlp", hidden_units=16, dropout=0.3, weight_decay=1e-3)
    model = build_model(cfg, (8, 8, 1), 4)
    rng = np.random.default_rng(0)
    x = rng.random((256, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 4, 256).astype(np.int32)
    probe = (x[:64], y[:64])
    layers = [layer for layer in model.layers if layer.trainable_weights]
    names = [layer.name for layer in layers]
    weights: list[dict[str, np.ndarray]] = []
    grads: list[dict[str, np.ndarray]] = []
    activations: list[dict[str, np.ndarray]] = []

    def snapshot() -> dict[str, np.ndarray]:
        return {layer.name: _flat(layer.get_weights()) for layer in layers}

    class Independent(k.callbacks.Callback):
        def on_train_begin(self, logs=None):
            weights.append(snapshot())

        def on_epoch_end(self, epoch, logs=None):
            weights.append(snapshot())
            variables = [v for layer in layers for v in layer.trainable_weights]
            with tf.GradientTape() as tape:
                predicted = model(probe[0], training=False)
                loss = tf.reduce_mean(
                    k.losses.sparse_categorical_crossentropy(probe[1], predicted)
                ) + tf.add_n(model.losses)
            values = tape.gradient(loss, variables)
            by_layer, i = {}, 0
            for layer in layers:
                n = len(layer.trainable_weights)
                by_layer[layer.name] = _flat([g.numpy() for g in values[i : i + n]])
                i += n
            grads.append(by_layer)
            outputs = layer_outputs(model, names, probe[0])
            activations.append(dict(zip(names, outputs, strict=True)))

    stats: dict[str, list[float]] = {}
    histograms: dict[str, list] = {}
    recorder = layer_stats_callback(k, probe, stats, histograms)
    model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, callbacks=[recorder, Independent()])
    return Fitted(model, probe, stats, histograms, names, weights, grads, activations)


def test_weight_norms_and_update_ratios_match_the_weights(fitted: Fitted) -> None:
    for layer in fitted.layers:
        norms = [np.linalg.norm(w[layer]) for w in fitted.weights]
        assert fitted.stats[f"{layer}/weight_norm"] == pytest.approx(norms[1:], rel=1e-5)
        ratios = [
            np.linalg.norm(after[layer] - before[layer]) / np.linalg.norm(before[layer])
            for before, after in zip(fitted.weights, fitted.weights[1:], strict=False)
        ]
        assert fitted.stats[f"{layer}/update_ratio"] == pytest.approx(ratios, rel=1e-4)
        assert all(r > 0 for r in ratios)  # the weights did move


def test_gradient_norms_match_an_independent_tape(fitted: Fitted) -> None:
    for layer in fitted.layers:
        expected = [np.linalg.norm(g[layer]) for g in fitted.grads]
        assert fitted.stats[f"{layer}/grad_norm"] == pytest.approx(expected, rel=1e-4)
        assert all(e > 0 for e in expected)


def test_activation_stats_match_the_layer_outputs(fitted: Fitted) -> None:
    for layer in fitted.layers:
        outputs = [a[layer] for a in fitted.activations]
        for stat, reduce in (("act_min", np.min), ("act_max", np.max), ("act_mean", np.mean)):
            expected = [float(reduce(o)) for o in outputs]
            assert fitted.stats[f"{layer}/{stat}"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_histograms_count_every_weight_and_gradient(fitted: Fitted) -> None:
    for layer in fitted.layers:
        for epoch in range(EPOCHS):
            for kind, values in (
                ("weights", fitted.weights[epoch + 1][layer]),
                ("gradients", fitted.grads[epoch][layer]),
            ):
                rows = np.asarray(fitted.histograms[f"{layer}/{kind}"][epoch])
                assert rows.shape == (30, 3)
                assert rows[:, 2].sum() == values.size
                assert rows[0, 0] == pytest.approx(values.min(), rel=1e-5)
                assert rows[-1, 1] == pytest.approx(values.max(), rel=1e-5)
                assert np.all(rows[1:, 0] == rows[:-1, 1])  # contiguous buckets
                assert rows[:, 2] == pytest.approx(_counts(values, rows), abs=2)


def _counts(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """numpy's own counts in the same buckets (values on an edge may fall either side)."""
    edges = np.append(rows[:, 0], rows[-1, 1])
    return np.histogram(values, bins=edges)[0]


def test_a_constant_tensor_has_tensorboards_single_value_layout() -> None:
    import tensorflow as tf

    from pipelines.train.layer_stats import _histogram

    norm, edges, counts = _histogram([tf.fill([5], 2.0), tf.fill([2, 2], 2.0)], 3)
    rows = histogram_rows(*edges.numpy(), counts.numpy())
    assert rows == [[2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [2.0, 2.0, 9.0]]
    assert float(norm) == pytest.approx(6.0)


def test_a_layer_is_flagged_only_when_its_gradient_crosses_a_threshold(fitted: Fitted) -> None:
    stats, layers = fitted.stats, fitted.layers
    norms = {layer: stats[f"{layer}/grad_norm"] for layer in layers}
    lowest = min(norms, key=lambda layer: min(norms[layer]))
    low, high = min(min(v) for v in norms.values()), max(max(v) for v in norms.values())
    assert gradient_warnings(stats, layers, low / 10, high * 10) == []

    # Just above the smallest norm: that layer, at that epoch, and no other.
    threshold = min(norms[lowest]) * 1.0001
    warnings = gradient_warnings(stats, layers, threshold, high * 10)
    expected = [layer for layer in layers if min(norms[layer]) < threshold]
    assert [w["layer"] for w in warnings] == expected and lowest in expected
    first = next(w for w in warnings if w["layer"] == lowest)
    assert first["kind"] == "vanishing" and first["stat"] == "grad_norm"
    assert first["epoch"] == int(np.argmin(norms[lowest])) + 1
    assert first["value"] == min(norms[lowest])
    assert lowest in first["message"] and "vanishing" in first["message"]

    # Every epoch of every layer above a tiny ceiling: one warning per layer.
    exploding = gradient_warnings(stats, layers, 0.0, low / 2)
    assert [(w["layer"], w["kind"], w["epoch"], w["epochs"]) for w in exploding] == [
        (layer, "exploding", 1, EPOCHS) for layer in layers
    ]
    nan = {f"{lowest}/grad_norm": [1.0, math.nan]}
    (broken,) = gradient_warnings(nan, [lowest], 1e-7, 1e3)
    assert broken["epoch"] == 2 and "not finite" in broken["message"]


def test_a_sigmoid_stack_vanishes_and_is_flagged(tmp_path: Path) -> None:
    """A deep sigmoid MLP, the classic case: its first layers' gradients are tiny."""
    from pipelines.keras_api import keras

    k = keras()
    k.utils.set_random_seed(1)
    inputs = k.Input((16,))
    h = inputs
    for i in range(12):
        h = k.layers.Dense(16, activation="sigmoid", name=f"sig{i}")(h)
    model = k.Model(inputs, k.layers.Dense(2, activation="softmax", name="out")(h))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    x, y = rng.random((64, 16), dtype=np.float32), rng.integers(0, 2, 64).astype(np.int32)
    stats: dict[str, list[float]] = {}
    histograms: dict[str, list] = {}
    model.fit(
        x, y, epochs=1, verbose=0, callbacks=[layer_stats_callback(k, (x, y), stats, histograms)]
    )
    first, last = stats["sig0/grad_norm"][0], stats["out/grad_norm"][0]
    assert first < last / 1e4  # ~0.25 per sigmoid layer
    threshold = math.sqrt(first * last)
    summary = write_layer_section(
        tmp_path, LayerRecords(stats, histograms, vanish_below=threshold, explode_above=1e3)
    )["layer_stats"]
    flagged = {w["layer"] for w in summary["warnings"]}
    assert "sig0" in flagged and "out" not in flagged
    assert all(w["kind"] == "vanishing" for w in summary["warnings"])


def test_the_section_writes_csv_png_and_readable_histogram_events(
    fitted: Fitted, tmp_path: Path
) -> None:
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = write_layer_section(
        tmp_path,
        LayerRecords(fitted.stats, fitted.histograms, vanish_below=1e-7, explode_above=1e3),
    )
    assert result["layer_stats"]["layers"] == fitted.layers
    assert result["layer_stats"]["warnings"] == []
    json.dumps(result)  # the summary is JSON as it is

    with (tmp_path / "layer_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == EPOCHS * len(fitted.layers)
    assert list(rows[0]) == ["epoch", "layer", *STATS]
    row = next(r for r in rows if r["epoch"] == "2" and r["layer"] == fitted.layers[0])
    assert float(row["grad_norm"]) == pytest.approx(
        fitted.stats[f"{fitted.layers[0]}/grad_norm"][1]
    )
    assert (tmp_path / "layer_stats.png").stat().st_size > 10_000

    events = EventAccumulator(str(tmp_path / HISTOGRAM_EVENTS), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert tags == {
        f"{layer}/{kind}" for layer in fitted.layers for kind in ("weights", "gradients")
    }
    sizes = {layer: fitted.weights[0][layer].size for layer in fitted.layers}
    for tag in tags:
        layer = tag.rpartition("/")[0]
        read = events.Tensors(tag)
        assert [e.step for e in read] == list(range(EPOCHS))
        meta = events.SummaryMetadata(tag)
        assert meta.plugin_data.plugin_name == "histograms"
        for event in read:
            tensor = tf.make_ndarray(event.tensor_proto)
            assert tensor.shape == (30, 3)
            assert tensor[:, 2].sum() == sizes[layer]
            assert tensor.tolist() == fitted.histograms[tag][event.step]


@pytest.mark.parametrize("layers", [1, 4, 25])
def test_the_figure_keeps_every_text_inside(layers: int) -> None:
    names = [f"a_rather_long_layer_name_{i}" if layers > 4 else f"dense_{i}" for i in range(layers)]
    rng = np.random.default_rng(layers)
    stats = {f"{name}/{stat}": list(rng.random(12) + 0.01) for name in names for stat in STATS}
    fig = plot_layer_stats(stats, names, 1e-7, 1e3)
    assert fig.get_figwidth() * fig.dpi == 900
    assert_text_fits(fig)


def test_the_driver_logs_layer_metrics_per_epoch_and_resume_keeps_them(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from pipelines.config import load_config
    from pipelines.train.driver import train
    from pipelines.train.launchers import LocalLauncher

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def config(epochs: int):
        return load_config(
            overrides=[
                f"work_dir={tmp_path / 'work'}",
                "train.model=mlp",
                "train.hidden_units=32",
                f"train.epochs={epochs}",
                "train.early_stopping_patience=0",
                "train.launcher=local",
            ]
        )

    seen = []
    first = train(config(2), LocalLauncher(), digits, report=lambda c, t: seen.append(t))
    (trained,) = seen
    layers = ("dense1", "embedding", "predictions")
    assert set(trained.layer_stats) == {f"{layer}/{stat}" for layer in layers for stat in STATS}
    assert all(len(v) == 2 for v in trained.layer_stats.values())
    assert set(trained.layer_histograms) == {
        f"{layer}/{kind}" for layer in layers for kind in ("weights", "gradients")
    }
    assert all(len(v) == 2 for v in trained.layer_histograms.values())

    resumed = train(config(3), LocalLauncher(), digits, resume=True)
    assert resumed.run_id == first.run_id
    state = json.loads(
        (Store.of(config(3)).last_run_dir(config(3).mlflow.model_name).checkpoint_state).read_text()
    )
    assert all(len(v) == 3 for v in state["layer_stats"].values())
    mlflow.set_tracking_uri(resumed.tracking_uri)
    client = mlflow.MlflowClient()
    names = {key for key in client.get_run(first.run_id).data.metrics if key.startswith("layer/")}
    assert names == {f"layer/{key}" for key in state["layer_stats"]}
    for name in names:
        history = client.get_metric_history(first.run_id, name)
        assert sorted(m.step for m in history) == [0, 1, 2]  # one per epoch, none twice
    key = next(iter(state["layer_stats"]))
    logged = sorted(client.get_metric_history(first.run_id, f"layer/{key}"), key=lambda m: m.step)
    assert [m.value for m in logged] == pytest.approx(state["layer_stats"][key])


def test_mixed_precision_gradients_are_unscaled() -> None:
    """Under mixed_float16 the loss is scaled (float16 underflow) and the norm unscaled."""
    import tensorflow as tf

    from pipelines.config import TrainConfig
    from pipelines.keras_api import keras
    from pipelines.models import build_model

    k = keras()
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        k.utils.set_random_seed(3)
        model = build_model(TrainConfig(model="mlp", hidden_units=16), (8, 8, 1), 4)
        assert isinstance(model.optimizer, k.mixed_precision.LossScaleOptimizer)
        rng = np.random.default_rng(0)
        x = rng.random((64, 8, 8, 1), dtype=np.float32)
        y = rng.integers(0, 4, 64).astype(np.int32)
        stats: dict[str, list[float]] = {}
        callback = layer_stats_callback(k, (x[:32], y[:32]), stats, {})
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
        layer = model.get_layer("dense1")
        with tf.GradientTape() as tape:
            predicted = model(x[:32], training=False)
            loss = tf.reduce_mean(k.losses.sparse_categorical_crossentropy(y[:32], predicted))
        grads = tape.gradient(loss, layer.trainable_weights)
        expected = np.linalg.norm(_flat([g.numpy() for g in grads]))
        assert stats["dense1/grad_norm"][0] == pytest.approx(expected, rel=1e-3)
    finally:
        k.mixed_precision.set_global_policy("float32")
