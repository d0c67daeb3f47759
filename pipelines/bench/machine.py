"""Machine facts recorded beside the numbers: cores, memory, load, versions, platform, time.

Versions come from the installed distributions' metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from typing import Any


def machine_facts() -> dict[str, Any]:
    """Facts to record beside the numbers: cores, memory, load, versions, platform, time.

    Versions come from the installed distributions' metadata; nothing heavy (TensorFlow,
    Horovod) is imported. A package that is not installed has version None.

    Returns:
        A JSON-ready dict.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    memory = _memory_bytes()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "load_avg": load,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "pyspark": _version("pyspark"),
        "pyarrow": _version("pyarrow"),
        "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
        "petastorm": _version("petastorm"),
        "horovod": _version("horovod"),
        "mlflow": _version("mlflow"),
        "platform": platform.platform(),
        "timestamp": _now(),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")
