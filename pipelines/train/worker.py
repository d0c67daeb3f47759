"""The training rank: what every Horovod process (or the one local process) runs.

In: a :class:`WorkerSpec` (pickled to the executors). Out: a :class:`RankResult` per rank
with the epoch history, a digest of the final weights (identical on every rank when
gradients were really averaged) and timings. Rank 0 alone writes checkpoints and the final
model into the run's folder (:mod:`pipelines.train.checkpoint`), which must be visible to
the driver (local disk locally, a shared mount on a cluster).

:func:`prepared_rank` sets a rank up for ``model.fit`` (device, threads, seed, model, sharded
feed, the Distribution's callbacks); training and ``dlpipe bench train`` both run it, so the
benchmark measures this code.

Distributed-only steps go through :mod:`pipelines.train.distributions`' Distribution, so
this module never imports Horovod.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipelines.config import TrainConfig
from pipelines.devices import CPU, pin_device, precision
from pipelines.errors import NoGpuError
from pipelines.host import cores_per_process, limit_tf_threads
from pipelines.store import DatasetDir, RunDir
from pipelines.train.checkpoint import (
    LAYER_RECORDS,
    Checkpoint,
    announce_rank,
    checkpoint_callback,
    placement,
    read_checkpoint,
    save_final_model,
)

if TYPE_CHECKING:
    from pipelines.train.distributions import Distribution


@dataclass(frozen=True)
class RankSpec:
    """What preparing a rank needs (see :func:`prepared_rank`); small and picklable.

    Attributes:
        train: Hyper-parameters.
        launcher: ``horovod`` or ``local`` (selects the Distribution).
        dataset: The prepared dataset.
        image_shape: (H, W, C) of the stored images.
        num_classes: Number of labels.
        rows: Rows per split, from the manifest; without ``val`` rows no validation is read.
        init_model: A Keras model file (visible to every rank) whose weights a new model
            starts from (``train.init_from``); None: the built weights.
    """

    train: TrainConfig
    launcher: str
    dataset: DatasetDir
    image_shape: tuple[int, int, int]
    num_classes: int
    rows: dict[str, int]
    init_model: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class WorkerSpec(RankSpec):
    """Everything a training rank needs: a :class:`RankSpec` and where its run is kept.

    Attributes:
        run_dir: Where rank 0 writes checkpoints and the final model.
        resume: Continue from the checkpoint in ``run_dir`` if there is one.
        run_id: The MLflow run rank 0 logs each completed epoch to (None: not logged by
            the rank). The tracking server and its credentials come from the rank's
            environment, not from here.
    """

    run_dir: RunDir
    resume: bool = False
    run_id: str | None = None


@dataclass(frozen=True)
class RankResult:
    """What one rank returns to the driver.

    Attributes:
        rank: This rank (in the last world, for elastic training).
        size: The world's size at the end.
        history: Per-epoch metrics of every epoch run so far (averaged across ranks).
        epochs: Epochs completed.
        initial_epoch: The epoch this start resumed at.
        stopped_early: Early stopping ended training before ``train.epochs``.
        steps_per_epoch: Training steps per epoch in the last world.
        world_sizes: ``[{"epoch", "size", "learning_rate"}]``: the world size (and the
            rate rescaled to it) from each epoch on where it changed (the first entry is
            the start).
        learning_rate: The rank-scaled learning rate (of the last world, elastic).
        weights_sha256: Digest of the final weights (equal on every rank iff in step).
        seconds: The rank's whole time.
        fit_seconds: Its time in ``fit`` (checkpoints and layer statistics included).
        placement: Host, pid and executor folder.
        device: What the rank computed on (``GPU:<n> ...`` or ``CPU``).
        precision: The Keras dtype policy it trained under.
        layer_stats: Rank 0's per-layer statistics per epoch (empty elsewhere).
        layer_histograms: Rank 0's per-layer histograms per epoch (empty elsewhere).
        layer_digests: Digest of each weighted layer's final weights, by layer path
            (:func:`~pipelines.model_layers.layer_digests`): which layers differ when
            ``weights_sha256`` does.
    """

    rank: int
    size: int
    history: dict[str, list[float]]
    epochs: int
    initial_epoch: int
    stopped_early: bool
    steps_per_epoch: int
    world_sizes: list[dict[str, Any]]
    learning_rate: float
    weights_sha256: str
    seconds: float
    fit_seconds: float
    placement: dict[str, str]
    device: str
    precision: str
    layer_stats: dict[str, list[float]] = field(default_factory=dict)
    layer_histograms: dict[str, list[list[list[float]]]] = field(default_factory=dict)
    layer_digests: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedRank:
    """A rank ready for ``model.fit``, as :func:`prepared_rank` set it up.

    Attributes:
        device: What :func:`~pipelines.devices.pin_device` returned (``GPU:<n> ...`` or CPU).
        policy: The Keras dtype policy in force: ``mixed_float16`` or ``float32``.
        model: The compiled model: built with the Distribution's optimizer wrapper, or
            reloaded (optimizer state included) from the checkpoint resumed.
        resumed: The checkpoint the model was reloaded from, or None.
        scaled_lr: The learning rate scaled to this world's size.
        steps_per_epoch: Training steps per epoch, the same on every rank.
        train_data: This rank's shard of the training split (infinite, shuffled).
        validation: ``fit`` keyword arguments for the validation split; empty without one.
        callbacks: The Distribution's callbacks; callers append their own after them.
        device_failure: Elastic: why this rank lacks the GPU asked for (None: it has it),
            checked with every rank inside the elastic loop instead of here.
    """

    device: str
    policy: str
    model: Any
    resumed: Checkpoint | None
    scaled_lr: float
    steps_per_epoch: int
    train_data: Any
    validation: dict[str, Any]
    callbacks: list
    device_failure: str | None = None

    def resharded(self, spec: RankSpec, dist: Distribution) -> PreparedRank:
        """The same model with the feed, steps and callbacks of the world as it is now.

        Horovod elastic: a reset may change this rank's number and the world's size.
        """
        return replace(self, **_world(spec, dist))


def train_worker(spec: WorkerSpec) -> RankResult:
    """Train on this rank's shard; return its history, final-weights digest and device.

    Raises:
        NoGpuError: ``train.use_gpu`` is true and a rank's host has no GPU (every rank
            raises it, so none waits in a collective for one that stopped).
    """
    from pipelines.train.distributions import distribution

    started = time.time()
    # Checkpoints are HDF5 on purpose: hvd.load_model restores legacy optimizers from it.
    warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
    dist = distribution(
        spec.launcher, elastic=spec.train.elastic, knobs=spec.train.horovod, seed=spec.train.seed
    )
    announce_rank(spec.run_dir, dist.rank)
    try:
        return _train(spec, dist, started)
    except BaseException as exc:
        # Horovod: a rank that raised (e.g. its peer's socket closed) says so; one that was
        # killed cannot, which tells the driver which rank really died.
        announce_rank(spec.run_dir, dist.rank, failed=f"{type(exc).__name__}: {exc}"[:500])
        raise


@contextmanager
def prepared_rank(
    spec: RankSpec, dist: Distribution, *, resume_from: RunDir | None = None
) -> Iterator[PreparedRank]:
    """Set this rank up for ``model.fit``: what training and its benchmark both run.

    Pins the device and splits the host's cores before any TensorFlow op, seeds, then
    builds the model at the rank-scaled rate (or reloads the checkpoint in ``resume_from``)
    and opens this rank's shard of the splits with the Distribution's callbacks. The
    block runs under the dtype policy of ``train.mixed_precision``, restored after it.
    Checkpoint writing, history and the final model are the caller's.

    Args:
        spec: Hyper-parameters, dataset and its shape.
        dist: This rank's Distribution.
        resume_from: A run's folder whose committed checkpoint, if any, the model
            continues from; None always builds a new model.

    Yields:
        The prepared rank.

    Raises:
        NoGpuError: ``train.use_gpu`` is true and a rank's host has no GPU (every rank
            raises it, so none waits in a collective for one that stopped).
    """
    from pipelines.keras_api import keras
    from pipelines.models import build_model

    cfg = spec.train
    # Before any TensorFlow op (devices and thread pools are fixed by the first one).
    try:
        device, failure = pin_device(cfg.use_gpu, dist.local_rank), None
    except NoGpuError as exc:
        device, failure = CPU, str(exc)
    limit_threads(dist.local_size, cfg.threads_per_rank)
    # Horovod elastic: a rank that joins a running world meets the others in the elastic
    # state's sync, so nothing here may be a collective (the others would never match
    # it: the hang of a joining rank). The device check runs in the elastic loop instead.
    if not cfg.elastic:
        # Horovod: every rank learns whether one lacks its GPU, so they all stop together.
        failures = [f for f in dist.allgather(failure, "device_check") if f]
        if failures:
            raise NoGpuError(failures[0])
    with precision(cfg.mixed_precision, device) as policy:
        keras().utils.set_random_seed(cfg.seed)
        state, model = None, None
        if resume_from is not None:
            if not cfg.elastic:
                # Horovod: every rank resumes from the same epoch as rank 0.
                state = dist.broadcast(read_checkpoint(resume_from), "resume_state")
            elif dist.rank == 0:
                # Horovod elastic: rank 0's model, epoch and history reach the others in
                # the state's first sync (no broadcast here, see above).
                state = read_checkpoint(resume_from)
            if state:
                model = dist.load_model(str(resume_from.checkpoint_model(name=state.model)))
        if model is None:
            model = build_model(
                cfg,
                spec.image_shape,
                spec.num_classes,
                optimizer_wrapper=dist.wrap_optimizer,
                learning_rate=_scaled_lr(cfg, dist),
            )
            if spec.init_model:
                from pipelines.warm_start import warm_start

                warm_start(model, spec.init_model, cfg.init_from or spec.init_model)
        if cfg.elastic:
            _create_optimizer_slots(model)
        yield PreparedRank(
            device=device,
            policy=policy,
            model=model,
            resumed=state,
            device_failure=failure,
            **_world(spec, dist),
        )


def _create_optimizer_slots(model: Any) -> None:
    """Create the optimizer's slot variables now, before the elastic state first syncs.

    Horovod elastic broadcasts every optimizer variable from rank 0 in each sync; a
    Keras 2 legacy optimizer creates its slots only at its first step, so a rank joining
    a world that has trained would offer fewer variables than rank 0 and the broadcasts
    would never match.
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    create = getattr(optimizer, "_create_all_weights", None)
    if create is not None:
        create(model.trainable_variables)


