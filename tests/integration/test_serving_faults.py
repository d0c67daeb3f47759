"""``dlpipe serve`` as it runs: a real process, real signals, real HTTP on 127.0.0.1.

One tiny registered classifier and one ``dlpipe serve`` for the module (started in its own
session, so that teardown can end its whole process group whatever happens): concurrent
clients, bad requests, oversized bodies, then SIGTERM. A second server, started the way
:func:`pipelines.rest_server.serve_command` says, is stopped with SIGINT. Every request has a
timeout and every loop a bound in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.config import TrainConfig, load_config
from pipelines.image_model import log_image_model
from pipelines.images import encode_png
from pipelines.keras_api import keras
from pipelines.models import build_model
from pipelines.registry import register_and_promote
from pipelines.rest_server import serve_command
from pipelines.tasks import CLASSIFICATION
from tests.integration.conftest import TrackingStore
from tests.integration.rest import (
    alive,
    free_port,
    image_request,
    in_group,
    port_is_free,
    post,
    process_tree,
    stop,
    strict_json,
    wait_until_serving,
)

LABELS = ["dark", "mid", "bright"]
SIZE = 8
MODEL = "digits-classifier"
MAX_BODY_MB = 1
STOP_TIMEOUT_S = 3
CLIENTS = 8
REQUESTS_PER_CLIENT = 4


@dataclass
class Served:
    base: str
    port: int
    server: subprocess.Popen
    log: Path
    model_uri: str
    local: mlflow.pyfunc.PyFuncModel


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Grey SIZExSIZE images: class k has pixels around 30 + 100 k, plus noise."""
    rng = np.random.default_rng(seed)
    base = 30 + 100 * labels[:, None, None, None]
    noise = rng.integers(-25, 26, size=(len(labels), SIZE, SIZE, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def registered(store: TrackingStore) -> str:
    """A tiny MLP registered as the champion of MODEL; its pinned URI."""
    labels = np.arange(300) % 3
    x = _images(labels, seed=1)
    keras().utils.set_random_seed(1)
    cfg = TrainConfig(model="mlp", hidden_units=16, epochs=1, dropout=0.0, learning_rate=0.01)
    model = build_model(cfg, (SIZE, SIZE, 1), len(LABELS))
    model.fit(x.astype(np.float32) / 255.0, labels, epochs=8, batch_size=32, verbose=0)
    with mlflow.start_run(experiment_id=store.experiment_id) as run:
        info = log_image_model(
            model,
            label_names=LABELS,
            image_shape=(SIZE, SIZE, 1),
            task=CLASSIFICATION,
            input_example_png=encode_png(x[0]),
        )
        mlflow.log_metric("test_accuracy", 0.9)
    done = register_and_promote(
        info.model_uri,
        run.info.run_id,
        model_name=MODEL,
        alias="champion",
        metric="test_accuracy",
        higher_is_better=True,
        tracking_uri=store.uri,
    )
    return done.model_uri


def _sets(store: TrackingStore, *items: str) -> list[str]:
    pairs = [
        f"work_dir={store.root / 'work'}",
        f"mlflow.tracking_uri={store.uri}",
        f"serve.stop_timeout_s={STOP_TIMEOUT_S}",
        *items,
    ]
    return [arg for item in pairs for arg in ("--set", item)]


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Its own session: teardown can end the whole group, even of a server that leaks.
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def served(store: TrackingStore, registered: str, tmp_path_factory) -> Iterator[Served]:
    """``dlpipe serve`` (the console script) on a free port, max body MAX_BODY_MB."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    dlpipe = str(Path(sys.executable).parent / "dlpipe")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        dlpipe,
        "serve",
        "--port",
        str(port),
        *_sets(store, f"serve.max_body_mb={MAX_BODY_MB}"),
    ]
    server = _start(command, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server, log.read_text)
        local = mlflow.pyfunc.load_model(registered)
        yield Served(base, port, server, log, registered, local)
    finally:
        stop(server, 15, group=True)


def _cells(seed: int) -> list[bytes]:
    """Twelve good PNGs in a seed-dependent order, and one file that is not an image."""
    labels = np.array([0, 1, 2] * 4)
    pngs = [encode_png(img) for img in _images(labels, seed=seed)]
    pngs.insert(seed % len(pngs), b"this is not an image")
    return pngs


def _expected(local, cells: list[bytes]) -> pd.DataFrame:
    return local.predict(pd.DataFrame({"image": cells}))


def _assert_same(rows: list[dict[str, Any]], expected: pd.DataFrame) -> None:
    assert len(rows) == len(expected)
    for row, (_, want) in zip(rows, expected.iterrows(), strict=True):
        assert row["predicted_label"] == want["predicted_label"]
        assert row["error"] == want["error"]
        if pd.isna(want["probability"]):
            # Item 3: an undecodable image is null everywhere, never NaN.
            assert row["probability"] is None and row["probabilities"] is None
        else:
            assert row["probability"] == pytest.approx(float(want["probability"]), abs=1e-6)
            assert row["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


def test_concurrent_clients_get_the_in_process_answers(served: Served) -> None:
    seeds = [client * REQUESTS_PER_CLIENT + r for client in range(CLIENTS)
             for r in range(REQUESTS_PER_CLIENT)]  # fmt: skip
    cells = {seed: _cells(seed) for seed in seeds}
    expected = {seed: _expected(served.local, cells[seed]) for seed in seeds}

    def client(first: int) -> list[tuple[int, int, bytes]]:
        answers = []
        for seed in range(first, first + REQUESTS_PER_CLIENT):
            status, body = post(served.base, image_request(cells[seed]), timeout=30)
            answers.append((seed, status, body))
        return answers

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, c * REQUESTS_PER_CLIENT) for c in range(CLIENTS)]
        results = [answer for future in futures for answer in future.result(timeout=90)]
    assert time.monotonic() - started < 90
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for seed, status, body in results:
        assert status == 200, body[:500]
        _assert_same(strict_json(body)["predictions"], expected[seed])


def _big_png(seed: int) -> bytes:
    """A ~0.5 MB noise PNG: a valid image, large in bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(720, 720, 1), dtype=np.uint8)
    return encode_png(pixels)


def _message(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")  # MLflow's 415 is text/plain
    return str(payload.get("message", "")) if isinstance(payload, dict) else ""


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(served: Served):
    good = _cells(0)
    split = {"dataframe_split": {"columns": ["image"], "data": [["@@@ not base64 @@@"]]}}
    wrong_column = json.loads(image_request(good[:2]))
    wrong_column["dataframe_split"]["columns"] = ["picture"]
    oversized = image_request([_big_png(1), _big_png(2), good[0]])
    assert len(oversized) > MAX_BODY_MB * 2**20
    cases = {
        "malformed JSON": (b"{not json" + b"x" * 200_000, "application/json", 400, False),
        "bad base64": (json.dumps(split).encode(), "application/json", 400, False),
        "wrong column": (json.dumps(wrong_column).encode(), "application/json", 400, False),
        "wrong content type": (image_request(good[:1]), "text/plain", 415, False),
        "no content type": (image_request(good[:1]), None, 415, False),
        "empty body": (b"", "application/json", 400, False),
        "oversized": (oversized, "application/json", 413, False),
        "oversized, chunked": (oversized, "application/json", 413, True),
    }
    for name, (body, content_type, want, chunked) in cases.items():
        status, answer = post(served.base, body, content_type, timeout=30, chunked=chunked)
        assert status == want, (name, answer[:300])
        message = _message(answer)
        assert message.strip(), name
        assert len(message) < 1100, (name, len(message))  # never the request echoed back
        if want == 413:
            assert "serve.max_body_mb=1" in message, message
        # ... and the server still answers a good request, the same as before.
        status, answer = post(served.base, image_request(good), timeout=30)
        assert status == 200, (name, answer[:300])
        _assert_same(strict_json(answer)["predictions"], _expected(served.local, good))


def test_an_undecodable_image_is_null_in_strict_json(served: Served) -> None:
    status, body = post(
        served.base, image_request([b"not an image", encode_png(_images(np.array([2]), 3)[0])])
    )
    assert status == 200
    first, second = strict_json(body)["predictions"]  # NaN would raise here
    assert first["probability"] is None and first["predicted_label"] is None
    assert first["error"].startswith("not an image")
    assert second["predicted_label"] == "bright" and 0 < second["probability"] <= 1


def _assert_stops(server: subprocess.Popen, port: int, sig: signal.Signals, log: Path) -> None:
    """Send ``sig`` to the server's process only; all of it must be gone, the port free."""
    tree = process_tree(server.pid)
    assert tree, "the server is not running"
    started = time.monotonic()
    os.kill(server.pid, sig)  # the process only, not its group: as `kill PID` does
    try:
        code = server.wait(timeout=STOP_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_TIMEOUT_S + 10}s after {sig.name}")
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 5  # children get a moment to notice
    while (alive(tree) or in_group(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p.cmdline() for p in alive(tree) + in_group(server.pid)]
    assert not left, f"left running after {sig.name}: {left}"
    assert port_is_free(port), f"port {port} still taken after {sig.name}"
    assert code == 0, (code, log.read_text()[-2000:])
    assert elapsed < STOP_TIMEOUT_S + 5, elapsed


def test_sigterm_stops_the_whole_server_and_frees_the_port(served: Served) -> None:
    _assert_stops(served.server, served.port, signal.SIGTERM, served.log)
    assert "stopped_by: SIGTERM" in served.log.read_text()


def test_sigint_stops_the_server_of_serve_command(
    store: TrackingStore, registered: str, tmp_path: Path
) -> None:
    port = free_port()
    config = load_config(None, _sets(store)[1::2])
    command, env, uri = serve_command(config, None, "127.0.0.1", port)
    assert uri == registered
    log = tmp_path / "serve.log"
    server = _start(command, env, log)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server, log.read_text)
        _assert_stops(server, port, signal.SIGINT, log)
    finally:
        stop(server, 15, group=True)
