"""The first code a Horovod rank runs: find the shipped project, then call the real function.

Horovod on Spark starts each rank as a new Python process (``python -m
horovod.spark.task.gloo_exec_fn``) beside the Spark task, and hands it the training function
pickled. Spark puts ``--py-files`` on its own Python workers' path only, so on a cluster
whose executors do not have the project installed, unpickling ``train_worker`` would fail
with ``No module named 'pipelines'``. :func:`run_shipped` is therefore pickled *by value*
(this module is registered with cloudpickle for that, and imports nothing of the project):
it puts the shipped archives, which Spark downloads into the executor's working folder,
on the rank's path first, and only then unpickles and calls the real function.

With ``quick_exit`` a rank whose function returned ends without Python's teardown of
TensorFlow's modules: 0.5-0.9 s per rank process (measured), all of it between the
rank's result and the end of the launch (see :func:`_exit_now_if_clean`).
"""

from __future__ import annotations

from typing import Any


def run_shipped(payload: bytes, includes: list[str], quick_exit: bool = False) -> Any:
    """Horovod: a rank's entry point; call the pickled ``(fn, args)`` in ``payload``.

    Args:
        payload: ``cloudpickle.dumps((fn, args))``.
        includes: File names of the ``.zip``/``.egg`` files shipped with the application
            (``--py-files``, ``addPyFile``), looked up in the executor's working folder.
        quick_exit: Once ``fn`` has returned, end the process as soon as Horovod has sent
            its result (static launches; see :func:`_exit_now_if_clean`).

    Returns:
        What ``fn(*args)`` returns.
    """
    import os
    import sys

    import cloudpickle

    # Horovod: the task service records the Spark executor's folder, where shipped files land.
    folder = os.environ.get("HOROVOD_SPARK_WORK_DIR") or os.getcwd()
    for name in reversed(includes):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and path not in sys.path:
            sys.path.insert(0, path)
    fn, args = cloudpickle.loads(payload)
    result = fn(*args)
    if quick_exit:
        import atexit

        # Registered last, so run first once Horovod's task code has sent the result and
        # returned: before the handlers TensorFlow and Horovod registered at import.
        atexit.register(_exit_now_if_clean)
    return result


def _exit_now_if_clean() -> None:
    """At interpreter exit: shut Horovod down, flush, and ``os._exit(0)``, if all is well.

    Skips the interpreter's teardown of every module (TensorFlow's take 0.5-0.9 s). All
    is well when no exception reached the top (Python keeps it in ``sys.last_value``)
    and no child process is left (which a normal exit would wait for); otherwise the
    process exits as Python would. Horovod's own exit handler is what would have shut it
    down; it is called here instead, so the ranks still leave their collectives together.
    """
    import logging
    import multiprocessing
    import os
    import sys

    if getattr(sys, "last_value", None) is not None or multiprocessing.active_children():
        return
    horovod = sys.modules.get("horovod.tensorflow")
    if horovod is not None:
        horovod.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)
