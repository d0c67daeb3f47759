"""The orchestrator: each stage from a :class:`~pipelines.config.Config`, and ``run`` for all.

In: a resolved config and, per stage, the options of ``dlpipe <stage>``. Out: the stage's
typed result (:class:`~pipelines.demo.DemoData`, :class:`~pipelines.ingest.IngestResult`,
:class:`~pipelines.train.driver.TrainResult`, :class:`~pipelines.score.ScoreResult`), or for
:func:`run` a :class:`RunSummary`. Here, not in the stages, live the pre-flight checks and
the Spark session a stage needs, the Horovod slot checks, the run report step that
training calls inside its MLflow run, and the :class:`~pipelines.store.Store`: built once
per command from the config and passed to every stage it runs. ``cli.py`` and
``jobs/*.py`` call these functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import StorageError, UserError
from pipelines.spark import Access, session_of, storage_errors
from pipelines.stack import launcher_for
from pipelines.store import DatasetDir, Store

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pyspark.sql import SparkSession

    from pipelines.config import Config, ResolvedConfig, TrainConfig
    from pipelines.demo import DemoData
    from pipelines.explain import ExplainResult
    from pipelines.ingest import IngestResult
    from pipelines.promote import HandPromotion
    from pipelines.score import ScoreResult
    from pipelines.train.driver import Trained, TrainResult

log = logging.getLogger(__name__)

# The fixes a stage's StorageError names (pipelines.spark.storage_errors).
_WRITABLE = (
    "choose an {option} that this user can create and write, on a file system that the "
    "driver and every executor see alike"
)
_READABLE = "check that the driver and every executor can read it at that path"
_TABLE_OR_IMAGES = (
    "; a Parquet table must be whole (write it again), and a folder of images is scored "
    "as one with --source-format images"
)
_REINGEST = "ingest the images again (dlpipe ingest) to rewrite it"

#: The ingest counts a :class:`RunSummary` shows.
INGEST_HEADLINE = ("output", "files_seen", "ingested", "quarantined", "skipped", "splits")


@dataclass(frozen=True)
class RunSummary:
    """What ``dlpipe run`` did, stage by stage.

    Attributes:
        work_dir: The work directory.
        demo_data: The bundled digits, when written because ``ingest.source`` was unset.
        ingest: The ingest stage's result.
        train: The training stage's result.
        score: The scoring stage's result.
        report: The run's HTML report page.
        seconds: Wall time of the whole run.
        headline: The numbers a person looks at first.
    """

    work_dir: str
    demo_data: DemoData | None
    ingest: IngestResult
    train: TrainResult
    score: ScoreResult
    report: str
    seconds: float
    headline: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict (the ingest and demo data as headline counts)."""
        summary: dict[str, Any] = {"work_dir": self.work_dir}
        if self.demo_data is not None:
            summary["demo_data"] = {
                "path": str(self.demo_data.path),
                "images": self.demo_data.images,
            }
        ingested = self.ingest.to_dict()
        summary["ingest"] = {key: ingested[key] for key in INGEST_HEADLINE}
        summary.update(
            train=self.train.to_dict(),
            score=self.score.to_dict(),
            report=self.report,
            seconds=self.seconds,
            headline=self.headline,
        )
        return summary


# --- stages ---------------------------------------------------------------------------------


def demo_data_stage(config: Config, out: str | None = None, store: Store | None = None) -> DemoData:
    """Write the bundled digits to ``out`` (default: the store's demo data folder)."""
    from pipelines.demo import write_demo_digits

    store = store or Store.of(config)
    return write_demo_digits(Path(out) if out else store.demo_data)


