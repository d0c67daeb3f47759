"""Errors a user can fix.

The CLI prints the message of a :class:`UserError` on one line and exits non-zero, without
a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, configuration or environment; the message names the thing and the fix."""


class NoGpuError(UserError):
    """``use_gpu: true`` on a host where TensorFlow finds no GPU (instead of a silent CPU run)."""


class StorageError(UserError):
    """Spark (or the driver) could not read or write a stage's location: which one, and the fix."""
