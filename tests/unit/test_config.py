import dataclasses
import pickle
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    BASE_CONF,
    Config,
    ConfigError,
    SplitConfig,
    TrainConfig,
    load_config,
)
from pipelines.store import Store


def test_base_yaml_matches_dataclass_defaults():
    # conf/base.yaml documents every key; it must say exactly what the code defaults to.
    assert load_config() == Config()


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(FrozenInstanceError):
        config.work_dir = "elsewhere"


def test_overlay_then_overrides_apply_in_order(tmp_path: Path):
    overlay = tmp_path / "target.yaml"
    overlay.write_text("train:\n  epochs: 5\n  batch_size: 48\nspark:\n  master: null\n")
    config = load_config(
        overlay, ["train.epochs=7", "ingest.splits.val=0.15", "ingest.splits.test=0.05"]
    )
    assert config.train.epochs == 7
    assert config.train.batch_size == 48
    assert config.spark.master is None
    assert config.ingest.splits.val == 0.15
    assert config.train.learning_rate == 0.0005  # untouched keys keep the base value


def test_int_widens_to_float_and_dict_values_become_strings():
    config = load_config(
        overrides=["train.learning_rate=1", "spark.conf={spark.x: 3, spark.y: true}"]
    )
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.spark.conf == {"spark.x": "3", "spark.y": "true"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key train.epoch"),
        ("trian.epochs=3", "unknown config key trian"),
        ("ingest.splits.dev=0.1", "unknown config key ingest.splits.dev"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.epochs=true", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs: 0 is out of range (must be >= 1)"),
        ("train.learning_rate=0", "train.learning_rate: 0.0 is out of range (must be > 0)"),
        ("train.dropout=1.5", "train.dropout: 1.5 is out of range (must be <= 0.95)"),
        ("train.model=vgg", "train.model: 'vgg' is not one of"),
        ("ingest.channels=2", "ingest.channels: 2 is not one of"),
        ("spark.app_name=3", "spark.app_name: expected a string"),
        ("spark.conf=3", "spark.conf: expected a mapping"),
        ("train=3", "train: expected a mapping"),
        ("ingest.splits.train=0.9", "ingest.splits: train + val + test must add up to 1"),
        ("train.epochs", "--set expects section.key=value"),
        ("=3", "--set expects section.key=value"),
        ("train..epochs=3", "--set expects section.key=value"),
    ],
)
def test_bad_values_fail_with_the_dotted_key(override: str, message: str):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_overlay_file(tmp_path: Path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("mlflow:\n  tracking_url: x\n")
    with pytest.raises(ConfigError, match="unknown config key mlflow.tracking_url"):
        load_config(overlay)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_work_dir_drives_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(overrides=[f"work_dir={tmp_path}"])
    assert Store.of(config).work == tmp_path
    assert Store.of(config).prepared == tmp_path / "datasets" / "prepared"
    assert Store.of(config).tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert Store.of(load_config()).tracking_uri == "http://127.0.0.1:5999"
    explicit = load_config(overrides=["mlflow.tracking_uri=sqlite:///x.db"])
    assert Store.of(explicit).tracking_uri == "sqlite:///x.db"


def test_shipped_overlays_load():
    for overlay in sorted(BASE_CONF.parent.glob("*.yaml")):
        load_config(overlay)


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("auto", "auto"), ("yes", True)]
)
def test_use_gpu_takes_a_boolean_or_auto(value: str, expected: object, tmp_path: Path):
    config = load_config(overrides=[f"train.use_gpu={value}", f"score.use_gpu={value}"])
    assert config.train.use_gpu == expected and config.score.use_gpu == expected
    assert type(config.train.use_gpu) is type(expected)  # "auto" stays a str, true a bool
    overlay = tmp_path / "gpu.yaml"
    overlay.write_text("train:\n  use_gpu: auto\n  mixed_precision: true\n")
    assert load_config(overlay).train.mixed_precision is True


@pytest.mark.parametrize("value", ["maybe", "1", "0", "GPU", "[auto]"])
def test_use_gpu_rejects_anything_else_naming_the_choices(value: str):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"train.use_gpu={value}"])
    message = str(info.value)
    assert message.startswith("train.use_gpu: ") and "\n" not in message
    assert "is not one of true, false, 'auto'" in message


