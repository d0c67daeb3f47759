"""Decisions made from data alone: promotion, and which rank died, without a cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines.registry import decide
from pipelines.store import RunDir
from pipelines.train.checkpoint import announce_rank
from pipelines.train.driver import _rank_died
from pipelines.train.horovod_launcher import _lost_rank
from pipelines.train.launchers import RankLostError


@pytest.mark.parametrize(
    ("value", "previous", "higher", "promoted", "reason"),
    [
        (0.99, 0.98, True, True, "promoted: test_accuracy 0.99 > champion v3 0.98"),
        (0.98, 0.98, True, False, "kept champion v3: test_accuracy 0.98 <= 0.98"),
        (0.97, 0.98, True, False, "kept champion v3: test_accuracy 0.97 <= 0.98"),
        (0.10, 0.20, False, True, "promoted: test_accuracy 0.1 < champion v3 0.2"),
        (0.20, 0.20, False, False, "kept champion v3: test_accuracy 0.2 >= 0.2"),
        (math.nan, 0.5, True, False, "kept champion v3: test_accuracy is NaN"),
        (0.5, None, True, True, "promoted: champion v3 has no test_accuracy"),
    ],
)
def test_the_alias_moves_only_on_a_strict_improvement(value, previous, higher, promoted, reason):
    decision = decide(
        value, previous, metric="test_accuracy", champion="champion v3", higher_is_better=higher
    )
    assert decision == (promoted, reason)


HOROVOD_FAILURE = """Horovod detected that one or more processes exited with non-zero status, \
thus causing the job to be terminated. The first process to do so was:
Process name: 1
Exit code: -9
"""


def test_horovods_failure_names_the_first_rank_to_exit_and_its_status() -> None:
    assert _lost_rank(HOROVOD_FAILURE) == (1, -9)
    assert _lost_rank(HOROVOD_FAILURE.replace("Exit code: -9", "Exit code: 137")) == (1, 137)
    assert _lost_rank("Gloo timed out waiting for a peer") is None


def test_the_rank_that_wrote_no_failure_is_the_one_that_died(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    announce_rank(run, 0)
    announce_rank(run, 1)
    # Rank 0 noticed its peer's closed socket and said so; rank 1 was killed silently.
    announce_rank(run, 0, failed="HorovodInternalError: peer closed")
    # Horovod names rank 0, the first to exit with an error: a survivor.
    error = _rank_died(RankLostError(0, 1, "..."), run)
    pid = json.loads(run.rank_file(1).read_text())["pid"]
    assert str(error).startswith(f"rank 1 (pid {pid} on host ")
    assert "died (killed or crashed) and ended the job" in str(error)
    assert "dlpipe train --resume" in str(error) and "train.elastic=true" in str(error)


def test_a_rank_named_by_horovod_that_recorded_nothing_died_with_its_status(
    tmp_path: Path,
) -> None:
    run = RunDir(str(tmp_path))
    announce_rank(run, 0)
    error = _rank_died(RankLostError(1, -9, "..."), run)
    assert str(error).startswith("rank 1 died (exit status -9)")  # it never announced itself


def test_a_lost_executor_gives_no_exit_code_and_names_the_silent_rank(tmp_path: Path) -> None:
    assert _lost_rank(HOROVOD_FAILURE.replace("Exit code: -9", "Exit code: None")) == (1, None)
    run = RunDir(str(tmp_path))
    survivor = {"rank": 0, "host": "h0", "pid": "10", "failed": "HorovodInternalError: peer"}
    run.rank_file(0).parent.mkdir(parents=True)
    run.rank_file(0).write_text(json.dumps(survivor))
    run.rank_file(1).write_text(json.dumps({"rank": 1, "host": "h1", "pid": "11"}))
    # Horovod blames rank 0, which only noticed the loss: the silent rank 1 died.
    error = _rank_died(RankLostError(0, None, "lost"), run)
    assert str(error) == (
        "rank 1 (pid 11 on host h1) died (killed or crashed) and ended the job: resume with "
        "`dlpipe train --resume` or set train.elastic=true to carry on without it"
    )
    error = _rank_died(RankLostError(1, None, "lost"), run)
    assert str(error).startswith("rank 1 (pid 11 on host h1) died (its executor was lost) ")
