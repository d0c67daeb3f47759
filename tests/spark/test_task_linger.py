"""Horovod launches without its idle waits: short task linger, prompt exit codes, no Gloo probe."""

from __future__ import annotations

import pytest

from pipelines.train.horovod_launcher import HorovodSparkLauncher
from pipelines.train.horovod_patches import TASK_LINGER_S, lingering


def _linger_on_the_executor(index, rows):
    import horovod.spark.runner as runner

    yield (index, runner.MINIMUM_COMMAND_LIFETIME_S)


def _rank_and_size():
    import horovod.tensorflow.keras as hvd

    hvd.init()
    return (hvd.rank(), hvd.size())


def test_each_task_sets_its_own_linger_and_the_driver_keeps_horovods(spark):
    import horovod.spark.runner as runner

    wrapped = lingering(_linger_on_the_executor, TASK_LINGER_S)
    seen = spark.sparkContext.range(0, 2, numSlices=2).mapPartitionsWithIndex(wrapped).collect()
    assert seen == [(0, TASK_LINGER_S), (1, TASK_LINGER_S)]
    assert runner.MINIMUM_COMMAND_LIFETIME_S == 3  # only the executors' copies changed


def test_ranks_that_end_at_once_still_report_with_the_short_linger(spark):
    # The race the linger guards: the driver must still get the exit code and results of
    # ranks that finish the moment they start.
    import horovod.spark.runner as runner

    make_mapper = runner._make_mapper
    for _ in range(2):
        results = HorovodSparkLauncher(spark, 2).run(_rank_and_size, [])
        assert sorted(results) == [(0, 2), (1, 2)]
    assert runner._make_mapper is make_mapper  # Horovod's own builder is back


def test_horovods_gloo_check_is_answered_from_its_files_during_a_launch():
    import horovod.runner.launch as launch
    import horovod.spark.runner as runner

    from pipelines.preflight import gloo_in_horovod_files
    from pipelines.train.horovod_patches import gloo_known_from_files

    assert gloo_in_horovod_files() is True  # the Horovod make venv builds has Gloo
    checks = (launch.gloo_built, runner.gloo_built)
    with gloo_known_from_files():
        assert launch.gloo_built() is True and runner.gloo_built(verbose=True) is True
        assert (launch.gloo_built, runner.gloo_built) != checks
    assert (launch.gloo_built, runner.gloo_built) == checks  # Horovod's own, back


def _register_exit_marker(path):
    import atexit
    import pathlib

    import horovod.tensorflow.keras as hvd

    hvd.init()  # so that the quick exit shuts Horovod down first, as training ranks need
    atexit.register(pathlib.Path(path).write_text, "teardown ran")
    return "done"


def _fail_after_exit_marker(path):
    _register_exit_marker(path)
    raise RuntimeError("rank failed on purpose")


def test_a_rank_ends_without_pythons_teardown_unless_it_failed(spark, tmp_path):
    # An exit handler a rank registered runs only in Python's normal teardown, which the
    # quick exit skips once the result is sent; a failing rank still exits as Python does.
    quick = tmp_path / "quick"
    assert HorovodSparkLauncher(spark, 2).run(_register_exit_marker, [str(quick)]) == [
        "done",
        "done",
    ]
    assert not quick.exists()
    failed = tmp_path / "failed"
    with pytest.raises(Exception, match="non-zero|exit"):
        HorovodSparkLauncher(spark, 2).run(_fail_after_exit_marker, [str(failed)])
    assert failed.read_text() == "teardown ran"


def test_the_driver_polls_exit_codes_promptly_during_a_static_launch_only():
    import inspect

    from horovod.runner.common.service.task_service import BasicTaskClient

    from pipelines.train.horovod_patches import EXIT_CODE_POLL_S, launch_patches

    def default_delay() -> float:
        return (
            inspect.signature(BasicTaskClient.wait_for_command_exit_code)
            .parameters["delay"]
            .default
        )

    horovods = default_delay()
    assert horovods == 1.0
    with launch_patches(elastic=False):
        assert default_delay() == EXIT_CODE_POLL_S < horovods
    assert default_delay() == horovods
    with launch_patches(elastic=True):
        assert default_delay() == horovods  # elastic launches keep Horovod's waits


def test_elastic_on_a_session_that_never_retries_a_task_is_refused_in_one_line(spark):
    from pipelines.errors import UserError

    # The session's local[2] tries each task once: a lost rank would fail the job.
    with pytest.raises(UserError, match=r"needs a master that retries tasks") as caught:
        HorovodSparkLauncher(spark, 2).run(_rank_and_size, (), elastic=True)
    assert "\n" not in str(caught.value) and "local[N,4]" in str(caught.value)
