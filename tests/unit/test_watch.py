"""The driver's progress line per epoch, from the checkpoint state rank 0 commits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.store import RunDir, write_atomic
from pipelines.train.watch import EpochProgress, epoch_metrics


def _commit(run: RunDir, epoch: int, history: dict[str, list[float]]) -> None:
    write_atomic(run.checkpoint_state, json.dumps({"epoch": epoch, "history": history}))


def test_one_line_per_committed_epoch_each_once(tmp_path: Path, caplog) -> None:
    run = RunDir(str(tmp_path))
    progress = EpochProgress(run, epochs=5)
    assert progress.poll() == []  # nothing committed yet
    _commit(run, 1, {"loss": [0.9], "val_loss": [1.0], "lr": [0.001]})
    with caplog.at_level(logging.INFO, logger="pipelines.train.watch"):
        (line,) = progress.poll()
    assert line.startswith("train: epoch 1/5: loss 0.9, val_loss 1 (")
    assert line.endswith(" s/epoch)") and "lr" not in line
    assert [r.message for r in caplog.records] == [line]
    assert progress.poll() == []  # unchanged: no line again
    # Two epochs committed between two looks: a line for each.
    _commit(run, 3, {"loss": [0.9, 0.5, 0.25], "val_loss": [1.0, 0.6, 0.3]})
    lines = progress.poll()
    assert [line.split(":")[1] for line in lines] == [" epoch 2/5", " epoch 3/5"]
    assert "loss 0.25, val_loss 0.3" in lines[1]
    # An elastic reset commits the same epoch again: no line twice.
    _commit(run, 3, {"loss": [0.9, 0.5, 0.24], "val_loss": [1.0, 0.6, 0.3]})
    assert progress.poll() == []


def test_a_resumed_run_shows_only_the_epochs_after_the_checkpoint(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    _commit(run, 2, {"loss": [0.9, 0.5]})
    with EpochProgress(run, epochs=4, poll_s=0.05) as progress:
        _commit(run, 3, {"loss": [0.9, 0.5, 0.4]})
    # The last look, at the block's end, catches what the thread had not seen.
    assert [line.split(":")[1] for line in progress.lines] == [" epoch 3/4"]


@pytest.mark.parametrize("stats", [{}, {"dense/weight_norm": [1.0]}])
def test_epoch_metrics_are_the_history_and_the_layer_statistics(stats) -> None:
    metrics = epoch_metrics({"loss": [0.5]}, stats)
    assert metrics == {"loss": [0.5], **{f"layer/{k}": v for k, v in stats.items()}}
