"""``dlpipe``: one sub-command per pipeline stage, and ``run`` for all of them.

In: command-line arguments. Out: the stage's result printed for people on stdout, or with
``--json`` one JSON object and nothing else on stdout (everything for people, progress
included, on stderr, so ``dlpipe ... --json | jq`` works); exit code 0 on success, 1 on a
user error (a one-line message on stderr, no traceback), 2 on bad usage. The stages and
``run`` are :mod:`pipelines.pipeline`'s: this module parses, calls and prints (for
``jobs/*.py`` too).

Conventions every command shares: ``--config FILE|NAME`` (an overlay over
``conf/base.yaml``; ``--conf``, which spark-submit also has, still works with a
deprecation line), repeated ``--set section.key=value``, ``--json``, and ``--output`` for
where a command writes (``--out`` still works).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from pipelines import jvm_archive, pipeline
from pipelines.config import Config, load_config
from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.ingest import IngestResult
    from pipelines.pipeline import RunSummary
    from pipelines.score import ScoreResult
    from pipelines.train.driver import TrainResult

log = logging.getLogger("pipelines")

#: A result key whose text is printed for people instead of the generic key: value lines.
HUMAN = "_human"
#: A result key holding a :class:`UserError` the command ends with once the result is out
#: (``dlpipe doctor`` shows its table, or JSON, and then fails).
FAILS_WITH = "_fails_with"
#: MLflow's switch for its usage telemetry (``mlflow.telemetry``).
MLFLOW_TELEMETRY_OFF = "MLFLOW_DISABLE_TELEMETRY"
#: The exit code of a command that returned (none: it raised, and Python exits as usual).
_EXIT: dict[str, int] = {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dlpipe`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    return _execute(args, args.handler)


def job(command: str, stage: Callable[[argparse.Namespace, Config], Any]) -> int:
    """A ``jobs/*.py`` entry point: ``dlpipe COMMAND``'s arguments, ``stage`` run on them.

    The arguments come from ``sys.argv[1:]``, parsed by ``dlpipe COMMAND``'s own parser; the
    Spark master comes from spark-submit (``spark.master=null``) unless ``--set`` says
    otherwise. Prints what ``dlpipe COMMAND`` prints.

    Args:
        command: The stage's sub-command (``ingest``, ``train``, ``score``).
        stage: Runs the stage from the parsed arguments and the config; returns its result
            (a dataclass with ``to_dict``, or a dict).

    Returns:
        The exit code, as :func:`main`'s.
    """
    args = _parser().parse_args([command, "--set", "spark.master=null", *sys.argv[1:]])
    return _execute(args, stage)


def console() -> None:
    """The ``dlpipe`` console script: :func:`main`, its exit code raised as ``SystemExit``.

    Raised rather than returned because a caller that ignores return values (a Databricks
    ``python_wheel_task`` calls the entry point function) must still see the failure.

    Once the command has succeeded, the JVM writes the class archive of
    :mod:`pipelines.jvm_archive` if this was the first local session of its kind, and the
    process ends without Python's teardown of every imported module
    (:func:`_exit_without_teardown`).
    """
    on_databricks = "DATABRICKS_RUNTIME_VERSION" in os.environ
    if not on_databricks:  # there the entry point runs in a process that lives on
        jvm_archive.allow_writing()
        atexit.register(_exit_without_teardown, _EXIT)  # first registered: runs last
    code = main()
    pyspark = sys.modules.get("pyspark")
    if pyspark is not None and code == 0:  # a failure's one line stays the last one
        jvm_archive.save_if_written(pyspark.SparkContext._gateway)
    _EXIT["code"] = code
    if code:
        sys.exit(code)


def _exit_without_teardown(ending: dict[str, int]) -> None:
    """At exit, after every other exit handler: flush, and end the process with its code.

    Python's own exit joins the threads and runs the exit handlers (MLflow ends an open
    run, PySpark stops its JVM, temporary folders go) before this, which then skips only the
    interpreter's teardown of every module: 1.0-1.3 s with MLflow, pandas and PySpark
    loaded (measured, after a scoring job), for nothing that lasts.
    """
    if "code" not in ending:
        return
    logging.shutdown()  # registered before this handler, so it would run after it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(ending["code"])


def _execute(args: argparse.Namespace, handler: Callable[[argparse.Namespace, Config], Any]) -> int:
    """Load the config (``--set`` and the command's own overrides), run, print; exit code."""
    _setup_logging()
    if getattr(args, "deprecated_conf", False):
        print(
            f"dlpipe {args.command}: --conf is deprecated (spark-submit has a --conf of its "
            "own): use --config",
            file=sys.stderr,
        )
    with _stdout_for_json(args.json) as result_out:
        try:
            config = load_config(args.conf, [*(args.set or ()), *args.overrides(args)])
            if not config.mlflow.telemetry:  # before MLflow is imported; Spark passes it on
                os.environ.setdefault(MLFLOW_TELEMETRY_OFF, "true")
            result = handler(args, config)
            result = result if isinstance(result, dict) else result.to_dict()
            failure = result.pop(FAILS_WITH, None)
            _print_result(result, result_out)
            if failure is not None:
                raise failure
        except UserError as exc:
            print(f"dlpipe {args.command}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"dlpipe {args.command}: interrupted", file=sys.stderr)
            return 130
    return 0


@contextlib.contextmanager
def _stdout_for_json(as_json: bool) -> Iterator[TextIO | None]:
    """With ``--json``, stdout for the JSON alone: all else written there goes to stderr.

    While the command runs, whatever Python, Keras or a native library writes to stdout
    goes to stderr; the real stdout is yielded, for the JSON. Without ``--json`` it yields
    None: the result is printed for people on stdout.
    """
    if not as_json:
        yield None
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None  # not a file (a caller's capture): only Python's writes can be redirected
    if fd is None:
        result_out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield result_out
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    result_out = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield result_out
    finally:
        result_out.close()
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


# --- commands -------------------------------------------------------------------------------


def _demo_data(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    demo = pipeline.demo_data_stage(config, args.output)
    return {"path": str(demo.path), "images": demo.images, "classes": demo.classes}


def _ingest(args: argparse.Namespace, config: Config) -> IngestResult:
    return pipeline.ingest_stage(config, args.source, args.output)


def _train(args: argparse.Namespace, config: Config) -> TrainResult:
    return pipeline.train_stage(config, args.dataset, args.resume)


def _score(args: argparse.Namespace, config: Config) -> ScoreResult:
    return pipeline.score_stage(config, args.source, args.output, args.model, args.batch_id)


def _promote(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    done = pipeline.promote_stage(
        config,
        version=None if args.version is None else str(args.version),
        rollback=args.rollback,
        reason=args.reason,
    )
    previous = f"v{done.previous}" if done.previous else "none"
    human = [
        f"{done.model_name}@{done.alias}: {previous} -> v{done.champion}",
        f"previous: {previous}",
        f"champion: v{done.champion}",
        f"decision: {done.decision}",
    ]
    return {**done.to_dict(), HUMAN: "\n".join(human)}


def _run(args: argparse.Namespace, config: Config) -> RunSummary:
    return pipeline.run(config)


def _serve(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    return pipeline.serve_stage(config, args.model, args.host, args.port)


def _report(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    path = pipeline.report_stage(
        config, args.run_id, args.compare, args.output, log_to_run=not args.no_log
    )
    if args.compare:
        return {"report": str(path), "runs": list(dict.fromkeys(args.compare))}
    return {"report": str(path), "run_id": args.run_id}


def _explain(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.explain import summary

    result = pipeline.explain_stage(config, args.image, args.model, args.output)
    return {**result.to_dict(), HUMAN: summary(result)}


def _bench(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.bench import format_scale_table, format_table, run_benchmarks

    report = run_benchmarks(
        config,
        args.which,
        images=args.images,
        repeats=args.repeats,
        csv_path=args.csv,
        max_size=args.max,
        markdown_path=args.markdown,
        photos=args.photos,
    )
    # Scale points carry more than a ratio: their memory, CPU and output, in a second table.
    human = "\n\n".join(t for t in (format_table(report), format_scale_table(report)) if t)
    return {**report, HUMAN: human}


def _config(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines.config import resolve_config

    resolved = resolve_config(args.conf, args.set or ())
    shown = pipeline.shown_config(resolved)
    lines = [
        f"{key} = {json.dumps(entry['value'], default=str)}    # {entry['source']}"
        for key, entry in shown.items()
    ]
    return {"config": shown, HUMAN: "\n".join(lines)}


def _doctor(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from pipelines import preflight
    from pipelines.stack import launcher_for

    spark = None
    if args.executors:
        from pipelines.spark import get_spark

        spark = get_spark(config.spark)
    horovod = launcher_for(config.train.launcher) == "horovod"
    diagnosis = preflight.diagnose(spark, horovod=horovod)
    result = {**diagnosis.to_dict(), HUMAN: diagnosis.table()}
    if not diagnosis.ok:  # the table (or JSON) is printed, then the command fails
        result[FAILS_WITH] = preflight.PreflightError(diagnosis.problems)
    return result


def _no_overrides(args: argparse.Namespace) -> list[str]:
    return []


def _ingest_overrides(args: argparse.Namespace) -> list[str]:
    """``--format/--labels/--image-size/--channels`` as overrides after ``--set``."""
    return [
        f"ingest.{key}={value}"
        for key, value in (
            ("format", args.format),
            ("labels", args.labels),
            ("image_size", args.image_size),
            ("channels", args.channels),
        )
        if value is not None
    ]


def _score_overrides(args: argparse.Namespace) -> list[str]:
    """``--source-format`` as an override after ``--set``."""
    return [f"score.source_format={args.source_format}"] if args.source_format else []


# --- parser ---------------------------------------------------------------------------------

#: Adds one sub-command: ``(name, handler, help_text)`` -> its parser.
_Add = Callable[[str, Callable, str], argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlpipe",
        description="Distributed deep learning for images on Apache Spark.",
        epilog="Run 'dlpipe COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler, overrides=_no_overrides)
        return sub

    for add_command in (
        _add_demo_data,
        _add_ingest,
        _add_train,
        _add_score,
        _add_promote,
        _add_serve,
        _add_report,
        _add_explain,
        _add_bench,
        _add_doctor,
        _add_config,
        _add_run,
    ):
        add_command(add)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        dest="conf",
        metavar="FILE",
        help="overlay merged over conf/base.yaml: a YAML file, or a shipped target "
        "(cluster, databricks, photos, ...)",
    )
    # The old name: spark-submit has a --conf of its own on the same command line.
    common.add_argument("--conf", dest="conf", action=_DeprecatedConf, help=argparse.SUPPRESS)
    common.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="override one config key, e.g. --set train.epochs=3 (repeatable)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object, and nothing else, on stdout",
    )
    return common


class _DeprecatedConf(argparse.Action):
    """``--conf FILE``: the overlay, as ``--config``, remembered to print a deprecation line."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.deprecated_conf = True


def _output_option(parser: argparse.ArgumentParser, metavar: str, help_text: str) -> None:
    """``--output``, the one name of where a command writes (``--out`` still works)."""
    parser.add_argument("--output", metavar=metavar, help=help_text)
    parser.add_argument("--out", dest="output", help=argparse.SUPPRESS)


def _add_demo_data(add: _Add) -> None:
    demo = add(
        "demo-data",
        _demo_data,
        "write scikit-learn's handwritten digits (1,797 images) as PNG files DIR/<class>/*.png",
    )
    _output_option(demo, "DIR", "default: <work_dir>/demo-digits")


def _add_ingest(add: _Add) -> None:
    ingest = add(
        "ingest",
        _ingest,
        "decode, resize and split images on Spark into a Petastorm dataset "
        "(+ _quarantine/ of rejected files and _manifest.json)",
    )
    ingest.set_defaults(overrides=_ingest_overrides)
    ingest.add_argument(
        "--source",
        metavar="SRC",
        help="folder with one sub-folder per class, MNIST IDX files, or CIFAR-10 batches",
    )
    _output_option(ingest, "DST", "dataset directory (default: <work_dir>/datasets/prepared)")
    ingest.add_argument(
        "--format", choices=["auto", "folder", "mnist-idx", "cifar10"], help="default: auto"
    )
    ingest.add_argument(
        "--labels",
        metavar="FILE",
        help="CSV or Parquet of path,label rows labelling the images of SRC "
        "(default: one sub-folder per class)",
    )
    ingest.add_argument("--image-size", type=int, metavar="N", help="target N x N pixels")
    ingest.add_argument("--channels", type=int, choices=[1, 3], help="1 = grey, 3 = RGB")


def _add_train(add: _Add) -> None:
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


def _add_score(add: _Add) -> None:
    score = add(
        "score",
        _score,
        "score images into the scoring table with a registered model (default: the champion), "
        "on the Spark executors, as one batch; re-running a batch id replaces only that batch; "
        "score.only_new=true skips files earlier batches scored",
    )
    score.add_argument(
        "--source",
        metavar="SRC",
        help="folder of images, or a Parquet table with path + bytes "
        "(default: score.source, else the demo digits if written)",
    )
    _output_option(score, "TABLE", "scoring table (default: <work_dir>/tables/scores)")
    score.add_argument(
        "--model", metavar="URI", help="model URI (default: models:/<model_name>@champion)"
    )
    score.add_argument(
        "--batch-id",
        metavar="ID",
        help="batch (partition) to (re)write, or a template with {date} / {datetime} "
        "(default: the run's UTC date-time, e.g. 20261122T020000Z, which never replaces a batch)",
    )
    score.add_argument(
        "--source-format",
        choices=["auto", "table", "images"],
        help="read SRC as a Parquet table or a folder of images (default: score.source_format, "
        "auto: a table only if its first Parquet file is one with path + image column)",
    )
    score.set_defaults(overrides=_score_overrides)


def _add_promote(add: _Add) -> None:
    promote = add(
        "promote",
        _promote,
        "move the champion alias by hand: to a version (--version N) or back to the version "
        "that held it before (--rollback); the version is tagged with who, when and why",
    )
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, metavar="N", help="the version to promote")
    which.add_argument("--rollback", action="store_true", help="back to the previous champion")
    promote.add_argument("--reason", metavar="TEXT", help="why (tagged on the version)")


def _add_serve(add: _Add) -> None:
    serve = add(
        "serve",
        _serve,
        "serve a registered model over REST (MLflow's scoring protocol: /invocations, /ping) "
        "until SIGTERM or Ctrl-C; bodies over serve.max_body_mb get 413",
    )
    serve.add_argument("--model", metavar="URI", help="default: models:/<model_name>@champion")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5000, help="port (default: 5000)")


def _add_report(add: _Add) -> None:
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
    _output_option(report, "DIR", "directory for the HTML page (default: <work_dir>/reports)")
    report.add_argument(
        "--no-log", action="store_true", help="do not log the page to the run as an artifact"
    )


def _add_explain(add: _Add) -> None:
    explain = add(
        "explain",
        _explain,
        "explain one image's prediction as one offline HTML page: every class's probability, "
        "saliency and Grad-CAM of the predicted class, activation maps per layer",
    )
    explain.add_argument("image", metavar="IMAGE", help="image file, as scoring would read it")
    explain.add_argument(
        "--model",
        metavar="URI",
        help="model URI (default: score.model, else models:/<model_name>@champion)",
    )
    _output_option(explain, "DIR", "directory for the HTML page (default: <work_dir>/reports)")


def _add_bench(add: _Add) -> None:
    bench = add(
        "bench",
        _bench,
        "benchmarks, each against the baseline a user would otherwise use, in the same run",
    )
    bench.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=[
            "ingest",
            "feed",
            "reader",
            "train",
            "score",
            "overhead",
            "all",
            "scale",
            "peer",
            "storage",
        ],
        help=(
            "which benchmark (default: all, the first six; overhead: whole train and score "
            "processes, their seconds outside model work and why; scale: cost growth with "
            "size; peer: dlpipe train against Horovod's KerasEstimator, --repeats seeds; "
            "storage: bytes and 2-rank feed epoch of raw, png and jpeg cells at 224 px)"
        ),
    )
    bench.add_argument(
        "--images",
        type=int,
        metavar="N",
        help="generated images to use (scale: sizes N/10 and N instead of 3,000 and 30,000)",
    )
    bench.add_argument(
        "--max",
        action="store_true",
        help="scale only: add the 100,000-image point (with --images: N*10/3)",
    )
    bench.add_argument(
        "--photos",
        type=int,
        metavar="N",
        help="scale only: generated mixed-size photos of the 224-pixel photo point "
        "(default 600; 0: none; the issue's size: 20000)",
    )
    bench.add_argument("--repeats", type=int, default=3, metavar="R", help="median of R runs")
    bench.add_argument("--csv", metavar="FILE", help="append the results to this CSV file")
    bench.add_argument(
        "--markdown",
        metavar="FILE",
        help="write the tables of this run into FILE's blocks of the benchmarks run "
        "(<!-- bench:NAME:begin/end --> markers; make bench-docs: docs/performance.md)",
    )


def _add_doctor(add: _Add) -> None:
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


def _add_config(add: _Add) -> None:
    config = add(
        "config",
        _config,
        "print the resolved configuration, every key with its value and where it came from "
        "(base, overlay, --set), and the locations it resolves to (environment included)",
    )
    config.add_argument("action", choices=["show"], help="show: print the configuration")


def _add_run(add: _Add) -> None:
    add(
        "run",
        _run,
        "the main job on the configured target: "
        "demo data -> ingest -> train -> register -> score -> report",
    )


# --- output ---------------------------------------------------------------------------------


def _setup_logging() -> None:
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


def _print_result(result: dict[str, Any], json_out: TextIO | None) -> None:
    """The result for people on stdout, or as JSON on ``json_out`` (people's lines on stderr)."""
    human = result.pop(HUMAN, None)
    lines = [human] if human is not None else _human_lines(result)
    for line in lines:
        print(line, file=sys.stdout if json_out is None else sys.stderr)
    if json_out is not None:
        print(json.dumps(result, sort_keys=True, default=str), file=json_out, flush=True)


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
