"""The README and docs/ agree with the code: commands, options, config keys, targets, links.

Every ``dlpipe COMMAND`` (and ``jobs/STAGE.py``) written in code in a page must be a
command, with options it has; every config key in code must exist, and every ``--set`` of a
command must load with the others of that command; every ``make TARGET`` must be a target
of the Makefile; every relative link must reach a file (and a heading, given an anchor).
"""

from __future__ import annotations

import argparse
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from pipelines.cli import _parser
from pipelines.config import Config, ConfigError, load_config
from pipelines.pipeline import _flatten_config

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "ARCHITECTURE.md", *(REPO / "docs").glob("*.md")])
README_LIMIT_BYTES = 12 * 1024

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`]+)`")
_COMMAND = re.compile(r"\bdlpipe ([a-z][a-z-]*)|\bjobs/([a-z]+)\.py")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: Where one command's options end: a shell pipe, list or comment (a table's ``\|`` is not).
_END = re.compile(r"(?<!\\)\|(?!\|)|&&|;|\s#|\s&(\s|$)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_SECTIONS = tuple(f.name for f in Config.__dataclass_fields__.values())
_KEY_SPAN = re.compile(rf"^({'|'.join(_SECTIONS)})((?:\.[a-z_][a-z0-9_]*)+)(?:[=:].*)?$")
_FILE_SUFFIXES = {"py", "yml", "yaml", "md", "json", "html", "csv", "png", "db", "whl", "zip"}


def _code(page: Path) -> list[str]:
    """The code of a page: fenced blocks by line (continuations joined), then inline spans."""
    text = page.read_text(encoding="utf-8")
    lines = []
    for block in _FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    # A span may wrap onto the next line of its paragraph.
    lines += [" ".join(span.split()) for span in _SPAN.findall(_FENCE.sub("", text))]
    return lines


@cache
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = (a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


@cache
def _keys() -> frozenset[str]:
    """Every dotted config key, and every section's dotted name."""
    leaves = _flatten_config(Config().to_dict())
    sections = {key.rsplit(".", depth)[0] for key in leaves for depth in range(1, 4)}
    return frozenset(leaves) | frozenset(sections)


def _known_key(key: str) -> bool:
    if key.startswith("spark.conf."):
        return True  # a Spark property, one key below spark.conf
    return key in _keys()


def _commands(line: str) -> list[tuple[str, str]]:
    """Each ``dlpipe COMMAND`` / ``jobs/STAGE.py`` in a line, with the text of its options."""
    found = []
    matches = list(_COMMAND.finditer(line))
    for match, following in zip(matches, [*matches[1:], None], strict=False):
        rest = line[match.end() : following.start() if following else len(line)]
        end = _END.search(rest)
        found.append((match.group(1) or match.group(2), rest[: end.start()] if end else rest))
    return found


def _sets(options: str) -> list[str] | None:
    """The ``--set KEY=VALUE`` of one command, or None when one is a placeholder."""
    try:
        tokens = shlex.split(options.replace("\\|", " "))
    except ValueError:
        return None
    sets = [value for flag, value in zip(tokens, tokens[1:], strict=False) if flag == "--set"]
    if any(re.search(r"\$|<|\.\.\.|KEY|VALUE|^section\.", s) for s in sets):
        return None
    return sets


def _problems(page: Path) -> list[str]:
    problems = []
    commands = _subcommands()
    for line in _code(page):
        for command, options in _commands(line):
            if command not in commands:
                problems.append(f"dlpipe {command}: no such command  ({line.strip()})")
                continue
            known = commands[command]._option_string_actions
            problems += [
                f"dlpipe {command}: no option {option}  ({line.strip()})"
                for option in _OPTION.findall(options)
                if option not in known
            ]
            sets = _sets(options)
            for key in (s.partition("=")[0] for s in sets or ()):
                if not _known_key(re.sub(r"\.[\"'].*", ".x", key)):
                    problems.append(f"--set {key}: no such config key  ({line.strip()})")
            if sets:
                try:
                    load_config(overrides=sets)
                except ConfigError as exc:
                    problems.append(f"{' '.join(sets)}: {exc}  ({line.strip()})")
        span = _KEY_SPAN.match(line.strip())
        if span and span.group(2).rsplit(".", 1)[-1] not in _FILE_SUFFIXES:
            key = span.group(1) + span.group(2)
            spark_property = span.group(1) == "spark" and key.split(".")[1] not in (
                "master",
                "app_name",
                "conf",
            )
            if not spark_property and not _known_key(key):
                problems.append(f"{key}: no such config key")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_option_and_key_of_a_page_exists(page: Path) -> None:
    assert _problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_of_a_page_exists(page: Path) -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = {t for line in _code(page) for t in re.findall(r"\bmake ([a-z][a-z-]*)", line)}
    assert named - targets == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_its_heading(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert broken == []


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.+)$", _FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_overlay_of_a_page_loads(page: Path, tmp_path: Path) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    for number, block in enumerate(blocks):
        overlay = tmp_path / f"overlay-{number}.yaml"
        overlay.write_text(block)
        load_config(overlay)


def test_the_readme_is_short_and_its_two_commands_are_make_run_and_make_test() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= README_LIMIT_BYTES, "README.md: move the detail into docs/"
    section = text.split("## The two commands", 1)[1]
    block = _FENCE.search(section).group(1)
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make run", "make test"]


def test_every_page_of_docs_is_in_its_index() -> None:
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    linked = set(_LINK.findall(index))
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    assert pages - linked == set()


def test_the_checks_see_what_is_wrong(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        ".venv/bin/dlpipe ingest --source x --no-such-flag \\\n  --set train.epoch=3\n"
        "dlpipe train --set train.mixed_precision=true | jq --raw\n"
        "spark-submit --conf spark.x=1 jobs/score.py --model m --nope\n"
        "```\n"
        "Use `dlpipe fly`, `train.no_such_key` and `ingest.py`; "
        "`spark.pyspark.python` is Spark's.\n"
    )
    problems = _problems(page)
    assert len(problems) == 7, problems
    assert problems[0].startswith("dlpipe ingest: no option --no-such-flag")
    assert problems[1].startswith("--set train.epoch: no such config key")
    assert problems[2].startswith("train.epoch=3: unknown config key train.epoch")
    assert problems[3].startswith("train.mixed_precision=true: train.mixed_precision=true needs")
    assert problems[4].startswith("dlpipe score: no option --nope")
    assert problems[5].startswith("dlpipe fly: no such command")
    assert problems[6] == "train.no_such_key: no such config key"  # not ingest.py, nor Spark's