def ingest_stage(
    config: Config,
    source: str | None = None,
    output: str | None = None,
    store: Store | None = None,
) -> IngestResult:
    """Ingest ``source`` (default: ``ingest.source``) into ``output`` (default: the prepared path).

    Raises:
        UserError: No source given or configured, or the ingest stage's own errors.
    """
    source = source or config.ingest.source
    if not source:
        raise UserError("no source: pass --source DIR or set ingest.source")
    dataset = (store or Store.of(config)).dataset(output)
    spark = start_session(config)  # starts while the stage's modules import
    with storage_errors(
        Access(
            "write the dataset", dataset.root, _WRITABLE.format(option="--output (ingest.output)")
        ),
        Access("read the source", source, _READABLE),
    ):
        from pipelines.ingest import ingest

        return ingest(session_of(spark), config.ingest, source, dataset.root)


def train_stage(
    config: Config,
    dataset: str | None = None,
    resume: bool = False,
    store: Store | None = None,
) -> TrainResult:
    """Train on ``dataset`` with the configured launcher, logging the run report into the run.

    Raises:
        UserError: Too few task slots for ``train.num_proc``, or the training stage's errors.
    """
    check_local_slots(config)
    store = store or Store.of(config)
    data = store.dataset(dataset)
    check_dataset_files(data)  # before Spark starts, and before a run is opened in MLflow
    cfg = config.train
    kind = launcher_for(cfg.launcher)
    starting = start_session(config) if kind != "local" else None
    # While Spark starts: the stage's modules, and MLflow's import and store (its tables
    # created or checked), which the run opened below needs first.
    from pipelines import tracking
    from pipelines.train.driver import train
    from pipelines.train.launchers import make_launcher

    tracking.open_store(store)
    spark = session_of(starting) if starting is not None else None
    launcher = make_launcher(
        kind, spark, cfg.num_proc, cfg.nics, cfg.slots_timeout_s, env=rank_environment(cfg)
    )
    launcher.wait_for_slots(cfg.elastic, cfg.min_num_proc)  # before a run is opened in MLflow
    with storage_errors(Access("read the dataset", data.root, _REINGEST)):
        return train(config, launcher, data, resume, report=log_run_report, store=store)


def rank_environment(cfg: TrainConfig) -> dict[str, str]:
    """What the keras launcher's ranks need in their environment before JAX starts.

    JAX fixes its platforms and XLA its CPU threads at start-up: ``use_gpu: false`` keeps
    the ranks on the CPU (``JAX_PLATFORMS=cpu``); otherwise JAX takes a GPU where it has one.
    ``threads_per_rank: 1`` keeps XLA's CPU computations on one thread (``XLA_FLAGS``);
    XLA has no finer knob, so other values leave it its default pool.
    """
    env = {"KERAS_BACKEND": "jax"}
    if cfg.use_gpu is False:
        env["JAX_PLATFORMS"] = "cpu"
    if cfg.threads_per_rank == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def check_dataset_files(dataset: DatasetDir) -> None:
    """Fail in one line, before any rank starts, if a file of the dataset is no readable Parquet.

    A rank that met such a file would die in Petastorm's reader, which the job could only
    report as a lost rank.

    Raises:
        StorageError: Which file (and how many), pyarrow's reason, and the fix.
    """
    started = time.monotonic()
    bad = dataset.unreadable_files()
    log.info("train: dataset files checked in %.2f s", time.monotonic() - started)
    if bad:
        name, reason = next(iter(bad.items()))
        count = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StorageError(
            f"cannot read the dataset {dataset.root}: {name}{count}: {reason}; {_REINGEST}"
        )


def log_run_report(config: Config, trained: Trained) -> None:
    """The run report step: log its artifacts under ``report/`` of the active training run."""
    from pipelines.report import log_training_report
    from pipelines.report.layers import LayerRecords

    report = log_training_report(
        trained.model,
        history=trained.history,
        evaluation=trained.evaluation,
        task=trained.task,
        tsne=config.train.tsne,
        layers=LayerRecords(
            trained.layer_stats,
            trained.layer_histograms,
            vanish_below=config.train.grad_vanish_below,
            explode_above=config.train.grad_explode_above,
        ),
    )
    for section, error in report["errors"].items():
        log.warning("train: report section %s was not written: %s", section, error)
    for warning in report.get("layer_stats", {}).get("warnings", []):
        log.warning("train: %s", warning["message"])


