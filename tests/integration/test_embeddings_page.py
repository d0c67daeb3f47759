"""The run page's interactive embedding plot and the TensorBoard projector files.

A LeNet-5 learns the bars of :mod:`tests.integration.test_report` briefly; the report is
written with :func:`~pipelines.report.write_training_report` (no MLflow) and the page built
from its files as :mod:`pipelines.report.render` does. The plot's data (coordinates, labels,
predictions, probabilities, thumbnails) is checked against ``embeddings.csv`` and the model's
own outputs, the script in headless Chromium (a linked ``#point=<index>`` pins that point and
fills the tooltip), and the projector files with TensorBoard's own parser and a real
``tensorboard`` process on 127.0.0.1.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.images import normalise
from pipelines.keras_api import keras
from pipelines.models import build_model
from pipelines.report import embeddings, write_training_report
from pipelines.report.pages import run_page
from pipelines.tasks import CLASSIFICATION
from pipelines.train.feed import SplitArrays
from tests.integration.chromium import needs_chromium, run_chromium
from tests.integration.test_report import LABELS, SIZE, make_split

#: A path that would end the JSON's script block if it were not escaped.
HOSTILE_PATH = "/data/bars/</script><script>alert(1)</script>\t&amp;.png"
_DATA = re.compile(r'<script type="application/json" id="emb-data">(.*?)</script>', re.S)


@dataclass(frozen=True)
class Report:
    model: object
    arrays: SplitArrays
    outputs: np.ndarray
    out: Path
    summary: dict
    page: str
    html: Path


def _files(out: Path) -> dict[str, Path]:
    """The report's files by name, as render._download_report hands them to the page."""
    files = {p.name: p for p in out.iterdir() if p.is_file()}
    if (out / "tensorboard").is_dir():
        files["tensorboard/"] = out
    return files


def _page(out: Path, summary: dict) -> str:
    info = SimpleNamespace(
        run_id="0123456789abcdef",
        run_name="bars",
        status="FINISHED",
        experiment_id="1",
        start_time=1_700_000_000_000,
        end_time=1_700_000_060_000,
    )
    run = SimpleNamespace(info=info, data=SimpleNamespace(tags={}, metrics={}, params={}))
    return run_page(run, _files(out), None, "sqlite:///mlflow.db", version=None, histories={})


def _write(tmp: Path, model, arrays: SplitArrays, outputs: np.ndarray, tsne: bool) -> Report:
    summary = write_training_report(
        tmp / "report",
        model,
        history={},
        evaluation=CLASSIFICATION.evaluate(arrays, outputs),
        task=CLASSIFICATION,
        tsne=tsne,
        samples=3,
    )
    page = _page(tmp / "report", summary)
    html = tmp / "run.html"
    html.write_text(page)
    return Report(model, arrays, outputs, tmp / "report", summary, page, html)


@pytest.fixture(scope="module")
def trained() -> tuple[object, SplitArrays, np.ndarray]:
    cfg = TrainConfig(model="lenet5", activation="relu", epochs=3, learning_rate=0.001, seed=3)
    train, test = make_split(300, 1), make_split(60, 3, flip=0.1)
    paths = list(test.paths)
    paths[5] = HOSTILE_PATH
    test = replace(test, paths=paths)
    model = build_model(cfg, (SIZE, SIZE, 1), len(LABELS))
    model.fit(normalise(train.images), train.labels, epochs=cfg.epochs, batch_size=16, verbose=0)
    outputs = model.predict(normalise(test.images), verbose=0)
    return model, test, outputs


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return _write(tmp_path_factory.mktemp("emb"), *trained, tsne=True)


def _data(page: str) -> dict:
    (block,) = _DATA.findall(page)
    return json.loads(block)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _png(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))) as image:
        return np.asarray(image)


def _tile(sprite: np.ndarray, j: int, columns: int, w: int, h: int) -> np.ndarray:
    r, q = divmod(j, columns)
    return sprite[r * h : (r + 1) * h, q * w : (q + 1) * w]


# --- the page's data ---------------------------------------------------------------------------


def test_plot_data_agrees_with_embeddings_csv_and_the_model(report: Report) -> None:
    data = _data(report.page)
    rows = {int(r["index"]): r for r in _csv(report.out / "embeddings.csv")}
    labels = report.arrays.labels
    predicted = report.model.predict(normalise(report.arrays.images), verbose=0).argmax(axis=1)

    assert data["classes"] == LABELS and data["classifier"] is True
    assert [m["key"] for m in data["methods"]] == ["pca", "tsne"]
    assert data["index"] == list(range(60))  # 60 < EMBEDDINGS_SHOWN: every image
    for j, i in enumerate(data["index"]):
        row = rows[i]
        assert data["path"][j] == report.arrays.paths[i] == row["path"]
        assert data["true"][j] == labels[i] and LABELS[data["true"][j]] == row["label"]
        assert data["predicted"][j] == predicted[i] and LABELS[predicted[i]] == row["predicted"]
        assert data["probability"][j] == pytest.approx(report.outputs[i].max(), rel=1e-6)
        assert data["coords"]["pca"][j] == [float(row["pca_1"]), float(row["pca_2"])]
        assert data["coords"]["tsne"][j] == [float(row["tsne_1"]), float(row["tsne_2"])]
    # the PCA coordinates are the embedding layer's, projected again here
    probe = keras().Model(report.model.input, report.model.get_layer("embedding").output)
    features = probe.predict(normalise(report.arrays.images), verbose=0)
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    np.testing.assert_allclose(
        np.abs(np.array(data["coords"]["pca"])), np.abs(expected), rtol=1e-3, atol=1e-3
    )
    assert "All 60 images of the evaluation split are shown." in report.page


