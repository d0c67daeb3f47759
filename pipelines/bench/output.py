"""Benchmark reports out: a fixed-width table and CSV rows appended to a history file.

In: a report ``{"machine": facts, "results": [measurement as dict, ...]}`` (what
:func:`pipelines.bench.run_benchmarks` returns). Out: :func:`format_table`'s text and
:func:`append_csv`'s rows, one per measurement, in :data:`CSV_COLUMNS` order.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pipelines.host import git_commit

#: Columns of the CSV history, in order.
CSV_COLUMNS = (
    "timestamp",
    "commit",
    "cores",
    "benchmark",
    "measured",
    "value",
    "unit",
    "baseline",
    "baseline_value",
    "ratio",
    "target",
    "met",
)


def append_csv(report: dict[str, Any], csv_path: str | os.PathLike) -> Path:
    """Append one row per measurement of ``report`` to a CSV, writing the header if new.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.
        csv_path: The CSV file; its directory is created when missing.

    Returns:
        The CSV path.
    """
    path = Path(csv_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    commit = git_commit(short=True) or ""
    machine = report["machine"]
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for result in report["results"]:
            writer.writerow(
                {
                    **result,
                    "timestamp": machine["timestamp"],
                    "commit": commit,
                    "cores": machine["cores"],
                    "value": f"{result['value']:.6g}",
                    "baseline_value": f"{result['baseline_value']:.6g}",
                    "ratio": f"{result['ratio']:.4g}",
                    "met": "" if result["met"] is None else str(result["met"]).lower(),
                }
            )
    return path


def format_table(report: dict[str, Any]) -> str:
    """Render a report as a fixed-width table, one row per measurement, machine facts above.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.

    Returns:
        The table as text (no trailing newline).
    """
    m = report["machine"]
    table = fixed_width(RESULT_HEADERS, [result_cells(r) for r in report["results"]], _NUMERIC)
    skipped = report.get("skipped", [])
    return "\n".join([f"machine: {machine_line(m)}, {m['timestamp']}", table, *skipped])


#: Columns of a report's table, and which of them are numbers (right-aligned).
RESULT_HEADERS = (
    "benchmark",
    "measured",
    "value",
    "baseline",
    "baseline value",
    "ratio",
    "target",
    "met",
)
_NUMERIC = frozenset({2, 4, 5})


def result_cells(result: dict[str, Any]) -> tuple[str, ...]:
    """One measurement's cells, in :data:`RESULT_HEADERS` order."""
    return (
        result["benchmark"],
        result["measured"],
        f"{_fmt(result['value'])} {result['unit']}",
        result["baseline"],
        f"{_fmt(result['baseline_value'])} {result['unit']}",
        f"{result['ratio']:.2f}x",
        result["target"] or "-",
        "-" if result["met"] is None else ("yes" if result["met"] else "NO"),
    )


def machine_line(machine: dict[str, Any]) -> str:
    """The machine facts of a report in one line (without the time)."""
    m = machine
    return (
        f"{m['cores']} cores, {m['memory_gib']} GiB, load {m['load_avg']}, "
        f"python {m['python']}, pyspark {m['pyspark']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, tensorflow {m['tensorflow']}, horovod {m['horovod']}, "
        f"{m['platform']}"
    )


def fixed_width(headers: tuple[str, ...], rows: list[tuple], right: Collection[int]) -> str:
    """Headers, a rule and rows in padded columns; the columns in ``right`` right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: tuple) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(headers))
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