def score_stage(
    config: Config,
    source: str | None = None,
    output: str | None = None,
    model: str | None = None,
    batch_id: str | None = None,
    store: Store | None = None,
) -> ScoreResult:
    """Score ``source`` (default: ``score.source``, else the demo digits if written).

    Raises:
        UserError: No source given, configured or written, or the scoring stage's errors.
    """
    store = store or Store.of(config)
    source = source or config.score.source
    if not source and store.demo_data.is_dir():
        source = str(store.demo_data)
    if not source:
        raise UserError("no source: pass --source DIR or set score.source")
    spark = start_session(config)  # starts while the stage imports MLflow and finds the model
    from pipelines.score import score

    with storage_errors(
        Access("read the source", source, _READABLE + _TABLE_OR_IMAGES),
        Access(
            "write the scoring table",
            store.scoring_table(output).location,
            _WRITABLE.format(option="--output (score.table)"),
        ),
    ):
        return score(spark, config, source, output, model, batch_id, store=store)


def promote_stage(
    config: Config,
    version: str | None = None,
    rollback: bool = False,
    reason: str | None = None,
    store: Store | None = None,
) -> HandPromotion:
    """Move ``mlflow.champion_alias`` of ``mlflow.model_name`` by hand (or roll it back).

    Raises:
        UserError: No such model or version, or nothing to roll back to.
    """
    from pipelines.promote import promote

    store = store or Store.of(config)
    return promote(
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
        version=version,
        rollback=rollback,
        reason=reason,
    )


def report_stage(
    config: Config,
    run_id: str | None = None,
    compare: list[str] | None = None,
    out: str | None = None,
    log_to_run: bool = True,
    store: Store | None = None,
) -> Path:
    """Render one run's HTML report (or several runs side by side) into ``out`` or the store's."""
    from pipelines.report import render_comparison, render_run_report

    store = store or Store.of(config)
    out_dir = Path(out) if out else store.reports
    if compare:
        return render_comparison(compare, tracking_uri=store.tracking_uri, out_dir=out_dir)
    if run_id is None:
        raise UserError("report: give a run id or runs to compare")
    return render_run_report(
        run_id, tracking_uri=store.tracking_uri, out_dir=out_dir, log_to_run=log_to_run
    )


def explain_stage(
    config: Config,
    image: str,
    model: str | None = None,
    out: str | None = None,
    store: Store | None = None,
) -> ExplainResult:
    """Explain one image's prediction as a page in ``out`` (default: the store's reports)."""
    from pipelines.explain import explain_image

    store = store or Store.of(config)
    return explain_image(
        image,
        model
        or config.score.model
        or f"models:/{config.mlflow.model_name}@{config.mlflow.champion_alias}",
        out_dir=Path(out) if out else store.reports,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )


def serve_stage(config: Config, model: str | None, host: str, port: int) -> dict[str, Any]:
    """Serve the model (default: ``score.model``, else the champion) until stopped."""
    from pipelines.rest_server import serve

    return serve(config, Store.of(config), model, host, port)


