"""Typed configuration: the only place that reads YAML.

In: ``conf/base.yaml`` (the local embedded target), an optional overlay (a YAML file, or the
name of a target that ships with the package: ``cluster``, ``databricks``), and
``--set section.key=value`` overrides, applied in that order.
Out: a frozen :class:`Config`. An unknown key, a value of the wrong type or a value out of
range fails at load time with a :class:`ConfigError` naming the key's dotted path.

The sections are frozen standard dataclasses whose annotations carry pydantic types and
bounds: pydantic validates the merged YAML into them (:func:`load_config`) and
:func:`_message` turns its first error into one line naming the dotted key. Dataclasses, not
pydantic models, because code builds sections directly and copies them with
``dataclasses.replace``, and they travel pickled to Spark executors and Horovod ranks: a
direct construction is not validated (as before) and a pickle is the same small object.

Defaults are written once, here: code builds sections with partial arguments, so the fields
need them. ``conf/base.yaml`` lists every key with the same value as the operators'
reference, and ``tests/unit/test_config.py`` fails if the two differ in a key or a value.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError

from pipelines.errors import UserError

#: The repository's conf/ folder: the targets, when running from a checkout.
_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"


def _bundled_conf() -> Path | Traversable:
    """The folder of shipped targets: conf/ of a checkout, else ``pipelines/conf`` in the wheel.

    An installed wheel (a Databricks library, a packed environment) or a zipped one on the
    executors' path (``--py-files``) has no checkout around it; the wheel carries conf/.
    """
    if (_CHECKOUT_CONF / "base.yaml").is_file():
        return _CHECKOUT_CONF
    return importlib.resources.files("pipelines") / "conf"


#: The config that ships with the package: the local embedded target.
BASE_CONF = _bundled_conf() / "base.yaml"


class ConfigError(UserError, ValueError):
    """A configuration file, overlay or override is invalid; the message names the key."""


#: Every section: an unknown key is an error, not silently dropped (pydantic's default).
_FORBID_UNKNOWN = ConfigDict(extra="forbid")


def _empty_if_none(value: Any) -> Any:
    # An overlay may leave a section empty (every key commented out): YAML reads it as null.
    return {} if value is None else value


def _reject_bool(value: Any) -> Any:
    # Literal[1, 3] would take true for 1 (bool is an int); YAML's true is never a channel count.
    if isinstance(value, bool):
        raise PydanticCustomError("literal_error", "not one of the choices")
    return value


def _scalar_to_str(value: Any) -> str:
    # Spark properties are strings; YAML gives numbers and booleans for some (true -> "true").
    if isinstance(value, Mapping | list) or value is None:
        raise PydanticCustomError("scalar_type", "expected a scalar value")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _model_name(value: Any) -> Any:
    # A zoo name or package.module:function; the message lists the choices.
    from pipelines.zoo import check_model_name

    if not isinstance(value, str):
        return value  # StrictStr names the type
    try:
        return check_model_name(value)
    except ValueError as exc:
        raise PydanticCustomError("model_name", str(exc)) from None


_SECTION = BeforeValidator(_empty_if_none)
_NO_BOOL = BeforeValidator(_reject_bool)
_Key = Annotated[str, BeforeValidator(str)]
_Scalar = Annotated[str, BeforeValidator(_scalar_to_str)]


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class SparkConfig:
    """How to reach Spark.

    Attributes:
        master: Spark master URL; ``null`` uses whatever the environment provides
            (``spark-submit --master``, a Databricks cluster). ``local[2]`` by default.
        app_name: Application name shown in the Spark UI.
        conf: Extra Spark properties, passed to the session builder as they are.
    """

    master: StrictStr | None = "local[2]"
    app_name: StrictStr = "dlpipe"
    conf: dict[_Key, _Scalar] = field(default_factory=dict)


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the prepared dataset per split; must add up to 1.

    Attributes:
        train: Share of the images for training (> 0).
        val: Share for validation during training (early stopping, learning curves).
        test: Share held out for the final evaluation, the report and promotion.
    """

    train: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.8
    val: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.1
    test: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.1


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class IngestConfig:
    """Images to prepared dataset.

    Attributes:
        source: Default source when ``--source`` is not given (``null``: the bundled digits,
            written by ``dlpipe demo-data`` under the work directory).
        output: Prepared dataset location (``null``: ``<work_dir>/datasets/prepared``).
        format: ``auto`` detects folder / MNIST IDX / CIFAR-10 from the source.
        labels: A CSV or Parquet table of ``path,label`` rows (paths relative to the
            source, or absolute inside it) that labels a folder of images instead of its
            sub-folder names (``null``: one sub-folder per class). Rows whose file is
            missing or unreadable, and images no row names, are quarantined with the reason.
        image_size: Target height and width in pixels.
        channels: 1 (grey) or 3 (RGB).
        resize: How an image that is not square becomes one: ``stretch`` squeezes the
            whole image (the aspect ratio is lost), ``crop`` takes its largest centred
            square (Keras' ``crop_to_aspect_ratio``), ``pad`` letterboxes it in black (Keras'
            ``pad_to_aspect_ratio``). The model records it; scoring, serving and explain
            decode the same way.
        storage: How each image cell is stored: ``raw`` uint8 pixels (``np.save``, what
            plain Petastorm reads), ``png`` (lossless) or ``jpeg`` (lossy, at
            ``jpeg_quality``); the feed decodes every kind, and datasets written before
            (raw) keep reading. See ``conf/base.yaml`` for the measured choice.
        jpeg_quality: JPEG quality of ``storage: jpeg``, 1-95 (Pillow's scale).
        splits: Train/val/test fractions, assigned by a hash of the relative path.
        rows_per_row_group: Rows per Parquet row group (= per file). Petastorm shards by row
            group, so keep several row groups per Horovod rank.
        row_group_size_mb: Upper bound of a row group in MB (Parquet block size).
        partitions: Spark tasks for decoding and writing (``0``: one per task slot, two when
            each still gets at least 8 row groups of images).
        max_records_per_batch: Records a task decodes at a time; bounds the decoded images
            a task holds besides its writer's buffer.
    """

    source: StrictStr | None = None
    output: StrictStr | None = None
    format: Literal["auto", "folder", "mnist-idx", "cifar10"] = "auto"
    labels: StrictStr | None = None
    image_size: Annotated[StrictInt, Field(ge=4, le=4096)] = 28
    channels: Annotated[Literal[1, 3], _NO_BOOL] = 1
    resize: Literal["stretch", "crop", "pad"] = "stretch"
    storage: Literal["raw", "png", "jpeg"] = "jpeg"
    jpeg_quality: Annotated[StrictInt, Field(ge=1, le=95)] = 90
    splits: Annotated[SplitConfig, _SECTION] = field(default_factory=SplitConfig)
    rows_per_row_group: Annotated[StrictInt, Field(ge=1)] = 128
    row_group_size_mb: Annotated[StrictInt, Field(ge=1, le=1024)] = 64
    partitions: Annotated[StrictInt, Field(ge=0)] = 0
    max_records_per_batch: Annotated[StrictInt, Field(ge=1)] = 512


