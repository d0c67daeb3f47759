"""``dlpipe``: one sub-command per pipeline stage, and ``run`` for all of them.

In: command-line arguments. Out: the stage's result printed for people (and, with
``--json``, one JSON object as the last line), exit code 0 on success, 1 on a user error
(a one-line message on stderr, no traceback), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.config import Config, load_config
from pipelines.errors import UserError

log = logging.getLogger("pipelines")

#: A result key whose text is printed for people instead of the generic key: value lines.
HUMAN = "_human"


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


def console() -> None:
    """The ``dlpipe`` console script: :func:`main`, its exit code raised as ``SystemExit``.

    Raised rather than returned because a caller that ignores return values (a Databricks
    ``python_wheel_task`` calls the entry point function) must still see the failure.
    """
    code = main()
    if code:
        sys.exit(code)


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


def _train(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    return _run_train(config, args.dataset, args.resume)


def _score(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.score import score

    source = args.source or config.score.source
    if not source and config.demo_data_path.is_dir():
        source = str(config.demo_data_path)
    if not source:
        raise UserError("no source: pass --source DIR or set score.source")
    spark = _spark(config)
    return score(spark, config, source, args.output, args.model, args.batch_id).to_dict()


def _serve(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.serve import serve

    return serve(config, args.model, args.host, args.port)


def _report(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.report import render_comparison, render_run_report

    out = Path(args.out) if args.out else config.work_path / "reports"
    if args.compare:
        path = render_comparison(args.compare, tracking_uri=config.tracking_uri, out_dir=out)
        return {"report": str(path), "runs": list(dict.fromkeys(args.compare))}
    path = render_run_report(
        args.run_id, tracking_uri=config.tracking_uri, out_dir=out, log_to_run=not args.no_log
    )
    return {"report": str(path), "run_id": args.run_id}


def _bench(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.bench import format_table, run_benchmarks

    report = run_benchmarks(
        config, args.which, images=args.images, repeats=args.repeats, csv_path=args.csv
    )
    return {**report, HUMAN: format_table(report)}


def _run(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.report import render_run_report
    from pipelines.score import score

    _check_local_slots(config)  # a config that cannot train fails before ingest runs
    started = time.time()
    summary: dict[str, Any] = {"work_dir": str(config.work_path)}
    source = config.ingest.source
    if not source:
        demo = _demo_data(argparse.Namespace(out=None), config)
        summary["demo_data"] = {k: v for k, v in demo.items() if k != "classes"}
        source = demo["path"]
    ingested = _run_ingest(config, source, str(config.prepared_path))
    headline = ("output", "files_seen", "ingested", "quarantined", "skipped", "splits")
    summary["ingest"] = {key: ingested[key] for key in headline}
    trained = _run_train(config, None, resume=False)
    summary["train"] = trained
    scored = score(_spark(config), config, config.score.source or source)
    summary["score"] = scored.to_dict()
    page = render_run_report(
        trained["run_id"], tracking_uri=config.tracking_uri, out_dir=config.work_path / "reports"
    )
    summary["report"] = str(page)
    summary["seconds"] = round(time.time() - started, 1)
    summary["headline"] = {
        **{k: round(v, 4) for k, v in trained["test_metrics"].items() if k != "test_rows"},
        "rows_scored": scored.scored,
        "score_errors": scored.errors,
        "table": scored.table,
        "run_id": trained["run_id"],
        "model": f"{trained['model_name']} v{trained['model_version']}",
        "model_version": trained["model_version"],
        "champion": trained["promoted"],
        "report": str(page),
        "mlflow_ui": f"mlflow ui --backend-store-uri {config.tracking_uri}",
    }
    return summary


def _run_ingest(config: Config, source: str, output: str) -> dict[str, Any]:
    from pipelines.ingest import ingest

    spark = _spark(config)
    return ingest(spark, config.ingest, source, output).to_dict()


def _run_train(config: Config, dataset: str | None, resume: bool) -> dict[str, Any]:
    from pipelines.train.driver import train
    from pipelines.train.launcher import make_launcher

    _check_local_slots(config)
    spark = None
    if config.train.launcher == "horovod":
        spark = _spark(config)
        _wait_for_slots(spark, config)
    launcher = make_launcher(config.train.launcher, spark, config.train.num_proc, config.train.nics)
    return train(config, launcher, dataset, resume).to_dict()


def _check_local_slots(config: Config) -> None:
    """Fail before any Spark work when a local master cannot run ``train.num_proc`` ranks."""
    from pipelines.spark import local_slots

    slots = local_slots(config.spark.master)
    if config.train.launcher == "horovod" and slots is not None and config.train.num_proc > slots:
        raise UserError(
            f"train.num_proc={config.train.num_proc} needs {config.train.num_proc} Spark task "
            f"slots, but spark.master={config.spark.master} has {slots}; lower train.num_proc "
            f"or use local[{config.train.num_proc}]"
        )


def _wait_for_slots(spark: Any, config: Config) -> None:
    """Wait (bounded) until the executors offer a task slot per rank, else fail in one line."""
    from pipelines.spark import task_slots

    train = config.train
    # Elastic training may start with fewer ranks than num_proc, never below min_num_proc.
    key, wanted = (
        ("min_num_proc", train.min_num_proc) if train.elastic else ("num_proc", train.num_proc)
    )
    timeout = train.slots_timeout_s
    slots = task_slots(spark, train.num_proc, timeout)
    if slots < wanted:
        raise UserError(
            f"train.{key}={wanted} needs {wanted} concurrent Spark task slots, but the "
            f"executors offer {slots} after {timeout:g} s (train.slots_timeout_s); lower "
            f"train.{key}, or add executors or cores"
        )


def _spark(config: Config) -> Any:
    """The session, after the preflight: the driver's stack, then its executors' (once)."""
    from pipelines import preflight
    from pipelines.spark import get_spark

    horovod = config.train.launcher == "horovod"
    preflight.check_driver(horovod=horovod)  # before any Spark work
    spark = get_spark(config.spark)
    preflight.check_executors(spark, horovod=horovod)  # before the stage's first job
    return spark


def _doctor(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines import preflight

    spark = None
    if args.executors:
        from pipelines.spark import get_spark

        spark = get_spark(config.spark)
    diagnosis = preflight.diagnose(spark, horovod=config.train.launcher == "horovod")
    result = {**diagnosis.to_dict(), HUMAN: diagnosis.table()}
    if not diagnosis.ok:
        _print_result(result, args.json)  # the table (and JSON) also when it fails
        raise preflight.PreflightError(diagnosis.problems)
    return result


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

    train = add(
        "train",
        _train,
        "train a model with Horovod on Spark (train.num_proc ranks), fed by Petastorm; "
        "log it to MLflow, register a version and move the champion alias if it is better",
    )
    train.add_argument(
        "--dataset", metavar="DIR", help="prepared dataset (default: <work_dir>/datasets/prepared)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run from its last completed epoch",
    )

    score = add(
        "score",
        _score,
        "score images into the scoring table with a registered model (default: the champion), "
        "on the Spark executors; re-running a batch replaces only that batch",
    )
    score.add_argument(
        "--source",
        metavar="SRC",
        help="folder of images, or a Parquet table with path + bytes "
        "(default: score.source, else the demo digits if written)",
    )
    score.add_argument(
        "--output", metavar="TABLE", help="scoring table (default: <work_dir>/tables/scores)"
    )
    score.add_argument(
        "--model", metavar="URI", help="model URI (default: models:/<model_name>@champion)"
    )
    score.add_argument(
        "--batch-id", metavar="ID", help="partition to (re)write (default: the source folder name)"
    )

    serve = add(
        "serve",
        _serve,
        "serve a registered model over REST (MLflow's scoring protocol: /invocations, /ping) "
        "until SIGTERM or Ctrl-C; bodies over serve.max_body_mb get 413",
    )
    serve.add_argument("--model", metavar="URI", help="default: models:/<model_name>@champion")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5000, help="port (default: 5000)")

    report = add(
        "report",
        _report,
        "render a run's report (curves, confusion, filters, activations, embeddings) as one "
        "offline HTML page, or compare the curves and metrics of several runs",
    )
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", metavar="ID", help="MLflow run id of a training run")
    which.add_argument(
        "--compare", nargs="+", metavar="ID", help="two or more run ids to put side by side"
    )
    report.add_argument(
        "--out", metavar="DIR", help="directory for the HTML page (default: <work_dir>/reports)"
    )
    report.add_argument(
        "--no-log", action="store_true", help="do not log the page to the run as an artifact"
    )

    bench = add(
        "bench",
        _bench,
        "benchmarks, each against the baseline a user would otherwise use, in the same run",
    )
    bench.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=["ingest", "feed", "reader", "train", "score", "all"],
        help="which benchmark (default: all)",
    )
    bench.add_argument("--images", type=int, metavar="N", help="generated images to use")
    bench.add_argument("--repeats", type=int, default=3, metavar="R", help="median of R runs")
    bench.add_argument("--csv", metavar="FILE", help="append the results to this CSV file")

    doctor = add(
        "doctor",
        _doctor,
        "check the installed stack against the pinned one (TensorFlow, Keras 2, Horovod built "
        "with TensorFlow and Gloo, pyarrow, Petastorm, MLflow, ...); exit 1 if anything is off",
    )
    doctor.add_argument(
        "--executors",
        action="store_true",
        help="also check every executor Python worker of the configured Spark master",
    )

    add(
        "run",
        _run,
        "the main job on the configured target: "
        "demo data -> ingest -> train -> register -> score -> report",
    )
    return parser


# --- output ---------------------------------------------------------------------------------


def _setup_logging(quiet_stdout: bool) -> None:
    """Progress goes to stderr so that stdout stays the result (and JSON stays parseable)."""
    # TensorFlow's C++ start-up banners (oneDNN, CPU features) say nothing actionable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s dlpipe: %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # Petastorm prints pyarrow FutureWarnings on every read.
    warnings.filterwarnings("ignore", category=FutureWarning)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    human = result.pop(HUMAN, None)
    for line in [human] if human is not None else _human_lines(result):
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
    console()