def _scaled_lr(cfg: TrainConfig, dist: Distribution) -> float:
    # Horovod: scale the rate by the number of ranks (the global batch grows with it);
    # elastic training rescales it to the world's size at every reset.
    return cfg.learning_rate * dist.size


def _set_learning_rate(model: Any, value: float) -> None:
    """Set the compiled optimizer's learning rate (the inner one under loss scaling)."""
    from pipelines.keras_api import keras

    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    keras().backend.set_value(optimizer.learning_rate, value)


def _world(spec: RankSpec, dist: Distribution) -> dict[str, Any]:
    """The :class:`PreparedRank` fields that follow ``dist.rank`` and ``dist.size`` now."""
    from pipelines.keras_api import is_keras3
    from pipelines.tasks import task_for_model
    from pipelines.train.feed import Augmentation, make_dataset, steps_per_epoch

    cfg = spec.train
    scaled_lr = _scaled_lr(cfg, dist)
    # Horovod: every rank runs the same number of steps, or the others hang in allreduce.
    steps = steps_per_epoch(spec.rows["train"], dist.size, cfg.batch_size)
    feed = {
        "image_shape": spec.image_shape,
        "batch_size": cfg.batch_size,
        # Horovod: each rank reads its own row groups.
        "cur_shard": dist.rank,
        "shard_count": dist.size,
        "seed": cfg.seed,
        "task": task_for_model(cfg.model),
    }
    augment = Augmentation(
        cfg.augment_shift,
        cfg.augment_rotation_deg,
        flip=cfg.augment_flip,
        crop_scale=cfg.augment_crop_scale,
        brightness=cfg.augment_brightness,
        contrast=cfg.augment_contrast,
    )
    if is_keras3():
        # The Keras stack: plain pyarrow and numpy, no Petastorm or tf.data.
        from pipelines.train.keras_feed import make_dataset  # noqa: F811
    train_data = make_dataset(spec.dataset.split("train"), shuffle=True, augment=augment, **feed)
    validation: dict[str, Any] = {}
    if spec.rows.get("val", 0) > 0:
        validation = {
            "validation_data": make_dataset(spec.dataset.split("val"), shuffle=False, **feed),
            "validation_steps": steps_per_epoch(spec.rows["val"], dist.size, cfg.batch_size),
        }
    callbacks = dist.callbacks(
        initial_lr=scaled_lr, warmup_epochs=cfg.warmup_epochs, steps_per_epoch=steps
    )
    return {
        "scaled_lr": scaled_lr,
        "steps_per_epoch": steps,
        "train_data": train_data,
        "validation": validation,
        "callbacks": callbacks,
    }


