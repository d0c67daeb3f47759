"""The photos preset (conf/photos.yaml) and the transfer-learning keys' checks."""

from __future__ import annotations

import pytest

from pipelines.config import BASE_CONF, ConfigError, bundled_targets, load_config


def test_the_photos_preset_loads_by_name_and_by_path():
    assert "photos" in bundled_targets()
    by_name = load_config("photos")
    assert by_name == load_config(BASE_CONF.parent / "photos.yaml")
    assert (by_name.ingest.image_size, by_name.ingest.channels) == (224, 3)
    train = by_name.train
    assert (train.model, train.pretrained) == ("mobilenet_v2", "imagenet")
    assert 0 < train.fine_tune.frozen_epochs < train.epochs
    assert train.fine_tune.unfreeze_top > 0
    # Photos: a centre crop, not a stretch; flips and crops, never a digit's rotation.
    assert by_name.ingest.resize == "crop"
    assert train.augment_flip and train.augment_crop_scale < 1.0
    assert train.augment_rotation_deg == 0.0
    # --set still applies over it (the base, the preset, then the overrides).
    assert load_config("photos", ["train.pretrained=none"]).train.pretrained == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.pretrained=imagenet"], "train.pretrained applies to the backbones"),
        (["train.fine_tune.frozen_epochs=2"], "train.fine_tune.frozen_epochs applies to"),
        (
            ["train.model=resnet50", "train.fine_tune.frozen_epochs=2", "train.elastic=true"],
            "needs train.elastic=false",
        ),
        (["train.model=my_module"], "train.model: 'my_module' is not one of"),
        (["train.model=pkg.mod:fn:x"], "nor package.module:function"),
        (["train.fine_tune.learning_rate_factor=0"], "out of range (must be > 0)"),
    ],
)
def test_transfer_learning_keys_fail_on_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_users_function_and_a_warm_start_are_accepted():
    config = load_config(
        overrides=["train.model=my_pkg.nets:small_cnn", "train.init_from=models:/m@champion"]
    )
    assert config.train.model == "my_pkg.nets:small_cnn"
    assert config.train.init_from == "models:/m@champion"
