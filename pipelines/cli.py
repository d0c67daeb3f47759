"""``dlpipe``: one sub-command per pipeline stage, and ``run`` for all of them.

In: command-line arguments. Out: the stage's result printed for people (and, with
``--json``, one JSON object as the last line), exit code 0 on success, 1 on a user error
(a one-line message on stderr, no traceback), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.config import Config, load_config
from pipelines.errors import UserError

log = logging.getLogger("pipelines")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dlpipe`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.json)
    try:
        config = load_config(args.conf, args.set or ())
        result = args.handler(args, config)
    except UserError as exc:
        print(f"dlpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dlpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    _print_result(result, args.json)
    return 0


# --- commands -------------------------------------------------------------------------------


def _demo_data(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.demo import write_demo_digits

    out = Path(args.out) if args.out else config.demo_data_path
    demo = write_demo_digits(out)
    return {"path": str(demo.path), "images": demo.images, "classes": demo.classes}


def _ingest(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    config = _with_ingest_options(config, args)
    source = args.source or config.ingest.source
    if not source:
        raise UserError("no source: pass --source DIR or set ingest.source")
    return _run_ingest(config, source, args.output or str(config.prepared_path))


def _run(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    started = time.time()
    summary: dict[str, Any] = {"work_dir": str(config.work_path)}
    source = config.ingest.source
    if not source:
        demo = _demo_data(argparse.Namespace(out=None), config)
        summary["demo_data"] = demo
        source = demo["path"]
    summary["ingest"] = _run_ingest(config, source, str(config.prepared_path))
    summary["seconds"] = round(time.time() - started, 1)
    return summary


def _run_ingest(config: Config, source: str, output: str) -> dict[str, Any]:
    from pipelines.ingest import ingest
    from pipelines.spark import get_spark

    spark = get_spark(config.spark)
    return ingest(spark, config.ingest, source, output).to_dict()


def _with_ingest_options(config: Config, args: argparse.Namespace) -> Config:
    """Fold ``--format/--image-size/--channels`` into the config (validated like --set)."""
    overrides = [
        f"ingest.{key}={value}"
        for key, value in (
            ("format", args.format),
            ("image_size", args.image_size),
            ("channels", args.channels),
        )
        if value is not None
    ]
    if not overrides:
        return config
    return load_config(args.conf, [*(args.set or ()), *overrides])


# --- parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--conf", metavar="FILE", help="overlay merged over conf/base.yaml, e.g. conf/cluster.yaml"
    )
    common.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="override one config key, e.g. --set train.epochs=3 (repeatable)",
    )
    common.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on the last line"
    )
    parser = argparse.ArgumentParser(
        prog="dlpipe",
        description="Distributed deep learning for images on Apache Spark.",
        epilog="Run 'dlpipe COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    demo = add(
        "demo-data",
        _demo_data,
        "write scikit-learn's handwritten digits (1,797 images) as PNG files DIR/<class>/*.png",
    )
    demo.add_argument("--out", metavar="DIR", help="default: <work_dir>/demo-digits")

    ingest = add(
        "ingest",
        _ingest,
        "decode, resize and split images on Spark into a Petastorm dataset "
        "(+ _quarantine/ of rejected files and _manifest.json)",
    )
    ingest.add_argument(
        "--source",
        metavar="SRC",
        help="folder with one sub-folder per class, MNIST IDX files, or CIFAR-10 batches",
    )
    ingest.add_argument(
        "--output", metavar="DST", help="dataset directory (default: <work_dir>/datasets/prepared)"
    )
    ingest.add_argument(
        "--format", choices=["auto", "folder", "mnist-idx", "cifar10"], help="default: auto"
    )
    ingest.add_argument("--image-size", type=int, metavar="N", help="target N x N pixels")
    ingest.add_argument("--channels", type=int, choices=[1, 3], help="1 = grey, 3 = RGB")

    add(
        "run",
        _run,
        "the main job on the configured target: demo data -> ingest (more stages as they land)",
    )
    return parser


# --- output ---------------------------------------------------------------------------------


def _setup_logging(quiet_stdout: bool) -> None:
    """Progress goes to stderr so that stdout stays the result (and JSON stays parseable)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s dlpipe: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # Petastorm prints pyarrow FutureWarnings on every read.
    warnings.filterwarnings("ignore", category=FutureWarning)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    for line in _human_lines(result):
        print(line)
    if as_json:
        print(json.dumps(result, sort_keys=True, default=str))


def _human_lines(result: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            lines.append(f"{indent}{key}:")
            lines.extend(_human_lines(value, indent + "  "))
        elif isinstance(value, dict):
            lines.append(f"{indent}{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            lines.append(f"{indent}{key}: {value}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