#: The environment variable through which each of :class:`HorovodConfig`'s knobs reaches
#: Horovod (the others are arguments of its ``DistributedOptimizer``).
HOROVOD_ENV_VARIABLES = {
    "fusion_threshold_mb": "HOROVOD_FUSION_THRESHOLD",
    "cycle_time_ms": "HOROVOD_CYCLE_TIME",
    "autotune": "HOROVOD_AUTOTUNE",
}


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class HorovodConfig:
    """Horovod's own performance knobs (``train.horovod``), applied in every rank.

    Attributes:
        fusion_threshold_mb: Largest tensor-fusion buffer in MiB: gradients ready at once
            are packed into one allreduce up to this size; 0 turns fusion off. Null keeps
            Horovod's default (128) or ``HOROVOD_FUSION_THRESHOLD`` from the environment.
        cycle_time_ms: How long Horovod's background thread waits between fusion cycles;
            longer batches more tensors per allreduce, at more latency per step. Null keeps
            Horovod's default (1) or ``HOROVOD_CYCLE_TIME``.
        compression: ``fp16`` sends gradients as float16 (half the bytes on the wire, a
            rounding of each averaged gradient) or ``none``.
        backward_passes_per_step: Gradients of this many batches are summed locally before
            one allreduce (fewer, larger exchanges; the optimizer steps once per group).
        autotune: Let Horovod tune fusion threshold and cycle time itself during the first
            steps (``HOROVOD_AUTOTUNE``); overrides the two values above while it searches.
    """

    fusion_threshold_mb: Annotated[StrictInt, Field(ge=0, le=4096)] | None = None
    cycle_time_ms: Annotated[StrictFloat, Field(gt=0, le=1000)] | None = None
    compression: Literal["none", "fp16"] = "none"
    backward_passes_per_step: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    autotune: StrictBool = False

    def environment(self) -> dict[str, str]:
        """The ``HOROVOD_*`` variables these settings mean (read by ``hvd.init()``)."""
        names, env = HOROVOD_ENV_VARIABLES, {}
        if self.fusion_threshold_mb is not None:
            env[names["fusion_threshold_mb"]] = str(self.fusion_threshold_mb * 1024 * 1024)
        if self.cycle_time_ms is not None:
            env[names["cycle_time_ms"]] = repr(float(self.cycle_time_ms))
        if self.autotune:
            env[names["autotune"]] = "1"
        return env


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class FineTuneConfig:
    """Two-phase transfer learning of a backbone model (``train.fine_tune``).

    Attributes:
        frozen_epochs: Epochs with the backbone frozen (only the new head trains, batch
            normalisation in inference mode); then the second phase. 0: no frozen phase,
            the whole model trains from the first epoch; ``>= train.epochs``: the backbone
            stays frozen (feature extraction).
        unfreeze_top: Backbone layers unfrozen for the second phase, counted from its
            output; 0 unfreezes all of them.
        learning_rate_factor: The second phase's learning rate is ``train.learning_rate``
            times this (lower, so pretrained features are adjusted, not overwritten).
    """

    frozen_epochs: Annotated[StrictInt, Field(ge=0)] = 0
    unfreeze_top: Annotated[StrictInt, Field(ge=0)] = 0
    learning_rate_factor: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.1


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class TrainConfig:
    """Model and training hyper-parameters.

    Attributes:
        model: Model-zoo name (``mobilenet_v2``, ``efficientnet_b0`` and ``resnet50`` are
            Keras Applications backbones for transfer learning), or ``package.module:function``:
            a function of ``(input_shape, num_classes)`` returning an uncompiled Keras
            classifier (softmax output), importable on every rank.
        pretrained: A backbone's starting weights: ``imagenet`` (Keras' cache,
            ``~/.keras/models``, fetched when missing), ``none`` (random) or the path of a
            weights file readable on every rank (e.g. a Keras ``*_notop.h5``).
        backbone_alpha: ``mobilenet_v2``'s width multiplier (ImageNet weights exist for
            0.35, 0.5, 0.75, 1.0, 1.3 and 1.4).
        fine_tune: The two-phase schedule of a backbone (:class:`FineTuneConfig`).
        init_from: Start from the weights of a registered model, ``models:/NAME@ALIAS`` or
            ``models:/NAME/VERSION`` (layers of the same name and shape; a head for other
            classes starts anew); null: no warm start.
        activation: Hidden-layer activation.
        optimizer: ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``adam``.
        learning_rate: Base learning rate for one rank; scaled by the number of ranks.
        batch_size: Batch size per rank.
        epochs: Maximum number of epochs.
        dropout: Dropout rate where the model has dropout.
        augment_shift: Training images are shifted at random by up to this fraction of
            their height and width, anew every epoch (0: off).
        augment_rotation_deg: ... and rotated at random by up to this many degrees either
            way (0: off). Evaluation, scoring and serving see the images unchanged.
        augment_flip: Photos: mirror half of the training images left to right, anew every
            epoch (off for digits and text, whose mirror image is another thing).
        augment_crop_scale: Photos: random resized crop of each training image, covering
            between this fraction and all of its area, aspect ratio 3/4 to 4/3, resized back
            (1: off; 0.08 is the Inception/torchvision default, 0.3-0.5 gentler).
        augment_brightness: Photos: a random brightness offset up to this either way, on
            the 0-1 pixel scale (0: off).
        augment_contrast: Photos: contrast scaled by a random factor within 1 +- this
            (0: off). All augmentation is seeded by ``seed``: the same seed, the same images.
        weight_decay: L2 penalty on weights.
        hidden_units: Width of dense hidden layers (``mlp``, dense ``autoencoder``).
        latent_dim: Bottleneck width of the ``autoencoder``.
        num_proc: Horovod ranks (one Spark task slot each).
        threads_per_rank: TensorFlow compute threads per rank; 0 divides the host's cores
            among the ranks on it (Spark executors sharing a host oversubscribe it if each
            rank takes every core).
        warmup_epochs: Epochs of learning-rate warm-up from the single-rank rate.
        early_stopping_patience: Epochs without val improvement before stopping (0: off).
        seed: Random seed for weights and shuffling.
        launcher: ``horovod`` (on Spark executors) or ``local`` (one rank in-process) on
            the default stack; ``keras`` (Keras 3 on JAX, ranks as Spark barrier tasks) on
            the Keras stack (``make venv STACK=keras``), where ``horovod`` also runs as
            ``keras`` (Horovod cannot be installed there), so one config serves both
            stacks. Elastic mode needs ``horovod`` on the default stack.
        slots_timeout_s: How long training waits for a cluster's executors to offer
            ``num_proc`` task slots before failing (executors register after the
            application starts); a local master's slots are checked before any Spark work.
        nics: Network interfaces Horovod's ranks talk over (e.g. ``[eth0]``); empty lets
            Horovod pick among those every task shares. Name one where nodes have several
            (a wrong pick is a known cause of start-up hangs).
        tsne: Add a t-SNE projection of the test embeddings to the run report (slower than
            the PCA that is always drawn).
        use_gpu: ``false`` (every rank on its CPU, GPUs hidden), ``true`` (each rank pins
            the GPU of its local rank; no GPU is an error) or ``auto`` (a GPU where there is
            one, else the CPU). What each rank used is tagged on the run (``devices``).
        mixed_precision: Train with Keras' ``mixed_float16`` policy (float32 outputs and
            loss scaling); needs ``use_gpu`` true or auto. The saved model is float32.
        elastic: Horovod elastic mode (``horovod.spark.run_elastic``): a lost rank resets
            the world and the ranks left finish the epochs; the state is committed every
            epoch; the learning rate follows the world's size. A local master is given the
            task retries it needs (``local[N]`` runs as ``local[N,4]``).
        min_num_proc: Elastic mode: the fewest ranks training goes on with.
        rank_timeout_s: How long a rank waits in a collective for a peer that went silent
            before the job fails (Gloo's timeout; a killed rank is noticed at once), and,
            in elastic mode, how long to wait for ``min_num_proc`` ranks after a reset.
        layer_stats: Rank 0 records, at every epoch end, each weighted layer's weight and
            gradient norms, update-to-weight ratio, activation min/max/mean and weight and
            gradient histograms on a fixed probe batch (MLflow metrics ``layer/...``).
        grad_vanish_below: The run report flags a layer whose probe-batch gradient norm
            falls below this (vanishing gradient).
        grad_explode_above: The run report flags a layer whose probe-batch gradient norm
            rises above this, or is not finite (exploding gradient).
        horovod: Horovod's performance knobs (:class:`HorovodConfig`).
    """

    model: Annotated[StrictStr, BeforeValidator(_model_name)] = "mnist_cnn"
    pretrained: StrictStr = "none"
    backbone_alpha: Annotated[StrictFloat, Field(gt=0, le=2)] = 1.0
    fine_tune: Annotated[FineTuneConfig, _SECTION] = field(default_factory=FineTuneConfig)
    init_from: StrictStr | None = None
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    optimizer: Literal["sgd", "momentum", "adam"] = "adam"
    learning_rate: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.0005
    batch_size: Annotated[StrictInt, Field(ge=1)] = 32
    epochs: Annotated[StrictInt, Field(ge=1)] = 40
    dropout: Annotated[StrictFloat, Field(ge=0, le=0.95)] = 0.25
    augment_shift: Annotated[StrictFloat, Field(ge=0, le=0.5)] = 0.1
    augment_rotation_deg: Annotated[StrictFloat, Field(ge=0, le=180)] = 18.0
    augment_flip: StrictBool = False
    augment_crop_scale: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0
    augment_brightness: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.0
    augment_contrast: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.0
    weight_decay: Annotated[StrictFloat, Field(ge=0)] = 0.0
    hidden_units: Annotated[StrictInt, Field(ge=1)] = 128
    latent_dim: Annotated[StrictInt, Field(ge=1)] = 32
    num_proc: Annotated[StrictInt, Field(ge=1)] = 2
    threads_per_rank: Annotated[StrictInt, Field(ge=0)] = 0
    warmup_epochs: Annotated[StrictInt, Field(ge=0)] = 1
    early_stopping_patience: Annotated[StrictInt, Field(ge=0)] = 8
    seed: StrictInt = 42
    launcher: Literal["horovod", "keras", "local"] = "horovod"
    slots_timeout_s: Annotated[StrictFloat, Field(ge=0)] = 120.0
    nics: list[StrictStr] = field(default_factory=list)
    tsne: StrictBool = False
    use_gpu: StrictBool | Literal["auto"] = False
    mixed_precision: StrictBool = False
    elastic: StrictBool = False
    min_num_proc: Annotated[StrictInt, Field(ge=1)] = 1
    rank_timeout_s: Annotated[StrictInt, Field(ge=1)] = 60
    layer_stats: StrictBool = True
    grad_vanish_below: Annotated[StrictFloat, Field(ge=0)] = 1.0e-7
    grad_explode_above: Annotated[StrictFloat, Field(gt=0)] = 1000.0
    horovod: Annotated[HorovodConfig, _SECTION] = field(default_factory=HorovodConfig)

    def __post_init__(self) -> None:
        from pipelines.zoo import BACKBONES

        backbone = self.model in BACKBONES
        if not backbone and (self.pretrained != "none" or self.fine_tune.frozen_epochs > 0):
            key = "pretrained" if self.pretrained != "none" else "fine_tune.frozen_epochs"
            raise ConfigError(
                f"train.{key} applies to the backbones ({', '.join(BACKBONES)}), "
                f"not to train.model={self.model}"
            )
        if self.fine_tune.frozen_epochs > 0 and self.elastic:
            raise ConfigError(
                "train.fine_tune.frozen_epochs needs train.elastic=false (the second phase "
                "recompiles the model, which elastic mode's committed state cannot follow)"
            )
        if self.grad_vanish_below >= self.grad_explode_above:
            raise ConfigError(
                f"train.grad_vanish_below ({self.grad_vanish_below}) must be below "
                f"train.grad_explode_above ({self.grad_explode_above})"
            )
        if self.elastic and self.launcher == "keras":
            raise ConfigError(
                "train.elastic=true needs train.launcher=horovod (the keras launcher has no "
                "elastic mode; a failed job resumes from its last checkpoint with --resume)"
            )
        if self.mixed_precision and self.use_gpu is False:
            # float16 is emulated on CPUs: many times slower than float32, never what one wants.
            raise ConfigError(
                "train.mixed_precision=true needs train.use_gpu=true or auto "
                "(mixed float16 on a CPU is many times slower than float32)"
            )


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class MlflowConfig:
    """Tracking and registry.

    Attributes:
        tracking_uri: ``null``: ``MLFLOW_TRACKING_URI`` if set, else a sqlite file in the
            work directory.
        registry_uri: Model registry URI when it is not the tracking store's own, e.g.
            ``databricks-uc`` (Unity Catalog; model names are then ``catalog.schema.model``).
            ``null``: MLflow's default (``MLFLOW_REGISTRY_URI``, else the tracking URI).
        experiment: Experiment name.
        model_name: Registered model name.
        champion_alias: Alias moved to a new version only when it beats the current one.
        telemetry: MLflow's usage telemetry (MLflow 3 sends it to its makers by default).
            ``false``: off in dlpipe's driver, executors and ranks
            (``MLFLOW_DISABLE_TELEMETRY``, unless the environment sets it already): a batch
            job sends nothing off the cluster, and its end does not wait for the sender.
            ``true``: as MLflow decides.
    """

    tracking_uri: StrictStr | None = None
    registry_uri: StrictStr | None = None
    experiment: StrictStr = "spark-dl-pipelines"
    model_name: StrictStr = "digits-classifier"
    champion_alias: StrictStr = "champion"
    telemetry: StrictBool = False


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class RegistryConfig:
    """When a newly trained version takes the champion alias.

    Before the alias moves, the champion is evaluated on the new run's test split, and the
    two models are compared on that one split.

    Attributes:
        metric: What a classifier is judged by: ``accuracy``, ``macro_f1`` (the mean of the
            per-class F1 scores: every class counts alike, whatever its size) or
            ``log_loss`` (lower is better). A reconstruction model keeps its own metric
            (``reconstruction_error``, lower is better).
        min_improvement: How much better (in the metric's units) the new version must be
            to take the alias; 0 promotes on any strict improvement.
        incomparable: What happens when the champion cannot be evaluated on the new split
            (other classes, input shape or task; its files gone): ``promote`` the new
            version (it answers the dataset as it now is) or ``keep`` the champion.
    """

    metric: Literal["accuracy", "macro_f1", "log_loss"] = "accuracy"
    min_improvement: Annotated[StrictFloat, Field(ge=0)] = 0.0
    incomparable: Literal["promote", "keep"] = "promote"


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring.

    Attributes:
        model: Model URI (``null``: ``models:/<mlflow.model_name>@<mlflow.champion_alias>``).
        source: Default source when ``--source`` is not given.
        source_format: ``auto`` (a table when the source is one by content: a Parquet file
            with a valid footer and ``path`` + ``image_column`` columns; else a folder of
            images), ``table`` or ``images`` (``--source-format``).
        table: Scoring table location (``null``: ``<work_dir>/tables/scores``).
        format: ``parquet`` (local) or ``delta`` (Databricks).
        image_column: Binary column of a table source (``path`` names the image).
        arrow_batch_size: Rows per Arrow batch into the model; bounds executor memory.
        use_gpu: ``false`` (CPU, GPUs hidden), ``true`` (each Python worker pins a GPU; no
            GPU is an error) or ``auto`` (a GPU where there is one).
        only_new: Skip the files that an earlier batch scored without error with the same
            model version (see ``identity``); the batch being rewritten does not count.
        identity: What makes a file "the same" for ``only_new``: ``stat`` (path, size and
            modification time) or ``sha256`` (path and a digest of the content: each
            file is read once more before scoring).
        rescore_on_new_version: With ``only_new``, a new model version scores every file
            again; ``false`` skips files scored by any version of the model.
        top_k: How many of the most probable classes ``top_labels``/``top_probabilities``
            hold (0: none, the columns are null).
        low_confidence_below: A prediction whose probability is below this counts as low
            confidence in the batch summary.
        log_summary: Log each batch's summary to MLflow, as a run of its own in
            ``experiment``.
        experiment: The MLflow experiment of the batch summaries (``null``:
            ``<mlflow.experiment>-scoring``).
    """

    model: StrictStr | None = None
    source: StrictStr | None = None
    source_format: Literal["auto", "table", "images"] = "auto"
    table: StrictStr | None = None
    format: Literal["parquet", "delta"] = "parquet"
    image_column: StrictStr = "content"
    arrow_batch_size: Annotated[StrictInt, Field(ge=1)] = 256
    use_gpu: StrictBool | Literal["auto"] = False
    only_new: StrictBool = False
    identity: Literal["stat", "sha256"] = "stat"
    rescore_on_new_version: StrictBool = True
    top_k: Annotated[StrictInt, Field(ge=0, le=1000)] = 3
    low_confidence_below: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.5
    log_summary: StrictBool = True
    experiment: StrictStr | None = None


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class ServeConfig:
    """REST serving (``dlpipe serve``).

    Attributes:
        max_body_mb: Largest request body in MiB; a larger one gets 413 before it is read or
            decoded. 32 takes a batch of 256 web-sized JPEGs (about 90 KB each) after
            base64's 4/3 growth, or some 20 phone photos; a request is held about four times
            over while it is decoded, so this also bounds the memory of one request.
        stop_timeout_s: Seconds SIGTERM/SIGINT waits for requests in flight before the
            server stops anyway.
    """

    max_body_mb: Annotated[StrictFloat, Field(gt=0, le=4096)] = 32.0
    stop_timeout_s: Annotated[StrictFloat, Field(gt=0, le=600)] = 5.0


@with_config(_FORBID_UNKNOWN)
@dataclass(frozen=True)
class Config:
    """The whole resolved configuration.

    Attributes:
        work_dir: One directory for everything local: datasets, MLflow store, tables.
    """

    work_dir: StrictStr = "work"
    spark: Annotated[SparkConfig, _SECTION] = field(default_factory=SparkConfig)
    ingest: Annotated[IngestConfig, _SECTION] = field(default_factory=IngestConfig)
    train: Annotated[TrainConfig, _SECTION] = field(default_factory=TrainConfig)
    mlflow: Annotated[MlflowConfig, _SECTION] = field(default_factory=MlflowConfig)
    registry: Annotated[RegistryConfig, _SECTION] = field(default_factory=RegistryConfig)
    score: Annotated[ScoreConfig, _SECTION] = field(default_factory=ScoreConfig)
    serve: Annotated[ServeConfig, _SECTION] = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain nested dicts (for logging as MLflow params)."""
        return asdict(self)


