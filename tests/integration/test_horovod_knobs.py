"""Horovod's own knobs (``train.horovod``) reach every rank, and training still agrees."""

from __future__ import annotations

import math
import os

import pytest

from pipelines.config import HorovodConfig, load_config
from pipelines.train.horovod_launcher import HorovodSparkLauncher
from pipelines.train.worker import train_worker
from tests.integration.test_train import _spec


def test_settings_become_the_variables_horovod_reads_at_init() -> None:
    assert HorovodConfig().environment() == {}
    knobs = HorovodConfig(fusion_threshold_mb=0, cycle_time_ms=2.5, autotune=True)
    assert knobs.environment() == {
        "HOROVOD_FUSION_THRESHOLD": "0",
        "HOROVOD_CYCLE_TIME": "2.5",
        "HOROVOD_AUTOTUNE": "1",
    }
    assert HorovodConfig(fusion_threshold_mb=64).environment() == {
        "HOROVOD_FUSION_THRESHOLD": str(64 * 1024 * 1024)
    }


def test_the_keys_load_from_yaml_with_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(
        overrides=["train.horovod.compression=fp16", "train.horovod.backward_passes_per_step=2"]
    )
    assert config.train.horovod.compression == "fp16"
    assert config.train.horovod.backward_passes_per_step == 2
    with pytest.raises(ValueError, match="train.horovod.compression"):
        load_config(overrides=["train.horovod.compression=int8"])


def test_two_ranks_with_fp16_compression_and_two_passes_per_step_agree(
    spark, digits, tmp_path, monkeypatch, small_config
):
    monkeypatch.delenv("HOROVOD_FUSION_THRESHOLD", raising=False)
    config = small_config(
        "train.epochs=2",
        "train.horovod.compression=fp16",
        "train.horovod.backward_passes_per_step=2",
        "train.horovod.fusion_threshold_mb=1",
        "train.horovod.cycle_time_ms=2.0",
    )
    ranks = HorovodSparkLauncher(spark, 2).run(
        train_worker, [_spec(config, digits, tmp_path / "out", "horovod")]
    )
    assert sorted(r.rank for r in ranks) == [0, 1]
    # float16 gradients are still averaged: every rank holds the same weights.
    assert ranks[0].weights_sha256 == ranks[1].weights_sha256
    losses = ranks[0].history["loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # it still learns
    assert "HOROVOD_FUSION_THRESHOLD" not in os.environ  # set in the ranks, not the driver
