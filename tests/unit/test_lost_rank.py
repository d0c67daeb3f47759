"""How a lost rank is named: from Horovod's error, and the ranks' own placement files."""

from __future__ import annotations

import json

from pipelines.train.driver import _rank_died
from pipelines.train.launcher import RankLostError, _lost_rank
from pipelines.train.worker import RANKS_DIR

HOROVOD = (
    "Horovod detected that one or more processes exited with non-zero status, thus causing "
    "the job to be terminated. The first process to do so was:\nProcess name: {rank}\n"
    "Exit code: {code}\n"
)


def test_horovod_names_the_rank_and_its_exit_code_or_none():
    assert _lost_rank(HOROVOD.format(rank=1, code=-9)) == (1, -9)
    assert _lost_rank(HOROVOD.format(rank=0, code=137)) == (0, 137)
    # The rank's task service went with its executor: Horovod got no exit code at all.
    assert _lost_rank(HOROVOD.format(rank=1, code="None")) == (1, None)
    assert _lost_rank("some other failure") is None


def test_a_rank_whose_executor_was_lost_is_named_with_its_pid_and_host(tmp_path):
    folder = tmp_path / RANKS_DIR
    folder.mkdir()
    survivor = {"rank": 0, "host": "h0", "pid": "10", "failed": "HorovodInternalError: peer"}
    (folder / "rank-0.json").write_text(json.dumps(survivor))
    (folder / "rank-1.json").write_text(json.dumps({"rank": 1, "host": "h1", "pid": "11"}))
    # Horovod blames rank 0, which only noticed the loss: the silent rank 1 died.
    error = _rank_died(RankLostError(0, None, "lost"), tmp_path)
    assert str(error) == (
        "rank 1 (pid 11 on host h1) died (killed or crashed) and ended the job: resume with "
        "`dlpipe train --resume` or set train.elastic=true to carry on without it"
    )
    error = _rank_died(RankLostError(1, None, "lost"), tmp_path)
    assert str(error).startswith("rank 1 (pid 11 on host h1) died (its executor was lost) ")