@functools.cache
def _adapter() -> TypeAdapter[Config]:
    """The validator of :class:`Config`, built on first use (executors never load YAML)."""
    return TypeAdapter(Config)


#: What a type error expected, by pydantic error type.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
    "scalar_type": "a scalar value",
}
#: Bound errors: the constraint in the error's context and how to write it.
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
}


def _message(exc: ValidationError) -> str:
    """Pydantic's first error as one line: the dotted key, then what is wrong with it.

    An unknown key comes first (the shallowest, then alphabetically): a typo is the likelier
    cause of whatever else fails. The error's location is walked through the sections' type
    hints, which give the keys known at that level, the dotted form of list indexes and dict
    keys, and the choices of a literal or of a union such as ``use_gpu``.
    """
    error = min(exc.errors(), key=_unknown_first)
    if error["type"] == "value_error" and isinstance(error["ctx"]["error"], ConfigError):
        return str(error["ctx"]["error"])  # a cross-field check in a __post_init__
    hint: Any = Config
    path = ""
    for part in error["loc"]:
        if is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            key = f"{path}.{part}" if path else str(part)
            if part not in hints:
                known = ", ".join(sorted(hints))
                return f"unknown config key {key} (known in {path or 'the top level'}: {known})"
            path, hint = key, hints[part]
        elif typing.get_origin(hint) is list:
            path, hint = f"{path}[{part}]", typing.get_args(hint)[0]
        elif typing.get_origin(hint) is dict:
            path, hint = f"{path}.{part}", typing.get_args(hint)[1]
        else:
            break  # the member tag of a union: the message names all of its choices
    value, kind, path = error["input"], error["type"], path or "the top level"
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        bound = error["ctx"][name]
        if isinstance(bound, float):  # a float field: show the value widened, the bound short
            value, bound = float(value), f"{bound:g}"
        return f"{path}: {value} is out of range (must be {sign} {bound})"
    if choices := _choices(hint):
        return f"{path}: {value!r} is not one of {choices}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {_describe(value)}"
    return f"{path}: {error['msg']}"  # pragma: no cover - pydantic checks nothing else here


