"""The first code a Horovod rank runs: find the shipped project, then call the real function.

Horovod on Spark starts each rank as a new Python process (``python -m
horovod.spark.task.gloo_exec_fn``) beside the Spark task, and hands it the training function
pickled. Spark puts ``--py-files`` on its own Python workers' path only, so on a cluster
whose executors do not have the project installed, unpickling ``train_worker`` would fail
with ``No module named 'pipelines'``. :func:`run_shipped` is therefore pickled *by value*
(this module is registered with cloudpickle for that, and imports nothing of the project):
it puts the shipped archives, which Spark downloads into the executor's working folder,
on the rank's path first, and only then unpickles and calls the real function.
"""

from __future__ import annotations

from typing import Any


def run_shipped(payload: bytes, includes: list[str]) -> Any:
    """Horovod: a rank's entry point; call the pickled ``(fn, args)`` in ``payload``.

    Args:
        payload: ``cloudpickle.dumps((fn, args))``.
        includes: File names of the ``.zip``/``.egg`` files shipped with the application
            (``--py-files``, ``addPyFile``), looked up in the executor's working folder.

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
    return fn(*args)
