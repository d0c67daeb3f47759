"""Facts and settings of the host a process runs on: its git checkout, TensorFlow's threads.

In: nothing but the process's environment. Out: the commit of this checkout (for MLflow
tags and benchmark records), and TensorFlow thread pools sized to a share of the cores.
"""

from __future__ import annotations

import os
import subprocess
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
    started in the process its pools can no longer change, and are kept.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass  # TensorFlow already initialised in this process (e.g. the local launcher).
