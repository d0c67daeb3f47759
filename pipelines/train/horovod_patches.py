"""What the launcher changes in Horovod's launch on Spark, and why: idle waits, all measured.

Horovod 0.28.1 waits where nothing is left to wait for: a Spark task serves on for 3 s
after its rank ended, the driver polls a rank's exit code once a second, and every first
launch in a process starts an interpreter that imports TensorFlow only to ask whether
Horovod has Gloo. And a failed launch prints the traceback of a thread that died of
Horovod's own cancellation of its Spark job. Each patch here is a context manager around
one launch that puts Horovod's own code back afterwards, and leaves a Horovod without the
internals it expects as it is. :func:`launch_patches` applies those that suit the launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: Seconds a Horovod Spark task keeps serving after its rank's process ended. Horovod
#: (0.28.1, ``spark/task/task_service.py``) means its 3 s as the least time from a rank's
#: *start*, so that the driver can still connect and ask for the exit code, but starts
#: counting when the rank has *ended*: 3 s idle at the end of every launch. By then the
#: driver is already waiting on the exit code (it asks as soon as the rank starts, and a
#: rank takes over a second to start). 0.1 s instead of 0.5 s cut the end of a launch by
#: 0.6 s (measured); 0.2 s keeps a margin for slow networks. Static launches only:
#: elastic training, whose driver restarts lost ranks, was seen to hang after a rank was
#: killed with a short linger.
TASK_LINGER_S = 0.2

#: Seconds between the driver's checks that a rank's process has ended. Horovod's driver
#: asks each rank's task service for the exit code with a 1 s delay, and the service checks
#: the process only that often (it is not woken when the process ends): up to 1 s idle at
#: the end of every launch. 0.1 s is the least the service accepts.
EXIT_CODE_POLL_S = 0.1


@contextlib.contextmanager
def launch_patches(elastic: bool) -> Iterator[None]:
    """The patches for one launch: all for a static one, the Gloo check and quiet for elastic.

    Elastic Horovod restarts a lost rank's task through the same services, and was seen to
    hang after a rank was killed with the short linger: its waits are left as they are.
    """
    with contextlib.ExitStack() as stack:
        if not elastic:
            stack.enter_context(short_task_linger())
            stack.enter_context(prompt_exit_codes())
        stack.enter_context(gloo_known_from_files())
        stack.enter_context(quiet_job_cancellation())
        yield


@contextlib.contextmanager
def quiet_job_cancellation() -> Iterator[None]:
    """Launch without the traceback of Horovod's Spark thread when Horovod cancels its job.

    When a rank fails, Horovod cancels its own Spark job group and re-raises the rank's
    error on the driver (which becomes one line there); its thread collecting the Spark job
    then dies of that cancellation, and Python prints the thread's Py4J traceback to
    stderr. Only that exception, in that thread, is logged at debug level instead; any
    other goes to the hook as before.
    """
    import logging
    import threading

    hook = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else ""
        if "(run_spark)" in name and "cancelled job group horovod.spark.run" in str(args.exc_value):
            logging.getLogger(__name__).debug("Horovod's Spark job was cancelled: %s", name)
            return
        hook(args)

    threading.excepthook = excepthook
    try:
        yield
    finally:
        threading.excepthook = hook


@contextlib.contextmanager
def prompt_exit_codes() -> Iterator[None]:
    """Launch with the driver asking for each rank's exit code every :data:`EXIT_CODE_POLL_S`.

    The driver's wait (``horovod/spark/driver/rsh.py``) calls
    ``BasicTaskClient.wait_for_command_exit_code()`` with its default delay; the method
    is wrapped so that the default is the short one. It runs on the driver only: the
    delay travels in the request to the task service.
    """
    from horovod.runner.common.service import task_service

    client = getattr(task_service, "BasicTaskClient", None)
    wait = getattr(client, "wait_for_command_exit_code", None)
    if wait is None:
        yield
        return

    def wait_for_command_exit_code(self: Any, delay: float = EXIT_CODE_POLL_S) -> Any:
        return wait(self, delay)

    client.wait_for_command_exit_code = wait_for_command_exit_code
    try:
        yield
    finally:
        client.wait_for_command_exit_code = wait


@contextlib.contextmanager
def short_task_linger() -> Iterator[None]:
    """Launch with each Spark task lingering :data:`TASK_LINGER_S` after its rank ended.

    Horovod builds the Spark tasks' function with ``horovod.spark.runner._make_mapper`` on
    the driver; it is wrapped here so that each task first sets the linger in its own
    (executor) copy of the module. Another Horovod without these internals is left as is.
    """
    import horovod.spark.runner as runner

    make_mapper = getattr(runner, "_make_mapper", None)
    if make_mapper is None or not hasattr(runner, "MINIMUM_COMMAND_LIFETIME_S"):
        yield
        return

    def short_lingering_mapper(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        return lingering(make_mapper(*args, **kwargs), TASK_LINGER_S)

    runner._make_mapper = short_lingering_mapper
    try:
        yield
    finally:
        runner._make_mapper = make_mapper


@contextlib.contextmanager
def gloo_known_from_files() -> Iterator[None]:
    """Launch without Horovod's own Gloo check when Horovod's files already show Gloo.

    Before every first launch in a process Horovod asks ``gloo_built()``, which starts a
    fresh interpreter that imports TensorFlow only to answer it: 3 s of each ``dlpipe
    train`` (measured, cProfile). The answer is read from the extension's file instead
    (:func:`pipelines.preflight.gloo_in_horovod_files`), for the two modules that ask;
    without a clear yes, Horovod's own check runs and says what is wrong.
    """
    import horovod.runner.launch as launch
    import horovod.spark.runner as runner

    from pipelines.preflight import gloo_in_horovod_files

    modules = [m for m in (launch, runner) if hasattr(m, "gloo_built")]
    if gloo_in_horovod_files() is not True or not modules:
        yield
        return
    checks = {module: module.gloo_built for module in modules}

    def gloo_built(verbose: bool = False) -> bool:
        return True

    for module in modules:
        module.gloo_built = gloo_built
    try:
        yield
    finally:
        for module, check in checks.items():
            module.gloo_built = check


def lingering(mapper: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """``mapper`` run after setting the task's linger (a closure: pickled by value)."""

    def lingering(index: int, rows: Any) -> Any:
        import horovod.spark.runner as runner

        runner.MINIMUM_COMMAND_LIFETIME_S = seconds
        return mapper(index, rows)

    return lingering