def _unknown_first(error: Any) -> tuple[int, int, list[str]]:
    """Sort key: unknown keys first, the shallowest then alphabetically; others as they come."""
    if error["type"] != "unexpected_keyword_argument":
        return 1, 0, []
    return 0, len(error["loc"]), [str(part) for part in error["loc"]]


def _choices(hint: Any) -> str:
    """The values a user may write for a literal or a union such as ``use_gpu``, else ``""``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return ", ".join(repr(a) for a in args)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) > 1:
        return ", ".join(
            "true, false" if a is bool else _choices(a) or f"a {a.__name__}" for a in args
        )
    return ""


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated configuration and where each of its values came from.

    Attributes:
        config: The configuration.
        sources: Dotted key of every value (a ``spark.conf`` entry is one key) -> ``base``,
            ``overlay <file>`` or ``--set``.
    """

    config: Config
    sources: dict[str, str]


def load_config(
    overlay: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: str | os.PathLike | Traversable = BASE_CONF,
) -> Config:
    """Load base YAML, merge an overlay, apply ``section.key=value`` overrides, validate.

    Args:
        overlay: Optional YAML file merged over the base (e.g. ``conf/databricks.yaml``), or
            the name of a shipped target (``databricks`` = ``conf/databricks.yaml``, found
            inside the installed package too).
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars. Below a
            mapping of free keys (``spark.conf``) the rest of the key is one key, dots and
            all: ``spark.conf.spark.executor.memory=8g``.
        base: The base YAML file.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: A file is missing or malformed, or a key is unknown, mistyped or out
            of range. The message names the key's dotted path.
    """
    return resolve_config(overlay, overrides, base).config


