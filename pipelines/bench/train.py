"""Train benchmark: Horovod on Spark against plain Keras ``fit``, same model, same feed.

In: a :class:`~pipelines.config.Config` (Spark session, row-group size for the cached
dataset), a number of generated images and repeats. Out: three
:class:`~pipelines.bench.stats.Measurement` records: the steady-state step time of one
Horovod rank over plain Keras (target at most 1.05x), the images/s of two Horovod ranks
over plain Keras (informative: what distributing buys on this machine), and the epoch time
with rank 0's per-layer statistics (``train.layer_stats``) over the same epoch without them,
at the epoch length of the default digits run (target at most 1.05x).

The ranks run :func:`step_worker`: a training rank set up by the training code itself,
:func:`pipelines.train.worker.prepared_rank` (device, threads, seed, rank-scaled learning
rate, Horovod optimizer, sharded Petastorm feed, Horovod callbacks), then fitted without
validation, early stopping or checkpoints, which would add their own work to the epochs
measured.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from pipelines.bench.data import DATASET_IMAGES, PreparedDataset, prepared_dataset
from pipelines.bench.feed import bench_model_config
from pipelines.bench.stats import Measurement, pair
from pipelines.bench.timing import check_sizes, epoch_timer, interleaved
from pipelines.config import HOROVOD_ENV_VARIABLES, Config, SplitConfig, TrainConfig
from pipelines.demo import DEMO_IMAGES
from pipelines.store import DatasetDir
from pipelines.train.worker import RankSpec

log = logging.getLogger("pipelines.bench")

#: Target: one Horovod rank's step at most this many times a plain Keras step.
TRAIN_TARGET_RATIO = 1.05
#: Untimed epochs at the start of every launch (start-up, tracing, weight broadcast).
WARMUP_EPOCHS = 1
#: Timed epochs per launch; their median step time is the launch's figure.
MEASURED_EPOCHS = 2
#: Target: an epoch with rank 0's per-layer statistics at most this many times one without.
LAYER_STATS_TARGET_RATIO = 1.05
#: Timed epochs per layer-stats launch: its epochs are short (a digits epoch), so more.
LAYER_STATS_EPOCHS = 8
#: Target: two ranks' images/s at least this share of twice one one-thread rank's (the
#: honest ideal on 2 cores: each rank gets one core, so only the allreduce may cost).
SCALING_TARGET_RATIO = 0.9
#: Horovod's own knobs (``train.horovod``), each tried alone on two ranks: name -> setting.
HOROVOD_KNOBS: dict[str, dict[str, Any]] = {
    "fp16 compression": {"compression": "fp16"},
    "fusion off": {"fusion_threshold_mb": 0},
    "cycle time 5 ms": {"cycle_time_ms": 5.0},
    "2 backward passes per step": {"backward_passes_per_step": 2},
    "autotune": {"autotune": True},
    # fewer exchanges and fewer coordination rounds together: what helped most here
    "4 backward passes, 5 ms cycle": {"backward_passes_per_step": 4, "cycle_time_ms": 5.0},
}
#: Training rows one rank of the default digits run reads per epoch (the bundled digits'
#: train split over the default ranks): the epoch length the layer-stats cost is set against.
DIGITS_ROWS_PER_RANK = math.ceil(DEMO_IMAGES * SplitConfig().train / TrainConfig().num_proc)


@dataclass(frozen=True)
class StepSpec(RankSpec):
    """What a benchmark rank needs: a training rank's spec and the epochs to run.

    ``rows`` holds the training split alone, so the prepared rank reads no validation set.

    Attributes:
        warmup_epochs: Untimed epochs first.
        measured_epochs: Timed epochs after them.
        layer_stats: Add rank 0's per-layer statistics callback, as training does with
            ``train.layer_stats`` (its probe: the first rows of the training feed).
    """

    warmup_epochs: int = WARMUP_EPOCHS
    measured_epochs: int = MEASURED_EPOCHS
    layer_stats: bool = False


def step_worker(spec: StepSpec) -> dict[str, Any]:
    """One training rank that times its epochs; runs under any launcher.

    The rank is set up by :func:`pipelines.train.worker.prepared_rank`, exactly as a
    training rank is; only the timing callback is added, and nothing is written.

    Returns:
        ``rank``, ``size``, ``steps_per_epoch``, ``epoch_seconds`` (the timed epochs),
        ``epoch_median`` (their median), ``step_seconds`` (that divided by the steps),
        ``images_per_second`` (of all ranks together: ``size * batch * steps / median epoch
        seconds``), ``layer_stats_seconds`` (the callback's own time in the timed epochs;
        empty without it), ``weights_sha256``, ``seconds`` (the whole rank, start-up
        included), ``intra_op_threads`` (TensorFlow's compute threads in the rank),
        ``horovod_env`` (the ``HOROVOD_*`` knob variables as the rank saw them after
        Horovod's initialisation: proof that ``train.horovod`` reached it), and
        over the timed epochs ``cores_busy`` (the rank's CPU seconds per wall second) and
        ``reader_cpu_share`` (the share of them in its feed's reader threads).
    """
    import os

    import tensorflow as tf

    from pipelines.keras_api import keras
    from pipelines.train.distributions import distribution
    from pipelines.train.layer_stats import layer_stats_callback, probe_batch
    from pipelines.train.worker import prepared_rank, weights_digest

    started = time.perf_counter()
    # The knobs go to the distribution, which sets them before hvd.init() in this rank.
    dist = distribution(spec.launcher, knobs=spec.train.horovod)
    horovod_env = {key: os.environ.get(key) for key in HOROVOD_ENV_VARIABLES.values()}
    with prepared_rank(spec, dist) as rank:
        timer = epoch_timer()
        extra = []
        if spec.layer_stats and dist.rank == 0:
            probe = probe_batch(rank.train_data)
            extra.append(layer_stats_callback(keras(), probe, {}, {}))
        rank.model.fit(
            rank.train_data,
            epochs=spec.warmup_epochs + spec.measured_epochs,
            steps_per_epoch=rank.steps_per_epoch,
            callbacks=[*rank.callbacks, *extra, timer],  # the timer last: see epoch_timer
            verbose=0,
        )
        # As training does at each epoch end: batch-norm statistics made equal on all ranks.
        dist.sync_model_state(rank.model)
        digest = weights_digest(rank.model)
    steps = rank.steps_per_epoch
    measured = timer.seconds[spec.warmup_epochs :]
    epoch = statistics.median(measured)
    process_cpu = sum(timer.process_cpu[spec.warmup_epochs :])
    reader_cpu = sum(timer.reader_cpu[spec.warmup_epochs :])
    return {
        "rank": dist.rank,
        "size": dist.size,
        "steps_per_epoch": steps,
        "epoch_seconds": [round(s, 4) for s in measured],
        "epoch_median": epoch,
        "layer_stats_seconds": [
            round(s, 4) for c in extra for s in c.seconds[spec.warmup_epochs :]
        ],
        "step_seconds": epoch / steps,
        "images_per_second": dist.size * spec.train.batch_size * steps / epoch,
        "weights_sha256": digest,
        "seconds": round(time.perf_counter() - started, 2),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "horovod_env": horovod_env,
        # Over the timed epochs: cores the rank kept busy, and its reader threads' share.
        "cores_busy": process_cpu / sum(measured),
        "reader_cpu_share": reader_cpu / process_cpu if process_cpu else 0.0,
    }


def bench_train(
    config: Config,
    *,
    images: int = DATASET_IMAGES,
    repeats: int = 3,
    knobs: dict[str, dict[str, Any]] | None = None,
) -> list[Measurement]:
    """Horovod step time and throughput against plain Keras ``fit`` on the same feed.

    On the cached benchmark dataset (see :func:`~pipelines.bench.data.prepared_dataset`),
    the fixed model of the feed benchmark (``mnist_cnn``, Adam, batch 32 per rank) trains on
    the training split, fed by :func:`pipelines.train.feed.make_dataset` in every case:

    - baseline ``plain keras fit``: :func:`step_worker` in this process under the local
      launcher: no Horovod at all (identity optimizer wrapper, no callbacks);
    - measured ``horovod 1 rank``: :func:`step_worker` as one rank of
      ``horovod.spark.run`` on the session's executors (Gloo), with
      ``hvd.DistributedOptimizer`` and the broadcast and metric-averaging callbacks;
    - measured ``horovod 2 ranks`` (when the session has two task slots): the same with two
      ranks, each reading half the row groups and running half the steps;
    - baseline ``2 x one 1-thread rank``: twice the images/s of one Horovod rank limited
      to one TensorFlow thread (``train.threads_per_rank=1``): what two ranks on two
      cores would do with a free allreduce (target: two ranks at least 0.9 of it);
    - measured ``2 independent 1-thread processes`` (with two task slots): two fresh
      processes running :func:`step_worker` at once without Horovod, one thread each,
      their images/s added up, against that baseline: what the host itself allows two
      ranks that exchange nothing (informative);
    - per Horovod knob (``knobs``, default :data:`HOROVOD_KNOBS`): two ranks with that
      ``train.horovod`` setting alone, against two ranks with none.

    What is timed is inside the ranks, so Spark job, Horovod and TensorFlow start-up are
    not: each launch runs ``WARMUP_EPOCHS`` untimed epochs (tracing, weight broadcast,
    learning-rate warm-up, reader start) then ``MEASURED_EPOCHS`` timed ones; its step
    time is the median timed epoch over its steps, its images/s all ranks' images over
    that epoch (the ranks advance in lockstep; the slowest rank's figure is taken). One
    round launches the three in turn, ``repeats`` rounds, medians reported. The whole
    launch's wall time is kept in the details (``launch_seconds``).

    Args:
        config: Spark session (its task slots bound the ranks) and
            ``ingest.rows_per_row_group`` for the cached dataset.
        images: Number of generated source images.
        repeats: Rounds of launches.
        knobs: Horovod settings to try on two ranks (name -> ``train.horovod`` fields).

    Then :func:`bench_layer_stats` (in this process, no Horovod).

    Returns:
        One Horovod rank's step seconds over plain Keras (target ``<= 1.05``); with two
        task slots, two ranks' images/s over plain Keras (informative), over twice one
        one-thread rank (target ``>= 0.9``), two independent one-thread processes over
        the same (informative), and with each knob over two ranks without (informative);
        last the layer-stats epoch ratio of :func:`bench_layer_stats`
        (target ``<= 1.05``).

    Raises:
        UserError: ``images`` or ``repeats`` is below 1, no training rows, or Horovod is
            not importable.
        RuntimeError: Two ranks finished with different weights (gradients not averaged).
    """
    check_sizes("train", images, repeats)
    data = prepared_dataset(config, images)

    from pipelines.spark import get_spark
    from pipelines.train.horovod_launcher import HorovodSparkLauncher
    from pipelines.train.launchers import LocalLauncher

    spark = get_spark(config.spark)
    slots = spark.sparkContext.defaultParallelism
    spec = _step_spec(data, data.rows["train"])
    horovod = replace(spec, launcher="horovod")
    launches = {
        "plain": (LocalLauncher(), spec),
        "horovod_1": (HorovodSparkLauncher(spark, 1), horovod),
    }
    one_thread = replace(horovod, train=replace(horovod.train, threads_per_rank=1))
    knobs = HOROVOD_KNOBS if knobs is None else knobs
    if slots >= 2:
        launches["horovod_2"] = (HorovodSparkLauncher(spark, 2), horovod)
        launches["horovod_1_thread"] = (HorovodSparkLauncher(spark, 1), one_thread)
        launches["side_by_side"] = (_SideBySide(2), replace(one_thread, launcher="local"))
        for knob, setting in knobs.items():
            train = replace(horovod.train, horovod=replace(horovod.train.horovod, **setting))
            launches[knob] = (HorovodSparkLauncher(spark, 2), replace(horovod, train=train))
    else:
        log.warning("bench train: the session has %d task slot(s); skipping 2 ranks", slots)
    ranks: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in launches}
    launch_seconds: dict[str, list[float]] = {name: [] for name in launches}

    def run(name: str) -> float:
        launcher, worker_spec = launches[name]
        start = time.perf_counter()
        results = launcher.run(step_worker, [worker_spec])
        launch_seconds[name].append(round(time.perf_counter() - start, 2))
        digests = {r["rank"]: r["weights_sha256"] for r in results}
        # Independent processes average nothing: their weights may differ.
        if name != "side_by_side" and len(set(digests.values())) != 1:
            raise RuntimeError(f"bench train: {name} ranks ended with different weights")
        ranks[name].append(results)
        return max(r["step_seconds"] for r in results)

    interleaved("train", {name: functools.partial(run, name) for name in launches}, repeats)

    def figures(name: str, key: str) -> list[float]:
        if name == "side_by_side" and key == "images_per_second":
            # each process reports its own rate (size 1): together they did the sum
            return [sum(r[key] for r in results) for results in ranks[name]]
        pick = max if key == "step_seconds" else min  # the slowest rank sets the pace
        return [pick(r[key] for r in results) for results in ranks[name]]

    details = {
        "images": images,
        "repeats": repeats,
        **data.describe(),
        "model": spec.train.model,
        "batch_size_per_rank": spec.train.batch_size,
        "task_slots": slots,
        "spark_master": spark.sparkContext.master,
        "warmup_epochs": WARMUP_EPOCHS,
        "measured_epochs": MEASURED_EPOCHS,
        "measures": (
            "inside each rank: median wall seconds of the timed epochs / steps per epoch "
            "(start-up and warm-up epochs excluded)"
        ),
        "steps_per_epoch": {name: ranks[name][0][0]["steps_per_epoch"] for name in ranks},
        "epoch_seconds": {
            name: [[r["epoch_seconds"] for r in results] for results in ranks[name]]
            for name in ranks
        },
        "step_seconds": {name: _rounded(figures(name, "step_seconds")) for name in ranks},
        "images_per_second": {name: _rounded(figures(name, "images_per_second")) for name in ranks},
        "launch_seconds": launch_seconds,
        "intra_op_threads": {
            name: sorted({r["intra_op_threads"] for results in ranks[name] for r in results})
            for name in ranks
        },
        # What each launch's ranks saw of train.horovod (None: Horovod's default).
        "horovod_env": {
            name: {k: v for k, v in ranks[name][0][0]["horovod_env"].items() if v is not None}
            for name in ranks
        },
        # Do the feed's reader threads starve the compute threads of ranks sharing a host?
        # Medians over every rank of every launch (see step_worker).
        "cores_busy_per_rank": _medians(ranks, "cores_busy"),
        "reader_cpu_share": _medians(ranks, "reader_cpu_share"),
    }
    measurements = [
        pair(
            "train",
            "horovod 1 rank step",
            figures("horovod_1", "step_seconds"),
            "plain keras fit step",
            figures("plain", "step_seconds"),
            unit="s/step",
            target=f"<= {TRAIN_TARGET_RATIO}",
            details=details,
        )
    ]
    if "horovod_2" in ranks:
        # twice one one-thread rank: two ranks on two cores with a free allreduce
        ideal = [2 * rate for rate in figures("horovod_1_thread", "images_per_second")]
        measurements.append(
            pair(
                "train",
                "horovod 2 ranks",
                figures("horovod_2", "images_per_second"),
                "plain keras fit",
                figures("plain", "images_per_second"),
                unit="images/s",
                details=details,
            )
        )
        for launch, label, target in (
            ("horovod_2", "horovod 2 ranks", f">= {SCALING_TARGET_RATIO}"),
            ("side_by_side", "2 independent 1-thread processes", ""),  # the host's limit
        ):
            measurements.append(
                pair(
                    "train",
                    label,
                    figures(launch, "images_per_second"),
                    "2 x one 1-thread rank",
                    ideal,
                    unit="images/s",
                    target=target,
                    details=details,
                )
            )
        measurements += [
            pair(
                "train",
                f"horovod 2 ranks, {knob}",
                figures(knob, "images_per_second"),
                "horovod 2 ranks",
                figures("horovod_2", "images_per_second"),
                unit="images/s",
                details={**details, "horovod": knobs[knob]},
            )
            for knob in knobs
        ]
    measurements.append(bench_layer_stats(data, repeats=repeats))
    return measurements


class _SideBySide:
    """``count`` copies of a worker at once, each in a fresh (spawned) process.

    Ranks that share this host and exchange nothing: what the host allows without
    Horovod. Spawned, so each starts its own TensorFlow with its own thread settings.
    """

    kind = "local"

    def __init__(self, count: int) -> None:
        self.count = count

    def run(self, fn: Any, args: list[Any]) -> list[Any]:
        """``fn(*args)`` in ``count`` processes at once; their results."""
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(self.count) as pool:
            return pool.starmap(fn, [tuple(args)] * self.count, chunksize=1)


def bench_layer_stats(data: PreparedDataset, *, repeats: int = 3) -> Measurement:
    """Epoch time with rank 0's per-layer statistics over the same epoch without them.

    :func:`step_worker` under the local launcher (plain Keras ``fit``), the benchmark's
    model (``mnist_cnn``, Adam, batch 32: the default model), at the epoch length of one
    rank of the default digits run (:data:`DIGITS_ROWS_PER_RANK` rows), with and without
    :func:`pipelines.train.layer_stats.layer_stats_callback` (one probe forward/backward
    and the histograms per epoch). ``LAYER_STATS_EPOCHS`` timed epochs per launch, the
    median epoch is the launch's figure; the two alternate, ``repeats`` rounds. A real
    epoch also validates and averages across ranks, so its share of the callback is
    smaller than measured here. The callback's own seconds are kept in the details.

    Args:
        data: The cached benchmark dataset (28x28 grey, as the digits are trained).
        repeats: Rounds of launches.

    Returns:
        The measurement (target ``<= 1.05``).
    """
    from pipelines.train.launchers import LocalLauncher

    spec = _step_spec(data, DIGITS_ROWS_PER_RANK, measured_epochs=LAYER_STATS_EPOCHS)
    launches = {"plain": spec, "layer_stats": replace(spec, layer_stats=True)}
    ranks: dict[str, list[dict[str, Any]]] = {name: [] for name in launches}

    def run(name: str) -> float:
        (result,) = LocalLauncher().run(step_worker, [launches[name]])
        ranks[name].append(result)
        return result["epoch_median"]

    figures = interleaved(
        "train", {name: functools.partial(run, name) for name in launches}, repeats
    )
    callback = [s for r in ranks["layer_stats"] for s in r["layer_stats_seconds"]]
    plain_epoch = statistics.median(figures["plain"])
    details = {
        "repeats": repeats,
        **data.describe(),
        "model": spec.train.model,
        "batch_size": spec.train.batch_size,
        "rows_per_epoch": DIGITS_ROWS_PER_RANK,
        "steps_per_epoch": ranks["plain"][0]["steps_per_epoch"],
        "measured_epochs": LAYER_STATS_EPOCHS,
        "measures": "median wall seconds of the timed epochs of plain Keras fit, one rank",
        "epoch_seconds": {name: [r["epoch_seconds"] for r in ranks[name]] for name in ranks},
        "callback_seconds_median": round(statistics.median(callback), 5),
        "callback_share_of_plain_epoch": round(statistics.median(callback) / plain_epoch, 4),
    }
    return pair(
        "train",
        "fit epoch with layer stats",
        figures["layer_stats"],
        "fit epoch without",
        figures["plain"],
        unit="s/epoch",
        target=f"<= {LAYER_STATS_TARGET_RATIO}",
        details=details,
    )


def _step_spec(data: PreparedDataset, train_rows: int, **epochs: int) -> StepSpec:
    """A local rank of the benchmark model on ``data``'s training split (``train_rows`` read)."""
    return StepSpec(
        train=bench_model_config(),
        launcher="local",
        dataset=DatasetDir(str(data.path)),
        image_shape=data.image_shape,
        num_classes=len(data.label_names),
        rows={"train": train_rows},
        **epochs,
    )


def _medians(ranks: dict[str, list[list[dict[str, Any]]]], key: str) -> dict[str, float]:
    """Per launch name, the median of ``key`` over all its ranks' results."""
    return {
        name: round(statistics.median(r[key] for results in launches for r in results), 3)
        for name, launches in ranks.items()
    }


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.5g}") for v in values]