def test_mixed_precision_without_a_gpu_setting_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.mixed_precision=true"])
    assert "train.mixed_precision=true needs train.use_gpu=true or auto" in str(info.value)
    for use_gpu in ("true", "auto"):
        load_config(overrides=["train.mixed_precision=true", f"train.use_gpu={use_gpu}"])


def test_base_yaml_lists_every_key_with_its_default():
    # The defaults are written once, in the dataclasses; base.yaml repeats each as the
    # operators' reference. A field missing from it, or a different value, fails here.
    def differences(section: object, data: dict, prefix: str) -> list[str]:
        found = []
        for name in (f.name for f in dataclasses.fields(section)):
            default = getattr(section, name)
            if dataclasses.is_dataclass(default):
                found += differences(default, data.get(name) or {}, f"{prefix}{name}.")
            elif name not in data:
                found.append(f"{prefix}{name} missing")
            elif data[name] != default:
                found.append(f"{prefix}{name}: {data[name]!r} != {default!r}")
        return found

    assert differences(Config(), yaml.safe_load(BASE_CONF.read_text()), "") == []


_TRAIN_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(TrainConfig)))
_MODELS = (
    "'mlp', 'lenet5', 'mnist_cnn', 'resnet_small', 'autoencoder', 'mobilenet_v2', "
    "'efficientnet_b0', 'resnet50', nor package.module:function (a function of "
    "(input_shape, num_classes) returning an uncompiled Keras model)"
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], f"unknown config key train.epoch (known in train: {_TRAIN_KEYS})"),
        (
            ["train.epoch=3", "trian=1"],
            "unknown config key trian (known in the top level: "
            "ingest, mlflow, registry, score, serve, spark, train, work_dir)",
        ),
        (["train.batch_size=many"], "train.batch_size: expected an integer, got str 'many'"),
        (["train.epochs=-1"], "train.epochs: -1 is out of range (must be >= 1)"),
        (["ingest.image_size=5000"], "ingest.image_size: 5000 is out of range (must be <= 4096)"),
        (["serve.max_body_mb=0"], "serve.max_body_mb: 0.0 is out of range (must be > 0)"),
        (["train.learning_rate=true"], "train.learning_rate: expected a number, got bool True"),
        (["train.model=vgg16"], f"train.model: 'vgg16' is not one of {_MODELS}"),
        (["ingest.channels=true"], "ingest.channels: True is not one of 1, 3"),
        (["train.use_gpu=1"], "train.use_gpu: 1 is not one of true, false, 'auto'"),
        (["train.tsne=1"], "train.tsne: expected true or false, got int 1"),
        (["train.nics=eth0"], "train.nics: expected a list, got str 'eth0'"),
        (["train.nics=[eth0, 3]"], "train.nics[1]: expected a string, got int 3"),
        (["spark.conf={a: null}"], "spark.conf.a: expected a scalar value, got NoneType None"),
        (["spark.master=[a]"], "spark.master: expected a string, got list ['a']"),
        (["ingest.splits=3"], "ingest.splits: expected a mapping, got int 3"),
        (
            ["ingest.splits.val=0.3"],
            "ingest.splits: train + val + test must add up to 1, got 1.2",
        ),
        (["ingest.splits.train=0", "ingest.splits.val=0.9"], "ingest.splits.train: must be > 0"),
    ],
)
def test_error_messages_in_full(overrides: list[str], message: str):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value) == message


def test_an_empty_section_keeps_its_defaults(tmp_path: Path):
    overlay = tmp_path / "empty.yaml"
    overlay.write_text("score:\ntrain:\n  nics: [eth0]\n")  # score: every key commented out
    config = load_config(overlay)
    assert config.score == Config().score
    assert config.train.nics == ["eth0"]


def test_sections_stay_plain_dataclasses():
    # Code copies sections with dataclasses.replace and pickles them to executors and ranks.
    config = load_config(overrides=["train.use_gpu=auto"])
    assert dataclasses.replace(config.train, epochs=3).epochs == 3
    assert pickle.loads(pickle.dumps(config)) == config
    assert isinstance(config.serve.max_body_mb, float)  # base.yaml writes 32
    assert SplitConfig(0.6, 0.2, 0.2).train == 0.6
    with pytest.raises(ConfigError, match="train.mixed_precision=true needs"):
        TrainConfig(mixed_precision=True)  # a cross-field check holds for direct construction