def _train(spec: WorkerSpec, dist: Distribution, started: float) -> RankResult:
    """The rank's training proper: fit, checkpoints, the final model, the result."""
    from pipelines.keras_api import keras
    from pipelines.model_layers import layer_digests
    from pipelines.models import as_float32

    k = keras()
    cfg = spec.train
    with prepared_rank(spec, dist, resume_from=spec.run_dir if spec.resume else None) as rank:
        # Rank 0's per-layer statistics (pipelines.train.layer_stats), resumed like history.
        if rank.resumed:
            initial_epoch, history = rank.resumed.epoch, rank.resumed.history
            layers = rank.resumed.layers()
        else:
            initial_epoch, history = 0, {}
            layers = {key: {} for key in LAYER_RECORDS}

        fit_started = time.time()
        if cfg.elastic:
            steps, world_sizes = _fit_elastic(spec, dist, rank, initial_epoch, history, k, layers)
        else:
            steps = _fit_phases(spec, dist, rank, initial_epoch, history, k, layers)
            world_sizes = [
                {"epoch": initial_epoch, "size": dist.size, "learning_rate": rank.scaled_lr}
            ]
        fit_seconds = time.time() - fit_started

        model = rank.model
        if dist.rank == 0:
            # Mixed precision is a training setting: the model evaluated, logged and served
            # is float32, so it runs at full speed on CPU executors too.
            save_final_model(
                spec.run_dir, as_float32(model, cfg, spec.image_shape, spec.num_classes)
            )
        epochs_done = len(next(iter(history.values()), []))
        return RankResult(
            rank=dist.rank,
            size=dist.size,
            history=history,
            epochs=epochs_done,
            initial_epoch=initial_epoch,
            stopped_early=epochs_done < cfg.epochs,
            steps_per_epoch=steps,
            world_sizes=world_sizes,
            learning_rate=world_sizes[-1]["learning_rate"],
            weights_sha256=weights_digest(model),
            layer_digests=layer_digests(model),
            seconds=round(time.time() - started, 2),
            fit_seconds=round(fit_seconds, 2),
            placement=placement(),
            device=rank.device,
            precision=rank.policy,
            **layers,  # filled on rank 0 only
        )


