"""Measurement maths: a figure's median next to its baseline's, their ratio, the verdict.

In: run-by-run figures of a benchmark and of its baseline. Out: a :class:`Measurement`
(built by :func:`pair`), judged against a target such as ``>= 1.6`` by :func:`meets`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pipelines.errors import UserError


@dataclass(frozen=True)
class Measurement:
    """One measured figure next to its baseline from the same run.

    Attributes:
        benchmark: Benchmark name (``ingest``, ``feed``, ...).
        measured: What was measured, e.g. ``spark ingest``.
        value: Median of the measured runs, in ``unit``.
        unit: Unit of ``value`` and ``baseline_value``, e.g. ``images/s`` or ``s/epoch``.
        baseline: What ``value`` is compared with, e.g. ``plain PIL loop``.
        baseline_value: Median of the baseline runs, in ``unit``.
        ratio: ``value / baseline_value``. For a throughput above 1 means faster than the
            baseline; for a time (``s/...``) below 1 does.
        target: The ratio aimed for, e.g. ``>= 1.6`` or ``<= 1.1``; empty when the figure
            is informative only.
        met: Whether ``ratio`` meets ``target``; None without a target.
        details: Run-by-run figures and settings (JSON-ready).
    """

    benchmark: str
    measured: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    target: str
    met: bool | None
    details: dict[str, Any] = field(default_factory=dict)


def pair(
    benchmark: str,
    measured: str,
    values: Sequence[float],
    baseline: str,
    baseline_values: Sequence[float],
    *,
    unit: str,
    target: str = "",
    details: Mapping[str, Any] | None = None,
) -> Measurement:
    """A :class:`Measurement` from run-by-run figures: medians, their ratio, the verdict.

    Args:
        benchmark: Benchmark name.
        measured: What ``values`` measure.
        values: One figure per measured run, in ``unit``.
        baseline: What ``baseline_values`` measure.
        baseline_values: One figure per baseline run, in ``unit``.
        unit: Unit of both.
        target: ``>= x`` or ``<= x`` on the ratio, or empty.
        details: Extra JSON-ready facts; the run-by-run figures are added as ``runs``.

    Returns:
        The measurement.

    Raises:
        ValueError: No figures, a baseline median that is not positive, or a malformed
            target.
    """
    if not values or not baseline_values:
        raise ValueError(f"bench {benchmark}: no runs of {measured!r} or {baseline!r}")
    value = statistics.median(values)
    base = statistics.median(baseline_values)
    if base <= 0:
        raise ValueError(f"bench {benchmark}: baseline {baseline!r} measured {base} {unit}")
    ratio = value / base
    runs = {"measured": _rounded(values), "baseline": _rounded(baseline_values)}
    return Measurement(
        benchmark=benchmark,
        measured=measured,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_value=base,
        ratio=ratio,
        target=target,
        met=meets(ratio, target),
        details={**(details or {}), "runs": runs},
    )


def with_parallel_efficiency(
    against_one_process: Measurement,
    slots: int,
    *,
    baseline_wall_s: float | None = None,
    baseline_cpu_s: float | None = None,
) -> Measurement:
    """The measurement with its parallel efficiency: its ratio per task slot, in the details.

    Given the one-process baseline's wall and CPU seconds, also its ``parallel_ceiling``: the
    best ratio on ``slots`` cores for a stage doing no more CPU work than the baseline, and
    the measured ratio's ``share_of_ceiling``. A baseline that already keeps more than one
    core busy (TensorFlow's own threads in ``predict``) leaves less than ``slots`` to gain.

    Args:
        against_one_process: A stage against the same stage function in one process.
        slots: The task slots the stage ran on.
        baseline_wall_s: Median wall seconds of one baseline run.
        baseline_cpu_s: Median CPU seconds of one baseline run (all its threads).
    """
    ratio = against_one_process.ratio
    details = {**against_one_process.details, "parallel_efficiency": round(ratio / slots, 3)}
    if baseline_wall_s and baseline_cpu_s:
        ceiling = min(float(slots), slots * baseline_wall_s / baseline_cpu_s)
        details["parallel_ceiling"] = round(ceiling, 3)
        details["share_of_ceiling"] = round(ratio / ceiling, 3)
    return replace(against_one_process, details=details)


def meets(ratio: float, target: str) -> bool | None:
    """Whether ``ratio`` meets a target such as ``>= 1.6`` or ``<= 1.1``; None without one.

    Raises:
        ValueError: The target is neither empty nor ``>= x`` / ``<= x``.
    """
    if not target:
        return None
    op, _, number = target.partition(" ")
    if op not in (">=", "<=") or not number:
        raise ValueError(f"a target is '>= x' or '<= x', got {target!r}")
    bound = float(number)
    return ratio >= bound if op == ">=" else ratio <= bound


def _rounded(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


class Skipped(UserError):
    """A benchmark's row cannot be measured here; the message is the one-line reason.

    The caller reports the row as skipped (see :attr:`skip_message`) and goes on.
    """

    #: The row's name in the skip message.
    row = "benchmark"

    @property
    def skip_message(self) -> str:
        """``<row> row skipped: <reason>``."""
        return f"{self.row} row skipped: {self}"