def run(config: Config) -> RunSummary:
    """Demo data (when no ``ingest.source``) -> ingest -> train -> score -> report page.

    Raises:
        UserError: A stage's error; too few task slots fails before ingest runs.
    """
    from pipelines.tracking import shown_uri

    check_local_slots(config)  # a config that cannot train fails before ingest runs
    started = time.time()
    store = Store.of(config)
    demo = None
    source = config.ingest.source
    if not source:
        demo = demo_data_stage(config, store=store)
        source = str(demo.path)
    ingested = ingest_stage(config, source, store=store)
    trained = train_stage(config, store=store)
    scored = score_stage(config, config.score.source or source, store=store)
    page = str(report_stage(config, trained.run_id, store=store))
    headline = {
        **{k: round(v, 4) for k, v in trained.test_metrics.items() if k != "test_rows"},
        "rows_scored": scored.scored,
        "score_errors": scored.errors,
        "table": scored.table,
        "run_id": trained.run_id,
        "model": f"{trained.model_name} v{trained.model_version}",
        "model_version": trained.model_version,
        "champion": trained.promoted,
        "report": page,
        "mlflow_ui": f"mlflow ui --backend-store-uri {shown_uri(store.tracking_uri)}",
    }
    return RunSummary(
        work_dir=str(store.work),
        demo_data=demo,
        ingest=ingested,
        train=trained,
        score=scored,
        report=page,
        seconds=round(time.time() - started, 1),
        headline=headline,
    )


def shown_config(resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """Every configuration value with its source, and the locations it resolves to.

    Returns:
        Dotted key -> ``{"value", "source"}``; ``source`` is ``base``, ``overlay <file>``,
        ``--set``, or for the ``locations.*`` the Store derives, the key or environment
        variable that decided it (``default`` when nothing did).
    """
    import os

    flat = _flatten_config(resolved.config.to_dict())
    shown = {
        key: {"value": value, "source": resolved.sources.get(key, "default")}
        for key, value in flat.items()
    }
    config = resolved.config
    store = Store.of(config)
    tracking = (
        "mlflow.tracking_uri"
        if config.mlflow.tracking_uri
        else "environment MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "default: sqlite store in work_dir"
    )
    locations = {
        "work": (str(store.work), "work_dir"),
        "prepared": (str(store.prepared), "ingest.output" if config.ingest.output else "work_dir"),
        "table": (store.table, "score.table" if config.score.table else "work_dir"),
        "tracking_uri": (store.tracking_uri, tracking),
        "registry_uri": (store.registry_uri, "mlflow.registry_uri"),
    }
    for name, (value, source) in locations.items():
        shown[f"locations.{name}"] = {"value": value, "source": source}
    return shown


def _flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- Spark and Horovod slots ----------------------------------------------------------------


def spark_session(config: Config) -> Any:
    """The session, after the preflight: the driver's stack, then its executors' (once)."""
    from pipelines import preflight
    from pipelines.spark import ELASTIC_TASK_ATTEMPTS, get_spark

    horovod = launcher_for(config.train.launcher) == "horovod"
    preflight.check_driver(horovod=horovod)  # before any Spark work
    # Elastic Horovod restarts a lost rank in its Spark task's next attempt.
    attempts = ELASTIC_TASK_ATTEMPTS if horovod and config.train.elastic else None
    spark = get_spark(config.spark, task_attempts=attempts)
    preflight.check_executors(spark, horovod=horovod)  # before the stage's first job
    return spark


def start_session(config: Config) -> Future[SparkSession]:
    """:func:`spark_session`, started in the background (see :mod:`pipelines.spark`).

    A stage calls it first and :func:`~pipelines.spark.session_of` where it needs Spark, so
    that its own start-up (imports, MLflow, the model) runs while the JVM starts.
    """
    from pipelines.spark import start_in_background

    return start_in_background(lambda: spark_session(config))


def check_local_slots(config: Config) -> None:
    """Fail before any Spark work when a local master cannot run ``train.num_proc`` ranks."""
    from pipelines.spark import local_slots

    slots = local_slots(config.spark.master)
    distributed = launcher_for(config.train.launcher) != "local"
    if distributed and slots is not None and config.train.num_proc > slots:
        raise UserError(
            f"train.num_proc={config.train.num_proc} needs {config.train.num_proc} Spark task "
            f"slots, but spark.master={config.spark.master} has {slots}; lower train.num_proc "
            f"or use local[{config.train.num_proc}]"
        )