def test_thumbnails_are_the_images_of_the_points(report: Report) -> None:
    data = _data(report.page)
    sprite = _png(data["sprite"]["src"])
    w, h = data["sprite"]["tile"]
    assert (w, h) == (SIZE, SIZE)  # small images are not resized
    for j, i in enumerate(data["index"]):
        tile = _tile(sprite, j, data["sprite"]["columns"], w, h)
        np.testing.assert_array_equal(tile, report.arrays.images[i][:, :, 0])


def test_the_json_block_cannot_be_escaped_by_a_path(report: Report) -> None:
    assert "</script><script>alert" not in report.page
    assert HOSTILE_PATH in _data(report.page)["path"]


def test_a_run_logged_before_the_plot_keeps_the_static_figure(
    report: Report, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "report"
    shutil.copytree(report.out, old)
    (old / "embeddings_sprite.png").unlink()
    (old / "embeddings_sprite.json").unlink()
    page = _page(old, report.summary)
    assert "<script" not in page and 'id="emb-app"' not in page
    assert 'alt="2-D projection of the embeddings"' in page


def test_a_large_split_is_sampled_deterministically_keeping_every_mistake(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embeddings, "EMBEDDINGS_SHOWN", 25)
    monkeypatch.setattr(embeddings, "PROJECTOR_SHOWN", 30)
    first = _write(tmp_path / "a", *trained, tsne=False)
    second = _write(tmp_path / "b", *trained, tsne=False)
    data = _data(first.page)
    mistakes = np.flatnonzero(trained[2].argmax(axis=1) != trained[1].labels)
    assert 0 < len(mistakes) < 25
    assert len(data["index"]) == 25 and data["index"] == sorted(set(data["index"]))
    assert set(mistakes) <= set(data["index"])
    assert data["index"] == _data(second.page)["index"]
    assert len(_csv(first.out / "embeddings.csv")) == 60  # the CSV keeps every image
    assert (
        f"Showing 25 of 60 images: all {len(mistakes)} misclassified ones and a fixed random "
        "sample of the rest."
    ) in first.page
    assert first.summary["projector"] == {"points": 30, "of": 60, "dimensions": 84}


def test_more_mistakes_than_the_limit_are_sampled_among_the_mistakes() -> None:
    labels = np.zeros(100, np.int64)
    predicted = np.where(np.arange(100) % 2 == 0, 1, 0)
    picked = embeddings.sample_points(labels, predicted, 10)
    assert len(picked) == 10 and np.all(predicted[picked] != labels[picked])
    assert picked.tolist() == embeddings.sample_points(labels, predicted, 10).tolist()


def test_many_colour_thumbnails_are_shrunk_to_keep_the_page_small(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2000, 32, 48, 3), dtype=np.uint8)
    embeddings.write_thumbnails(tmp_path, images, np.arange(2000), 5000)
    meta = json.loads((tmp_path / "embeddings_sprite.json").read_text())
    assert meta["tile"] == [24, 16] and meta["columns"] == 45 and meta["total"] == 5000
    with Image.open(tmp_path / "embeddings_sprite.png") as sprite:
        assert sprite.size == (45 * 24, 45 * 16) and sprite.mode == "RGB"
    assert 2000 * 24 * 16 * 3 <= embeddings.THUMBNAIL_BUDGET


# --- the page in Chromium ------------------------------------------------------------------------


def _dom(url: str, workdir: Path) -> tuple[str, list[str]]:
    """The page's DOM after its script ran (5 s of virtual time), and its console lines."""
    return run_chromium(
        url, workdir, "--virtual-time-budget=5000", "--dump-dom", window=(1280, 1400)
    )


