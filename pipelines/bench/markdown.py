"""Benchmark reports into a Markdown page: each benchmark's tables between its own markers.

In: a report ``{"machine": facts, "results": [measurement as dict, ...], "skipped": [...]}``
(what :func:`pipelines.bench.run_benchmarks` returns) and a page that holds, for each
benchmark it may receive, a block ``<!-- bench:NAME:begin -->`` ... ``<!-- bench:NAME:end
-->``. Out: the page with the blocks of the report's benchmarks rewritten (the run's machine
facts, one table row per measurement, for ``scale`` its points' time, memory and CPU and a
chart of the cost per image) and everything else left as it was, so that
``docs/performance.md`` shows the figures of a run and never a hand-copied one
(``make bench-docs``, ``dlpipe bench ... --markdown FILE``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipelines.bench.output import RESULT_HEADERS, machine_line, result_cells
from pipelines.bench.scale import scale_cells
from pipelines.errors import UserError

#: The markers around one benchmark's block; ``{name}`` is the benchmark's.
BEGIN = "<!-- bench:{name}:begin -->"
END = "<!-- bench:{name}:end -->"
#: A skip message names its row first: ``peer row skipped: ...``.
_SKIPPED_ROW = re.compile(r"^(\w+) row skipped: ")


def markdown_blocks(
    report: dict[str, Any], names: Sequence[str] | None = None, commit: str | None = None
) -> dict[str, str]:
    """Each benchmark of a report with the Markdown of its block.

    A block is the run's facts in one line, the table of the benchmark's measurements (the
    columns of :func:`pipelines.bench.format_table` less the benchmark's name), for
    ``scale`` the table of its points and a chart of the cost per image of each stage, and
    the benchmark's skipped rows.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.
        names: The benchmarks run, so that one skipped as a whole (the peer without its
            environment) gets its block too; None: those with measurements, and those a
            skipped row names.
        commit: The commit measured, named in the facts line when given.

    Returns:
        Benchmark name -> the block's text (without markers; no trailing newline).
    """
    skipped: dict[str, list[str]] = {}
    for message in report.get("skipped", []):
        row = _SKIPPED_ROW.match(message)
        skipped.setdefault(row.group(1) if row else "", []).append(message)
    if names is None:
        measured = [r["benchmark"] for r in report["results"]]
        names = list(dict.fromkeys([*measured, *(row for row in skipped if row)]))
    machine = report["machine"]
    at = f" at commit {commit}" if commit else ""
    facts = f"Run of {machine['timestamp']}{at}: {machine_line(machine)}."
    blocks = {}
    for name in names:
        results = [r for r in report["results"] if r["benchmark"] == name]
        parts = [facts]
        if results:
            rows = [result_cells(r)[1:] for r in results]
            parts.append(markdown_table(RESULT_HEADERS[1:], rows, right={1, 3, 4}))
        if name == "scale":
            headers, rows = scale_cells(report)
            if rows:
                parts.append(markdown_table(headers, rows, right=range(1, len(headers))))
            parts += [_cost_chart(stage, points) for stage, points in _stages(results).items()]
        # A skipped row that names no benchmark of the report is told in every block.
        unplaced = [m for row, ms in skipped.items() if row not in names for m in ms]
        parts += [f"Skipped: {message}" for message in [*skipped.get(name, []), *unplaced]]
        blocks[name] = "\n\n".join(parts)
    return blocks


def write_markdown(
    report: dict[str, Any],
    page: str | os.PathLike,
    names: Sequence[str] | None = None,
    commit: str | None = None,
) -> list[str]:
    """Rewrite the blocks of the report's benchmarks in a Markdown page; keep the rest.

    Args:
        report: What :func:`pipelines.bench.run_benchmarks` returned.
        page: The Markdown file, holding a block per benchmark of the report.
        names: The benchmarks run (see :func:`markdown_blocks`).
        commit: The commit measured (see :func:`markdown_blocks`).

    Returns:
        The names of the benchmarks whose blocks were written.

    Raises:
        UserError: See :func:`check_page` (nothing is written then).
    """
    blocks = markdown_blocks(report, names, commit)
    text = check_page(page, blocks)
    for name, block in blocks.items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = f"{head}{begin}\n{block}\n{end}{tail}"
    Path(page).expanduser().write_text(text, encoding="utf-8")
    return list(blocks)


def check_page(page: str | os.PathLike, names: Iterable[str]) -> str:
    """The page's text, once it is known to hold a block for each of ``names``.

    Called before benchmarks run too, so that a wrong page fails before the work.

    Raises:
        UserError: The page is missing, or lacks the markers of one of ``names``.
    """
    path = Path(page).expanduser()
    if not path.is_file():
        raise UserError(f"--markdown: no such page {path}")
    text = path.read_text(encoding="utf-8")
    for name in names:
        begin, end = BEGIN.format(name=name), END.format(name=name)
        if begin not in text or end not in text.partition(begin)[2]:
            raise UserError(
                f"--markdown: {path} has no block for bench {name}: add the lines "
                f"{begin} and {end} where its tables go"
            )
    return text


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """A Markdown (GFM) table; the columns in ``right`` right-aligned, ``|`` escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    rule = "|" + "|".join("--:" if i in right else "---" for i in range(len(headers))) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _cell(text: str) -> str:
    text = str(text).replace("|", "\\|")
    return "**no**" if text == "NO" else text


def _stages(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The scale points of each stage measured at two sizes or more, by stage."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if "stage" in r["details"]:
            stages.setdefault(r["details"]["stage"], []).append(r)
    return {stage: points for stage, points in stages.items() if len(points) > 1}


def _cost_chart(stage: str, points: list[dict[str, Any]]) -> str:
    """A Mermaid line chart of a stage's ms/image against its images per job."""
    points = sorted(points, key=lambda r: r["details"]["images"])
    sizes = ", ".join(f'"{r["details"]["images"]:,}"' for r in points)
    costs = ", ".join(f"{r['value']:.3g}" for r in points)
    top = float(f"{max(r['value'] for r in points) * 1.2:.2g}")
    return "\n".join(
        [
            "```mermaid",
            "xychart-beta",
            f'    title "{stage}: ms per image against images per job"',
            f'    x-axis "images per job" [{sizes}]',
            f'    y-axis "ms / image" 0 --> {top:g}',
            f"    line [{costs}]",
            "```",
        ]
    )
