"""A benchmark report rendered into the blocks of a Markdown page (docs/performance.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pipelines.bench.markdown import check_page, markdown_blocks, markdown_table, write_markdown
from pipelines.bench.stats import meets
from pipelines.errors import UserError

REPO = Path(__file__).resolve().parents[2]
MACHINE = {
    "cores": 2,
    "usable_cores": 2,
    "memory_gib": 23.5,
    "load_avg": [0.1, 0.2, 0.3],
    "python": "3.11.9",
    "numpy": "1.26.4",
    "pillow": "11.0.0",
    "pyspark": "3.5.1",
    "pyarrow": "14.0.2",
    "tensorflow": "2.15.1",
    "petastorm": "0.13.1",
    "horovod": "0.28.1",
    "mlflow": "3.17.0",
    "platform": "Linux-6.1-x86_64",
    "timestamp": "2030-01-02T03:04:05+00:00",
}
FACTS = (
    "Run of 2030-01-02T03:04:05+00:00 at commit abc1234: 2 cores, 23.5 GiB, load "
    "[0.1, 0.2, 0.3], python 3.11.9, pyspark 3.5.1, pyarrow 14.0.2, numpy 1.26.4, "
    "tensorflow 2.15.1, horovod 0.28.1, Linux-6.1-x86_64."
)


def _result(benchmark: str, measured: str, value: float, baseline: str, base: float, **kw: Any):
    target = kw.get("target", "")
    ratio = value / base
    return {
        "benchmark": benchmark,
        "measured": measured,
        "value": value,
        "unit": kw.get("unit", "images/s"),
        "baseline": baseline,
        "baseline_value": base,
        "ratio": ratio,
        "target": target,
        "met": meets(ratio, target),
        "details": kw.get("details", {}),
    }


def _scale_point(stage: str, images: int, ms: float, ref_ms: float, target: str = "") -> dict:
    details = {
        "stage": stage,
        "images": images,
        "repeats": 2,
        "seconds": ms * images / 1000,
        "output_bytes": 3 * 2**20,
        "processes": {
            "driver": {"peak_rss_mib": 150.0, "cpu_seconds": 2.0},
            "python_worker": {"peak_rss_mib": 160.0, "cpu_seconds": 8.0},
        },
    }
    return _result(
        "scale", f"{stage} {images:,} images", ms, f"{stage} 30,000 images", ref_ms,
        unit="ms/image", target=target, details=details,
    )  # fmt: skip


REPORT = {
    "machine": MACHINE,
    "results": [
        _result("ingest", "spark ingest", 3882.0, "plain PIL loop", 995.0, target=">= 1.6"),
        _result("ingest", "spark ingest", 3882.0, "decode_image, 1 process", 2322.0),
        _result("score", "spark batch scoring", 5194.0, "pyfunc | arrays", 8245.0, target=">= 0.7"),
    ],
    "skipped": ["peer row skipped: no Horovod 0.28.1 wheel in the cache"],
}


def test_each_benchmark_gets_its_facts_and_a_table_row_per_measurement() -> None:
    blocks = markdown_blocks(REPORT, ["ingest", "score", "peer"], commit="abc1234")
    assert list(blocks) == ["ingest", "score", "peer"]
    assert blocks["ingest"] == "\n".join(
        [
            FACTS,
            "",
            "| measured | value | baseline | baseline value | ratio | target | met |",
            "|---|--:|---|--:|--:|---|---|",
            "| spark ingest | 3,882 images/s | plain PIL loop | 995 images/s | 3.90x | >= 1.6 "
            "| yes |",
            "| spark ingest | 3,882 images/s | decode_image, 1 process | 2,322 images/s | 1.67x "
            "| - | - |",
        ]
    )  # fmt: skip
    # A missed target stands out; a | inside a cell does not break the table.
    assert blocks["score"].endswith(
        "| spark batch scoring | 5,194 images/s | pyfunc \\| arrays | 8,245 images/s | 0.63x "
        "| >= 0.7 | **no** |"
    )
    # A benchmark skipped as a whole still gets its block, saying why.
    assert blocks["peer"] == f"{FACTS}\n\nSkipped: {REPORT['skipped'][0]}"


def test_without_names_the_blocks_are_those_measured_or_named_by_a_skipped_row() -> None:
    assert list(markdown_blocks(REPORT)) == ["ingest", "score", "peer"]
    assert "at commit" not in markdown_blocks(REPORT)["ingest"]


def test_scale_adds_its_points_and_a_cost_chart_per_stage() -> None:
    report = {
        "machine": MACHINE,
        "results": [
            _scale_point("ingest", 3_000, 0.205, 0.169),
            _scale_point("ingest", 30_000, 0.169, 0.169),
            _scale_point("ingest", 100_000, 0.174, 0.169, target="<= 1.1"),
            _result("scale", "list_tree 100,000 files", 2.5, "list_tree 3,000 files", 2.4,
                    unit="s/1e6 files"),
        ],
    }  # fmt: skip
    block = markdown_blocks(report)["scale"]
    tables = [part for part in block.split("\n\n") if part.startswith("| ")]
    assert len(tables) == 2
    assert len(tables[0].splitlines()) == 2 + 4  # header, rule, every measurement
    points = tables[1].splitlines()
    assert points[0].startswith("| point | seconds | ms/image | vs ref | target | met |")
    assert "driver MiB" in points[0] and "output MiB" in points[0]
    assert len(points) == 2 + 3  # the listing is no point
    assert points[4].startswith("| ingest 100,000 images | 17.40 | 0.174 | 1.03x | <= 1.1 | yes |")
    assert points[4].endswith("| 3 |")  # output MiB
    assert "```mermaid\nxychart-beta\n" in block
    assert '    x-axis "images per job" ["3,000", "30,000", "100,000"]' in block
    assert '    y-axis "ms / image" 0 --> 0.25\n    line [0.205, 0.169, 0.174]' in block


def test_write_replaces_only_the_blocks_of_the_report(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(
        "# Performance\n\nintro\n\n"
        "<!-- bench:ingest:begin -->\nold ingest\n<!-- bench:ingest:end -->\n\nbetween\n\n"
        "<!-- bench:feed:begin -->\nold feed\n<!-- bench:feed:end -->\n\n"
        "<!-- bench:score:begin -->\n<!-- bench:score:end -->\nend\n"
    )
    written = write_markdown(REPORT, page, ["ingest", "score"], commit="abc1234")
    assert written == ["ingest", "score"]
    text = page.read_text()
    blocks = markdown_blocks(REPORT, ["ingest", "score"], commit="abc1234")
    assert text == (
        "# Performance\n\nintro\n\n"
        f"<!-- bench:ingest:begin -->\n{blocks['ingest']}\n<!-- bench:ingest:end -->\n\nbetween\n\n"
        "<!-- bench:feed:begin -->\nold feed\n<!-- bench:feed:end -->\n\n"
        f"<!-- bench:score:begin -->\n{blocks['score']}\n<!-- bench:score:end -->\nend\n"
    )
    # Written again from the same report, the page is the same: blocks never pile up.
    write_markdown(REPORT, page, ["ingest", "score"], commit="abc1234")
    assert page.read_text() == text


def test_a_page_without_a_block_fails_before_anything_is_written(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("<!-- bench:ingest:begin -->\nkept\n<!-- bench:ingest:end -->\n")
    with pytest.raises(UserError, match=r"has no block for bench score: add the lines"):
        write_markdown(REPORT, page)
    assert "kept" in page.read_text()
    with pytest.raises(UserError, match="no such page"):
        check_page(tmp_path / "missing.md", ["ingest"])
    page.write_text("<!-- bench:ingest:end -->\n<!-- bench:ingest:begin -->\n")  # reversed
    with pytest.raises(UserError, match="no block for bench ingest"):
        check_page(page, ["ingest"])


def test_markdown_table_aligns_numbers_right() -> None:
    assert markdown_table(("a", "n"), [("x", "1")], right={1}) == "| a | n |\n|---|--:|\n| x | 1 |"


def test_the_performance_page_has_a_block_for_every_benchmark() -> None:
    from pipelines.bench import BENCHMARKS, ON_REQUEST

    page = REPO / "docs" / "performance.md"
    assert check_page(page, [*BENCHMARKS, *ON_REQUEST])
    names = re.findall(r"<!-- bench:([a-z]+):begin -->", page.read_text())
    assert sorted(names) == sorted([*BENCHMARKS, *ON_REQUEST])


def test_a_run_writes_its_blocks_and_a_wrong_page_fails_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.bench import run_benchmarks
    from pipelines.bench.stats import pair
    from pipelines.cli import main
    from pipelines.config import Config

    runs = []

    def bench_ingest(config: Config, **kwargs: Any) -> list:
        runs.append(kwargs)
        return [pair("ingest", "spark ingest", [4.0], "loop", [2.0], unit="images/s")]

    monkeypatch.setattr("pipelines.bench.BENCHMARKS", {"ingest": bench_ingest})
    page = tmp_path / "performance.md"
    page.write_text("<!-- bench:ingest:begin -->\nold\n<!-- bench:ingest:end -->\n")
    run_benchmarks(Config(work_dir=str(tmp_path / "work")), "all", markdown_path=page)
    assert len(runs) == 1
    text = page.read_text()
    assert "old" not in text and "| spark ingest | 4 images/s | loop | 2 images/s | 2.00x |" in text

    page.write_text("no blocks here\n")
    with pytest.raises(UserError, match="has no block for bench ingest"):
        run_benchmarks(Config(work_dir=str(tmp_path / "work")), "all", markdown_path=page)
    assert len(runs) == 1  # nothing was measured
    assert main(["bench", "ingest", "--markdown", str(tmp_path / "missing.md")]) == 1
    assert len(runs) == 1 and page.read_text() == "no blocks here\n"