def _fit_phases(
    spec: WorkerSpec,
    dist: Distribution,
    rank: PreparedRank,
    initial_epoch: int,
    history: dict[str, list[float]],
    k: Any,
    layers: dict[str, dict[str, list]],
) -> int:
    """Fit, in two phases when ``train.fine_tune`` freezes a backbone first.

    Phase one trains the head on the frozen backbone up to ``frozen_epochs``; then the
    backbone's top layers are unfrozen and the model is compiled anew (a change of
    ``trainable`` takes effect at compile) at ``learning_rate_factor`` times the rate,
    with fresh Distribution callbacks and no warm-up. A run resumed past the first phase
    reloads the unfrozen model from its checkpoint and goes straight on.
    """
    from pipelines.backbones import BACKBONE_LAYER, unfreeze, uses_backbone
    from pipelines.models import compile_model

    cfg = spec.train
    frozen = cfg.fine_tune.frozen_epochs if uses_backbone(cfg) else 0
    if not 0 < frozen < cfg.epochs:
        return _fit(spec, dist, rank, initial_epoch, history, k, [], layers)
    if initial_epoch < frozen:
        first = replace(spec, train=replace(cfg, epochs=frozen))
        _fit(first, dist, rank, initial_epoch, history, k, [], layers)
    second = rank
    # Still frozen: the first phase just ended, or a resume from its last checkpoint. (The
    # weights tell; a reloaded model's nested ``trainable`` flag does not.)
    if not rank.model.get_layer(BACKBONE_LAYER).trainable_weights:
        unfreeze(rank.model, cfg.fine_tune.unfreeze_top)
        lr = rank.scaled_lr * cfg.fine_tune.learning_rate_factor
        compile_model(rank.model, cfg, dist.wrap_optimizer, lr)
        steps = rank.steps_per_epoch
        callbacks = dist.callbacks(initial_lr=lr, warmup_epochs=0, steps_per_epoch=steps)
        second = replace(rank, scaled_lr=lr, callbacks=callbacks)
    # Early stopping may have ended the first phase sooner: go on from the epochs done.
    done = len(next(iter(history.values()), []))
    return _fit(spec, dist, second, done, history, k, [], layers)


