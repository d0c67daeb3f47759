"""Facts and settings of the host a process runs on: its git checkout, TensorFlow's threads.

In: nothing but the process's environment. Out: the commit of this checkout (for MLflow
tags and benchmark records), TensorFlow thread pools sized to a share of the cores, and a
long-lived Spark Python worker spared its per-task bookkeeping.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import zipimport
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit(short: bool = False) -> str | None:
    """The commit checked out in this project's repository, or None outside a git checkout."""
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def cores_per_process(processes: int) -> int:
    """This host's cores divided among ``processes`` (at least one each)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def limit_tf_threads(intra_op: int, inter_op: int) -> None:
    """Size TensorFlow's thread pools in this process.

    Without it every TensorFlow process on a host sizes its pools to all the cores, and
    Horovod ranks or Spark Python workers oversubscribe the machine. Once TensorFlow has
    started in the process its pools can no longer change, and are kept. On the Keras
    stack (no TensorFlow) XLA's threads come from ``XLA_FLAGS``, set by the keras launcher
    for its ranks: nothing to do here.
    """
    from pipelines.keras_api import is_keras3

    if is_keras3():
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process (e.g. the local launcher).


def settle_python_worker() -> None:
    """Make a reused Spark Python worker's per-task bookkeeping cheap, once it holds a model.

    Between tasks PySpark runs a full ``gc.collect()`` and, at each task's start,
    ``importlib.invalidate_caches()``, which on Python 3.11 re-reads the directory of every
    zip archive on the worker's path (``pyspark.zip`` once per sub-package imported from it,
    and the 5,000-entry ``spark-core`` jar). In a worker that has loaded TensorFlow and a
    model, the two cost about 0.4 s of CPU per task, measured with py-spy: a quarter of a
    5,000-image scoring job. So: collect once, then freeze what is alive (the modules and
    the model live as long as the worker; later collections skip them), and drop the zip
    importers from the importer cache (a cache: Python rebuilds an entry, from its own
    cache of zip directories, if an import needs it again).
    """
    gc.collect()
    gc.freeze()
    for path, finder in list(sys.path_importer_cache.items()):
        if isinstance(finder, zipimport.zipimporter):
            del sys.path_importer_cache[path]
