"""The driver's weight check: a divergence is one line naming the layers that differ."""

from __future__ import annotations

from pipelines.errors import UserError
from pipelines.train.driver import RanksDivergedError, _diverged
from pipelines.train.worker import RankResult


def _rank(rank: int, digests: dict[str, str]) -> RankResult:
    return RankResult(
        rank=rank,
        size=2,
        history={},
        epochs=1,
        initial_epoch=0,
        stopped_early=False,
        steps_per_epoch=1,
        world_sizes=[],
        learning_rate=0.1,
        weights_sha256="".join(digests.values()),
        seconds=1.0,
        fit_seconds=1.0,
        placement={},
        device="CPU",
        precision="float32",
        layer_digests=digests,
    )


def test_the_message_names_the_differing_layers_on_one_line():
    same = {"conv1": "a", "bn1": "b", "predictions": "c"}
    message = _diverged([_rank(1, {**same, "bn1": "x"}), _rank(0, same)])
    assert "\n" not in message
    assert "ranks [1]" in message
    assert "1 layer(s): bn1;" in message
    assert issubclass(RanksDivergedError, UserError)


def test_many_differing_layers_are_counted_past_the_first_ones():
    first = {f"bn{i}": "a" for i in range(12)}
    message = _diverged([_rank(0, first), _rank(1, dict.fromkeys(first, "b"))])
    assert "12 layer(s): bn0, bn1," in message
    assert "bn7 and 4 more;" in message