def _fit(
    spec: WorkerSpec,
    dist: Distribution,
    rank: PreparedRank,
    initial_epoch: int,
    history: dict[str, list[float]],
    k: Any,
    extra_callbacks: list,
    layers: dict[str, dict[str, list]] | None = None,
) -> int:
    """Fit from ``initial_epoch`` to ``train.epochs`` on ``rank``'s world; return its steps.

    The training callbacks (early stopping, history, rank 0's checkpoints) go after the
    Distribution's; each completed epoch's (averaged) metrics are appended to ``history``,
    and, on rank 0 with ``train.layer_stats``, each epoch's per-layer statistics to
    ``layers`` (:data:`LAYER_RECORDS` -> dict).
    """
    cfg = spec.train
    monitor = "val_loss" if rank.validation else "loss"
    # First after the Distribution's own: every later callback (early stopping's best
    # weights, checkpoints, layer statistics) and the final weight check see the ranks'
    # batch-norm statistics made equal.
    callbacks = [*rank.callbacks, _SyncModelState(dist, k)]
    if cfg.early_stopping_patience > 0:
        # Runs after the metric averaging above, so every rank sees the same numbers and
        # stops at the same epoch (a rank that stopped alone would hang the others).
        callbacks.append(
            k.callbacks.EarlyStopping(
                monitor=monitor, patience=cfg.early_stopping_patience, restore_best_weights=True
            )
        )
    callbacks.append(_Record(history, k))
    if dist.rank == 0 and cfg.layer_stats and layers is not None:
        from pipelines.train.layer_stats import layer_stats_callback, probe_batch

        # Taken once before fit: the first rows of rank 0's (unshuffled) validation shard.
        probe = probe_batch(rank.validation.get("validation_data", rank.train_data))
        callbacks.append(layer_stats_callback(k, probe, *(layers[key] for key in LAYER_RECORDS)))
    if dist.rank == 0:
        # Horovod: checkpoints only on rank 0, so ranks never write the same file.
        callbacks.append(checkpoint_callback(spec.run_dir, history, k, layers))
    watch = []
    if dist.rank == 0 and spec.run_id:
        from pipelines.train.watch import live_metrics_callback

        # Last, after the checkpoint and Horovod elastic's commit: only committed epochs.
        watch.append(live_metrics_callback(k, spec.run_id, history, layers or {}))
    rank.model.fit(
        rank.train_data,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=rank.steps_per_epoch,
        callbacks=callbacks + extra_callbacks + watch,
        verbose=2 if dist.rank == 0 else 0,
        **rank.validation,
    )
    return rank.steps_per_epoch