@needs_chromium
def test_a_linked_point_is_pinned_with_its_image_and_labels(report: Report, tmp_path: Path) -> None:
    data = _data(report.page)
    wrong = [j for j in range(len(data["index"])) if data["true"][j] != data["predicted"][j]]
    j = wrong[0]
    index = data["index"][j]
    dom, console = _dom(f"{report.html.as_uri()}#point={index}", tmp_path)
    assert console == []
    app = re.search(r'<div class="emb" id="emb-app"([^>]*)>', dom)
    assert app and "hidden" not in app.group(1)
    assert 'data-ready="1"' in app.group(1)
    assert f'data-selected="{index}"' in app.group(1) and f'data-shown="{index}"' in app.group(1)
    tip = re.search(r'<div class="emb-text">(.*?)</div></div>', dom, re.S)
    assert tip, "the tooltip was not filled"
    text = tip.group(1)
    probability = f"{data['probability'][j]:.3f}"
    assert f"true: {LABELS[data['true'][j]]}" in text
    assert f"predicted: {LABELS[data['predicted'][j]]} ({probability})" in text
    assert 'class="bad"' in text  # a mistake is shown as one
    assert re.search(r'<details id="emb-static"(?! open)', dom)  # the PNG fallback folds away


@needs_chromium
def test_a_link_can_choose_the_projection(report: Report, tmp_path: Path) -> None:
    dom, console = _dom(f"{report.html.as_uri()}#point=7&view=tsne", tmp_path)
    assert console == []
    app = re.search(r'<div class="emb" id="emb-app"([^>]*)>', dom).group(1)
    assert 'data-view="tsne"' in app and 'data-selected="7"' in app
    assert re.search(r'<input type="radio" name="emb-method" value="tsne"', dom)


@needs_chromium
def test_a_point_outside_the_sample_is_reported(report: Report, tmp_path: Path) -> None:
    dom, console = _dom(f"{report.html.as_uri()}#point=999", tmp_path)
    assert console == []
    assert "Image #999 is not among the points shown." in dom
    assert 'data-selected=""' in dom


# --- the TensorBoard projector ---------------------------------------------------------------


def _projector(report: Report):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    logdir = report.out / "tensorboard"
    config = text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    return logdir, config


def test_projector_files_hold_the_embedding_layer_outputs(report: Report) -> None:
    logdir, config = _projector(report)
    (embedding,) = config.embeddings
    n = len(report.arrays)
    probe = keras().Model(report.model.input, report.model.get_layer("embedding").output)
    features = probe.predict(normalise(report.arrays.images), verbose=0)

    vectors = np.loadtxt(logdir / embedding.tensor_path, delimiter="\t", ndmin=2)
    assert vectors.shape == (n, 84)
    np.testing.assert_allclose(vectors, features, rtol=1e-5, atol=1e-6)

    lines = (logdir / embedding.metadata_path).read_text().splitlines()
    assert lines[0].split("\t") == ["index", "true", "predicted", "path"]
    assert len(lines) == n + 1
    predicted = report.outputs.argmax(axis=1)
    for i, line in enumerate(lines[1:]):
        cells = line.split("\t")
        assert len(cells) == 4, line  # the tab in HOSTILE_PATH must not add a column
        assert cells[:3] == [str(i), LABELS[report.arrays.labels[i]], LABELS[predicted[i]]]
    assert lines[6].split("\t")[3] == " ".join(HOSTILE_PATH.split())

    w, h = embedding.sprite.single_image_dim
    columns = math.ceil(math.sqrt(n))
    with Image.open(logdir / embedding.sprite.image_path) as image:
        sprite = np.asarray(image)
    assert sprite.shape[:2] == (columns * h, columns * w)
    assert max(sprite.shape) <= embeddings.SPRITE_MAX
    for i in (0, 7, n - 1):
        tile = _tile(sprite, i, columns, w, h)
        np.testing.assert_array_equal(tile, report.arrays.images[i][:, :, 0])
    assert report.summary["projector"] == {"points": n, "of": n, "dimensions": 84}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tensorboard(report: Report, tmp_path: Path) -> Iterator[str]:
    """``tensorboard --logdir`` on the report's folder, on 127.0.0.1; killed pass or fail."""
    port = _free_port()
    log = (tmp_path / "tensorboard.log").open("w")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("tensorboard")),
            "--logdir",
            str(report.out / "tensorboard"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}/data/plugin/projector"
    finally:
        process.kill()
        process.wait(timeout=30)
        log.close()


def _get(url: str, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_tensorboard_loads_the_projector(report: Report, tensorboard: str) -> None:
    deadline = time.monotonic() + 90
    assert json.loads(_get(f"{tensorboard}/runs", deadline)) == ["."]
    info = json.loads(_get(f"{tensorboard}/info?run=.", deadline))
    (embedding,) = info["embeddings"]
    n = len(report.arrays)
    assert [int(d) for d in embedding["tensorShape"]] == [n, 84]
    tensor = _get(f"{tensorboard}/tensor?run=.&name={embedding['tensorName']}", deadline)
    assert len(tensor) == n * 84 * 4  # float32
    metadata = _get(f"{tensorboard}/metadata?run=.&name={embedding['tensorName']}", deadline)
    assert len(metadata.decode().splitlines()) == n + 1
    sprite = _get(f"{tensorboard}/sprite_image?run=.&name={embedding['tensorName']}", deadline)
    assert sprite.startswith(b"\x89PNG")
