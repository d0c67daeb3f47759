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
    memory = _memory_bytes()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "load_avg": load_average(),
        "python": platform.python_version(),
        "numpy": installed_version("numpy"),
        "pillow": installed_version("pillow"),
        "pyspark": installed_version("pyspark"),
        "pyarrow": installed_version("pyarrow"),
        "tensorflow": installed_version("tensorflow-cpu") or installed_version("tensorflow"),
        "petastorm": installed_version("petastorm"),
        "horovod": installed_version("horovod"),
        "mlflow": installed_version("mlflow"),
        "platform": platform.platform(),
        "timestamp": _now(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, from its metadata; None if not installed."""
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
