"""Typed configuration: the only place that reads YAML.

In: ``conf/base.yaml`` (the local embedded target), an optional overlay (a YAML file, or the
name of a target that ships with the package: ``cluster``, ``databricks``), and
``--set section.key=value`` overrides, applied in that order.
Out: a frozen :class:`Config`. An unknown key, a value of the wrong type or a value out of
range fails at load time with a :class:`ConfigError` naming the key's dotted path.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

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


def _range(ge: float | None = None, le: float | None = None, gt: float | None = None) -> dict:
    """Field metadata with inclusive/exclusive bounds, checked at load."""
    return {"ge": ge, "le": le, "gt": gt}


@dataclass(frozen=True)
class SparkConfig:
    """How to reach Spark.

    Attributes:
        master: Spark master URL; ``null`` uses whatever the environment provides
            (``spark-submit --master``, a Databricks cluster). ``local[2]`` by default.
        app_name: Application name shown in the Spark UI.
        conf: Extra Spark properties, passed to the session builder as they are.
    """

    master: str | None = "local[2]"
    app_name: str = "dlpipe"
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the prepared dataset per split; must add up to 1."""

    train: float = field(default=0.8, metadata=_range(ge=0, le=1))
    val: float = field(default=0.1, metadata=_range(ge=0, le=1))
    test: float = field(default=0.1, metadata=_range(ge=0, le=1))


@dataclass(frozen=True)
class IngestConfig:
    """Images to prepared dataset.

    Attributes:
        source: Default source when ``--source`` is not given (``null``: the bundled digits,
            written by ``dlpipe demo-data`` under the work directory).
        output: Prepared dataset location (``null``: ``<work_dir>/datasets/prepared``).
        format: ``auto`` detects folder / MNIST IDX / CIFAR-10 from the source.
        image_size: Target height and width in pixels.
        channels: 1 (grey) or 3 (RGB).
        splits: Train/val/test fractions, assigned by a hash of the relative path.
        rows_per_row_group: Rows per Parquet row group (= per file). Petastorm shards by row
            group, so keep several row groups per Horovod rank.
        row_group_size_mb: Upper bound of a row group in MB (Parquet block size).
        partitions: Spark tasks for decoding and writing (``0``: one per task slot, two when
            each still gets at least 8 row groups of images).
        max_records_per_batch: Arrow batch size of the decode UDF; keeps wide rows in bounds.
    """

    source: str | None = None
    output: str | None = None
    format: Literal["auto", "folder", "mnist-idx", "cifar10"] = "auto"
    image_size: int = field(default=28, metadata=_range(ge=4, le=4096))
    channels: Literal[1, 3] = 1
    splits: SplitConfig = field(default_factory=SplitConfig)
    rows_per_row_group: int = field(default=128, metadata=_range(ge=1))
    row_group_size_mb: int = field(default=64, metadata=_range(ge=1, le=1024))
    partitions: int = field(default=0, metadata=_range(ge=0))
    max_records_per_batch: int = field(default=512, metadata=_range(ge=1))