def resolve_config(
    overlay: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    base: str | os.PathLike | Traversable = BASE_CONF,
) -> ResolvedConfig:
    """:func:`load_config`, with the source of every value (``dlpipe config show``)."""
    base_file = base if isinstance(base, Traversable) else Path(base)
    merged = _read_yaml(base_file)
    sources = dict.fromkeys(_leaves(merged), "base")
    if overlay:
        layer = _read_yaml(_overlay_file(str(overlay)))
        merged = _deep_merge(merged, layer, "")
        sources.update(dict.fromkeys(_leaves(layer), f"overlay {overlay}"))
    for override in overrides:
        key, value = _parse_override(override)
        layer = _nest(_key_path(key), value)
        merged = _deep_merge(merged, layer, "")
        sources.update(dict.fromkeys(_leaves(layer), "--set"))
    try:
        config = _adapter().validate_python(merged)
    except ValidationError as exc:
        raise ConfigError(_message(exc)) from None
    _check_splits(config.ingest.splits)
    return ResolvedConfig(config, sources)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of a merged YAML tree's values (an empty mapping is a value)."""
    keys = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _key_path(key: str) -> list[str]:
    """The parts of a dotted ``--set`` key, walked along the sections' fields.

    Below a mapping of free keys (``spark.conf``) the rest is one key, as Spark property
    names have dots of their own; quotes around it are dropped
    (``spark.conf."spark.executor.memory"``). Unknown parts are kept as they are, for the
    validation to name.
    """
    parts = key.split(".")
    hint: Any = Config
    for depth, part in enumerate(parts):
        if not is_dataclass(hint):  # a value has no keys below it
            value = ".".join(parts[:depth])
            raise ConfigError(f"unknown config key {key} ({value} is a value, not a section)")
        hints = typing.get_type_hints(hint)
        if part not in hints:
            break
        hint = hints[part]
        rest = parts[depth + 1 :]
        if typing.get_origin(hint) is dict and rest:
            return [*parts[: depth + 1], ".".join(rest).strip("\"'")]
    return parts


def bundled_targets() -> list[str]:
    """Names accepted by ``--config NAME``: the overlays shipped in conf/."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in _bundled_conf().iterdir()
        if entry.name.endswith(".yaml") and entry.name != "base.yaml"
    )


def _overlay_file(overlay: str) -> Path | Traversable:
    """A file path as given, else the shipped target of that name."""
    path = Path(overlay).expanduser()
    if path.is_file() or os.sep in overlay or overlay.endswith((".yaml", ".yml")):
        return path
    if overlay in bundled_targets():
        return _bundled_conf() / f"{overlay}.yaml"
    raise ConfigError(
        f"config file not found: {overlay} (not a file, nor a shipped target: "
        f"{', '.join(bundled_targets())})"
    )


def _read_yaml(path: Path | Traversable) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in _key_path(key)):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: _nest(parts[1:], value)}


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _deep_merge(dict(result[key]), value, f"{prefix}{key}.")
        else:
            result[key] = value
    return result


def _check_splits(splits: SplitConfig) -> None:
    total = splits.train + splits.val + splits.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"ingest.splits: train + val + test must add up to 1, got {total:g}")
    if splits.train <= 0:
        raise ConfigError("ingest.splits.train: must be > 0")
