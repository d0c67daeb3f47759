"""Benchmark reports out: a fixed-width table and CSV rows appended to a history file.

In: a report ``{"machine": facts, "results": [measurement as dict, ...]}`` (what
:func:`pipelines.bench.run_benchmarks` returns). Out: :func:`format_table`'s text and
:func:`append_csv`'s rows, one per measurement, in :data:`CSV_COLUMNS` order.
"""

from __future__ import annotations

import csv
import os
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
    headers = ("benchmark", "measured", "value", "baseline", "baseline value", "ratio", "target")
    headers += ("met",)
    rows = [
        (
            r["benchmark"],
            r["measured"],
            f"{_fmt(r['value'])} {r['unit']}",
            r["baseline"],
            f"{_fmt(r['baseline_value'])} {r['unit']}",
            f"{r['ratio']:.2f}x",
            r["target"] or "-",
            "-" if r["met"] is None else ("yes" if r["met"] else "NO"),
        )
        for r in report["results"]
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    numeric = {2, 4, 5}

    def line(cells: tuple) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    m = report["machine"]
    facts = (
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB, load {m['load_avg']}, "
        f"python {m['python']}, pyspark {m['pyspark']}, pyarrow {m['pyarrow']}, "
        f"numpy {m['numpy']}, tensorflow {m['tensorflow']}, horovod {m['horovod']}, "
        f"{m['platform']}, {m['timestamp']}"
    )
    rule = "-" * len(line(headers))
    skipped = report.get("skipped", [])
    return "\n".join([facts, line(headers), rule, *(line(r) for r in rows), *skipped])


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