@dataclass(frozen=True)
class TrainConfig:
    """Model and training hyper-parameters.

    Attributes:
        model: Model-zoo name.
        activation: Hidden-layer activation.
        optimizer: ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``adam``.
        learning_rate: Base learning rate for one rank; scaled by the number of ranks.
        batch_size: Batch size per rank.
        epochs: Maximum number of epochs.
        dropout: Dropout rate where the model has dropout.
        weight_decay: L2 penalty on weights.
        hidden_units: Width of dense hidden layers (``mlp``, dense ``autoencoder``).
        latent_dim: Bottleneck width of the ``autoencoder``.
        num_proc: Horovod ranks (one Spark task slot each).
        warmup_epochs: Epochs of learning-rate warm-up from the single-rank rate.
        early_stopping_patience: Epochs without val improvement before stopping (0: off).
        seed: Random seed for weights and shuffling.
        launcher: ``horovod`` (on Spark executors) or ``local`` (one rank in-process).
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
            epoch. Locally it needs a master that retries tasks, ``local[N,F]`` with F > 1.
        min_num_proc: Elastic mode: the fewest ranks training goes on with.
        rank_timeout_s: How long a rank waits in a collective for a peer that went silent
            before the job fails (Gloo's timeout; a killed rank is noticed at once), and,
            in elastic mode, how long to wait for ``min_num_proc`` ranks after a reset.
    """

    model: Literal["mlp", "lenet5", "mnist_cnn", "resnet_small", "autoencoder"] = "mnist_cnn"
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    optimizer: Literal["sgd", "momentum", "adam"] = "adam"
    learning_rate: float = field(default=0.0005, metadata=_range(gt=0, le=10))
    batch_size: int = field(default=32, metadata=_range(ge=1))
    epochs: int = field(default=40, metadata=_range(ge=1))
    dropout: float = field(default=0.25, metadata=_range(ge=0, le=0.95))
    weight_decay: float = field(default=0.0, metadata=_range(ge=0))
    hidden_units: int = field(default=128, metadata=_range(ge=1))
    latent_dim: int = field(default=32, metadata=_range(ge=1))
    num_proc: int = field(default=2, metadata=_range(ge=1))
    warmup_epochs: int = field(default=1, metadata=_range(ge=0))
    early_stopping_patience: int = field(default=8, metadata=_range(ge=0))
    seed: int = 42
    launcher: Literal["horovod", "local"] = "horovod"
    slots_timeout_s: float = field(default=120.0, metadata=_range(ge=0))
    nics: list[str] = field(default_factory=list)
    tsne: bool = False
    use_gpu: bool | Literal["auto"] = False
    mixed_precision: bool = False
    elastic: bool = False
    min_num_proc: int = field(default=1, metadata=_range(ge=1))
    rank_timeout_s: int = field(default=60, metadata=_range(ge=1))

    def __post_init__(self) -> None:
        if self.mixed_precision and self.use_gpu is False:
            # float16 is emulated on CPUs: many times slower than float32, never what one wants.
            raise ConfigError(
                "train.mixed_precision=true needs train.use_gpu=true or auto "
                "(mixed float16 on a CPU is many times slower than float32)"
            )


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
    """

    tracking_uri: str | None = None
    registry_uri: str | None = None
    experiment: str = "spark-dl-pipelines"
    model_name: str = "digits-classifier"
    champion_alias: str = "champion"


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring.

    Attributes:
        model: Model URI (``null``: ``models:/<mlflow.model_name>@<mlflow.champion_alias>``).
        source: Default source when ``--source`` is not given.
        table: Scoring table location (``null``: ``<work_dir>/tables/scores``).
        format: ``parquet`` (local) or ``delta`` (Databricks).
        image_column: Binary column of a table source (``path`` names the image).
        arrow_batch_size: Rows per Arrow batch into the model; bounds executor memory.
        use_gpu: ``false`` (CPU, GPUs hidden), ``true`` (each Python worker pins a GPU; no
            GPU is an error) or ``auto`` (a GPU where there is one).
    """

    model: str | None = None
    source: str | None = None
    table: str | None = None
    format: Literal["parquet", "delta"] = "parquet"
    image_column: str = "content"
    arrow_batch_size: int = field(default=256, metadata=_range(ge=1))
    use_gpu: bool | Literal["auto"] = False


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

    max_body_mb: float = field(default=32.0, metadata=_range(gt=0, le=4096))
    stop_timeout_s: float = field(default=5.0, metadata=_range(gt=0, le=600))


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration.

    Attributes:
        work_dir: One directory for everything local: datasets, MLflow store, tables.
    """

    work_dir: str = "work"
    spark: SparkConfig = field(default_factory=SparkConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def work_path(self) -> Path:
        """The work directory as an absolute path."""
        return Path(self.work_dir).expanduser().resolve()

    @property
    def prepared_path(self) -> Path:
        """Where the prepared dataset goes unless told otherwise."""
        if self.ingest.output:
            return Path(self.ingest.output).expanduser().resolve()
        return self.work_path / "datasets" / "prepared"

    @property
    def table_path(self) -> str:
        """Where batch scoring writes unless told otherwise."""
        return self.score.table or str(self.work_path / "tables" / "scores")

    @property
    def demo_data_path(self) -> Path:
        """Where ``dlpipe demo-data`` writes the bundled digits by default."""
        return self.work_path / "demo-digits"

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: config, then ``MLFLOW_TRACKING_URI``, then local sqlite."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.work_path / 'mlflow.db'}"

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain nested dicts (for logging as MLflow params)."""
        return dataclasses.asdict(self)


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
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars.
        base: The base YAML file.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: A file is missing or malformed, or a key is unknown, mistyped or out
            of range. The message names the key's dotted path.
    """
    merged = _read_yaml(base if isinstance(base, Traversable) else Path(base))
    if overlay:
        merged = _deep_merge(merged, _read_yaml(_overlay_file(str(overlay))), "")
    for override in overrides:
        key, value = _parse_override(override)
        merged = _deep_merge(merged, _nest(key.split("."), value), "")
    config = _build(Config, merged, "")
    _check_splits(config.ingest.splits)
    return config


def bundled_targets() -> list[str]:
    """Names accepted by ``--conf NAME``: the overlays shipped in conf/."""
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
    if not sep or not key or any(not part for part in key.split(".")):
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


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys, types and ranges."""
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known in {where}: {known})")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        kwargs[name] = _coerce(hints[name], value, dotted)
        _check_range(fields[name].metadata, kwargs[name], dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    """Check ``value`` against type ``hint``; return it (ints widen to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, dotted)
        for candidate in inner:  # e.g. bool | Literal["auto"]: the first that fits
            try:
                return _coerce(candidate, value, dotted)
            except ConfigError:
                pass
        choices = ", ".join(_choices(a) for a in inner)
        raise ConfigError(f"{dotted}: {value!r} is not one of {choices}")
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{dotted}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{dotted}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{dotted}: expected a mapping, got {_describe(value)}")
        return {str(k): _scalar_to_str(v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{dotted}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{dotted}: unsupported config type {hint!r}")  # pragma: no cover


def _choices(hint: Any) -> str:
    """A union member as the values a user may write, for error messages."""
    if hint is bool:
        return "true, false"
    if typing.get_origin(hint) is Literal:
        return ", ".join(repr(a) for a in typing.get_args(hint))
    return f"a {getattr(hint, '__name__', hint)}"


def _scalar_to_str(value: Any, dotted: str) -> str:
    if isinstance(value, Mapping | list) or value is None:
        raise ConfigError(f"{dotted}: expected a scalar value, got {_describe(value)}")
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _check_range(meta: Mapping[str, Any], value: Any, dotted: str) -> None:
    if value is None or not meta:
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{dotted}: {value} is out of range (must be >= {meta['ge']})")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{dotted}: {value} is out of range (must be > {meta['gt']})")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{dotted}: {value} is out of range (must be <= {meta['le']})")


def _check_splits(splits: SplitConfig) -> None:
    total = splits.train + splits.val + splits.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"ingest.splits: train + val + test must add up to 1, got {total:g}")
    if splits.train <= 0:
        raise ConfigError("ingest.splits.train: must be > 0")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
