"""The logged model decodes with the resize mode it was trained with (``labels.json``)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.image_model import ImageModel, save_keras_artifacts
from pipelines.images import decode_image, normalise
from pipelines.models import build_model
from pipelines.tasks import CLASSIFICATION


def _loaded(tmp_path: Path, resize: str | None) -> tuple[ImageModel, object]:
    model = build_model(TrainConfig(model="mlp", seed=0), (12, 12, 3), 2)
    artifacts = save_keras_artifacts(
        model, ["a", "b"], (12, 12, 3), CLASSIFICATION, tmp_path, resize or "stretch"
    )
    if resize is None:  # a model logged before resize modes: no key in labels.json
        path = Path(artifacts["labels"])
        path.write_text(path.read_text().replace('"resize": "stretch"', '"old": 1'))
    loaded = ImageModel()
    loaded.load_context(SimpleNamespace(artifacts=artifacts))
    return loaded, model


def test_predict_crops_as_the_model_was_trained_and_older_models_stretch(tmp_path) -> None:
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    data = buffer.getvalue()
    for resize, folder in (("crop", "crop"), ("pad", "pad"), (None, "old")):
        (tmp_path / folder).mkdir()
        loaded, model = _loaded(tmp_path / folder, resize)
        assert loaded.resize == (resize or "stretch")
        row = loaded.predict(None, pd.DataFrame({"image": [data]})).iloc[0]
        pixels = decode_image(data, 12, 3, resize or "stretch")
        expected = model(normalise(pixels[None]), training=False).numpy()[0]
        np.testing.assert_allclose(row["probabilities"], expected, rtol=1e-5, atol=1e-6)
        if resize is not None:  # the test can tell the modes apart
            stretched = normalise(decode_image(data, 12, 3)[None])
            other = model(stretched, training=False).numpy()[0]
            assert np.abs(other - expected).max() > 1e-4