def _fit_elastic(
    spec: WorkerSpec,
    dist: Distribution,
    rank: PreparedRank,
    initial_epoch: int,
    history: dict[str, list[float]],
    k: Any,
    layers: dict[str, dict[str, list]],
) -> tuple[int, list[dict[str, Any]]]:
    """Fit in Horovod elastic mode: a lost rank resets the world and training goes on.

    The state (weights, optimizer, epoch, history, world sizes) is committed at the end of
    every epoch; after a reset every rank restores the last commit, rank 0's copy is
    broadcast, and the epoch that was interrupted runs again on the ranks left.

    Returns:
        Steps per epoch of the last world, and ``[{"epoch", "size"}]``: the world size
        from each epoch on where it changed (the first entry is the start).
    """
    # Horovod: what is restored on every rank after a reset (rank 0's copy is broadcast).
    state = dist.elastic_state(
        rank.model, epoch=initial_epoch, history=history, world_sizes=[], **layers
    )
    steps: list[int] = []
    entries = 0

    # Horovod: re-entered after each reset, with the new rank and size. A rank that joins
    # later starts here too: its first collective is the state's sync, like the others'.
    @dist.elastic_run
    def loop(state: Any) -> None:
        nonlocal entries
        # Horovod: every rank learns whether one lacks its GPU, so they all stop together.
        failures = [f for f in dist.allgather(rank.device_failure, "device_check") if f]
        if failures:
            raise NoGpuError(failures[0])
        # Horovod: the first entry runs on the prepared world; a reset's, on the new one.
        world = rank if entries == 0 else rank.resharded(spec, dist)
        entries += 1
        # The global batch follows the world's size, and so does the rate (Goyal et al.);
        # the sync restored the optimizer's slots, not its rate.
        _set_learning_rate(world.model, world.scaled_lr)
        # Horovod: the state keeps references, so drop what a reset epoch appended.
        for values in state.history.values():
            del values[state.epoch :]
        if not state.world_sizes or state.world_sizes[-1]["size"] != dist.size:
            state.world_sizes.append(
                {"epoch": state.epoch, "size": dist.size, "learning_rate": world.scaled_lr}
            )
        callbacks = dist.elastic_callbacks(state)
        # The layer-stats callback drops what a reset epoch wrote (it sets index = epoch).
        restored = {key: getattr(state, key) for key in LAYER_RECORDS}
        steps.append(_fit(spec, dist, world, state.epoch, state.history, k, callbacks, restored))

    loop(state)
    final = {key: list(values) for key, values in state.history.items()}
    history.clear()  # may be state.history itself: copied first
    history.update(final)
    for key in LAYER_RECORDS:
        records = dict(getattr(state, key))
        layers[key].clear()
        layers[key].update(records)
    return steps[-1], list(state.world_sizes)


def weights_digest(model: Any) -> str:
    """SHA-256 over every weight array: equal on all ranks iff the ranks stayed in sync."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(array.tobytes())
    return digest.hexdigest()


def limit_threads(ranks_on_this_host: int, threads: int = 0) -> None:
    """Split the host's cores between the ranks on it instead of oversubscribing them.

    Args:
        ranks_on_this_host: Ranks sharing this host's cores.
        threads: Compute threads to use instead (``train.threads_per_rank``); 0 splits.
    """
    threads = threads or cores_per_process(ranks_on_this_host)
    limit_tf_threads(threads, min(2, threads))


def _SyncModelState(dist: Distribution, k: Any) -> Any:  # noqa: N802
    """A Keras callback calling ``dist.sync_model_state`` at every epoch end."""

    class SyncModelState(k.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            dist.sync_model_state(self.model)

    return SyncModelState()


def _Record(history: dict[str, list[float]], k: Any) -> Any:  # noqa: N802
    """A Keras callback appending each completed epoch's metrics to ``history``."""

    class Record(k.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            for key, value in (logs or {}).items():
                history.setdefault(key, []).append(float(value))

    return Record()
