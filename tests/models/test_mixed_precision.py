"""Mixed precision: every zoo model under ``mixed_float16``, real TensorFlow on the CPU.

float16 is emulated on a CPU (slow), so the models are tiny and train one step; what is
checked is the dtype plumbing, which is the same on a GPU.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipelines.config import TrainConfig
from pipelines.devices import CPU, precision
from pipelines.keras_api import keras
from pipelines.models import MODEL_NAMES, as_float32, build_model

SHAPES = ((28, 28, 1), (14, 14, 3))  # the autoencoder is convolutional on one, dense on the other
NUM_CLASSES = 4


@pytest.fixture()
def mixed():
    """The mixed_float16 policy for one test, float32 again after it (and a fresh session)."""
    k = keras()
    k.mixed_precision.set_global_policy("mixed_float16")
    yield
    k.mixed_precision.set_global_policy("float32")
    k.backend.clear_session()


def _config(model: str) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(),
        model=model,
        hidden_units=16,
        latent_dim=4,
        use_gpu="auto",
        mixed_precision=True,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_computes_in_float16_with_a_float32_output(name, shape, mixed):
    k = keras()
    cfg = _config(name)
    model = build_model(cfg, shape, NUM_CLASSES)
    assert model.dtype_policy.name == "mixed_float16"
    assert model.output.dtype == "float32"
    hidden = [
        layer for layer in model.layers if isinstance(layer, k.layers.Dense | k.layers.Conv2D)
    ]
    assert hidden[0].compute_dtype == "float16" and hidden[0].kernel.dtype == "float32"
    # compile() put loss scaling around the optimizer, as it must for float16 gradients.
    assert isinstance(model.optimizer, k.mixed_precision.LossScaleOptimizer)

    rng = np.random.default_rng(0)
    images = rng.random((8, *shape), dtype=np.float32)
    target = images if name == "autoencoder" else rng.integers(0, NUM_CLASSES, 8)
    loss = model.train_on_batch(images, target, return_dict=True)["loss"]
    assert np.isfinite(loss)
    out = model.predict(images, verbose=0)
    assert out.dtype == np.float32
    if name != "autoencoder":
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)

    twin = as_float32(model, cfg, shape, NUM_CLASSES)
    assert twin.dtype_policy.name == "float32"
    assert all(layer.compute_dtype == "float32" for layer in twin.layers)
    for mine, theirs in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_allclose(twin.predict(images, verbose=0), out, atol=2e-2)
    # as_float32 restored the policy it found.
    assert k.mixed_precision.global_policy().name == "mixed_float16"


def test_as_float32_returns_a_float32_model_itself():
    cfg = dataclasses.replace(TrainConfig(), model="mlp", hidden_units=8)
    model = build_model(cfg, (8, 8, 1), NUM_CLASSES)
    assert as_float32(model, cfg, (8, 8, 1), NUM_CLASSES) is model
    keras().backend.clear_session()


def test_precision_sets_the_policy_for_the_block_and_restores_it():
    policies = keras().mixed_precision
    with precision(True, "GPU:0 (test)") as policy:
        assert policy == "mixed_float16" == policies.global_policy().name
    assert policies.global_policy().name == "float32"
    # auto on a host without a GPU: mixed precision is not worth emulating on the CPU.
    with precision(True, CPU) as policy:
        assert policy == "float32" == policies.global_policy().name
    with pytest.raises(RuntimeError), precision(True, "GPU:1"):
        raise RuntimeError("training failed")
    assert policies.global_policy().name == "float32"


HOROVOD_ORDER = textwrap.dedent(
    """
    import dataclasses, json, sys
    import numpy as np
    from pipelines.config import TrainConfig
    from pipelines.keras_api import keras
    from pipelines.models import build_model
    from pipelines.train.horovod_distribution import HorovodDistribution

    k = keras()
    k.mixed_precision.set_global_policy("mixed_float16")
    dist = HorovodDistribution()  # hvd.init(): a world of one, no launcher needed
    dist.size = 2  # pretend to be one of two ranks, so wrap/load take the Horovod paths
    cfg = dataclasses.replace(TrainConfig(), model="mlp", hidden_units=16,
                              use_gpu="auto", mixed_precision=True)
    model = build_model(cfg, (8, 8, 1), 3, optimizer_wrapper=dist.wrap_optimizer)
    images = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    labels = np.arange(16) % 3
    callbacks = dist.callbacks(initial_lr=0.001, warmup_epochs=1, steps_per_epoch=2)
    model.fit(images, labels, batch_size=8, epochs=1, callbacks=callbacks, verbose=0)
    path = sys.argv[1]
    model.save(path, save_format="h5")
    loaded = dist.load_model(path)
    out = {}
    for name, m in (("built", model), ("loaded", loaded)):
        opt = m.optimizer
        out[name] = {
            "outer": type(opt).__name__,
            "inner_allreduces": hasattr(opt.inner_optimizer, "_allreduce"),
            "iterations": int(opt.iterations.numpy()),
        }
    loaded.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    out["loaded"]["after_fit"] = int(loaded.optimizer.iterations.numpy())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_horovod_wraps_the_optimizer_inside_loss_scaling(tmp_path):
    # A subprocess: hvd.init() and the global policy must not leak into this one.
    done = subprocess.run(
        [sys.executable, "-c", HOROVOD_ORDER, str(tmp_path / "checkpoint.h5")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    import json

    result = json.loads(line.removeprefix("RESULT "))
    # LossScaleOptimizer(DistributedOptimizer(Adam)): Horovod averages the scaled
    # gradients, loss scaling unscales them and skips non-finite steps on every rank alike.
    assert result["built"] == {
        "outer": "LossScaleOptimizer",
        "inner_allreduces": True,
        "iterations": 2,
    }
    # --resume: the checkpoint reloads in the same order, with its optimizer state.
    assert result["loaded"]["outer"] == "LossScaleOptimizer"
    assert result["loaded"]["inner_allreduces"] is True
    assert result["loaded"]["iterations"] == 2 and result["loaded"]["after_fit"] == 4
