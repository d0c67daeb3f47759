"""The peer benchmark's parts that need no peer environment: skip paths, parsing, the model.

The environment itself (a pip install of TensorFlow) and a peer run are slow and marked so;
they skip with a message where the environment has not been built.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipelines.bench.commands import last_error
from pipelines.bench.maintainer import peer, peer_runner
from pipelines.errors import UserError
from pipelines.store import Store

MARKS = {
    "launched": 100.0,
    "imported": 102.0,
    "data_ready": 110.0,
    "fit_start": 110.5,
    "prepared": 117.0,
    "trained": 140.0,
    "fit_end": 141.0,
    "evaluated": 144.0,
}


@pytest.fixture()
def wheel(tmp_path: Path) -> Path:
    """A stand-in wheel file: the build must fail before it is ever installed."""
    path = tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    path.write_bytes(b"not a wheel")
    return path


def test_bad_python_is_a_one_line_skip(tmp_path: Path, wheel: Path) -> None:
    with pytest.raises(peer.PeerUnavailable) as caught:
        peer.peer_env(tmp_path, python=tmp_path / "no-python3.11", wheel=wheel)
    message = caught.value.skip_message
    assert message.startswith("peer row skipped: base Python ")
    assert "no-python3.11" in message and "\n" not in message
    assert isinstance(caught.value, UserError)
    assert list(tmp_path.iterdir()) == [wheel]


def test_missing_wheel_is_a_skip(tmp_path: Path) -> None:
    with pytest.raises(peer.PeerUnavailable, match="no Horovod 0.28.1 wheel"):
        peer.peer_env(tmp_path, wheel=tmp_path / "absent.whl")


def test_impossible_requirement_leaves_no_environment(tmp_path: Path, wheel: Path) -> None:
    # --no-index: pip fails from the local wheel folders alone, without the registry.
    root = tmp_path / "bench"
    with pytest.raises(peer.PeerUnavailable) as caught:
        peer.peer_env(root, requirements=("pyarrow<0",), wheel=wheel, pip_options=("--no-index",))
    message = str(caught.value)
    assert message.startswith("peer environment: pip install 1 pins failed: ")
    assert "pyarrow<0" in message and "\n" not in message
    assert list(root.iterdir()) == []  # the staging folder is gone, nothing renamed in


def test_env_key_follows_the_pins() -> None:
    python, wheel = Path("/usr/bin/python3.11"), Path("horovod-0.28.1-x.whl")
    key = peer.env_key(python, ("a==1",), wheel)
    assert key == peer.env_key(python, ("a==1",), wheel)
    assert key != peer.env_key(python, ("a==2",), wheel)
    assert key != peer.env_key(Path("/opt/python3.11"), ("a==1",), wheel)


def test_peer_pins_match_ours_and_keep_pyarrow_below_11() -> None:
    from importlib import metadata

    pins = peer.peer_pins()
    assert f"pyspark=={metadata.version('pyspark')}" in pins
    assert any(p.startswith("tensorflow") and p.endswith("==2.15.1") for p in pins)
    (pyarrow,) = [p for p in pins if p.startswith("pyarrow")]
    assert int(pyarrow.split("==")[1].split(".")[0]) < 11


def test_peer_split_adds_up_to_the_wall_time() -> None:
    split = peer.peer_split(MARKS, ended=146.0)
    assert split == {
        "start_up": 10.5,
        "fit": 30.5,
        "fit_prepare": 6.5,
        "fit_train": 23.0,
        "fit_load": 1.0,
        "evaluation": 3.0,
        "exit": 2.0,
    }
    top = split["start_up"] + split["fit"] + split["evaluation"] + split["exit"]
    assert top == pytest.approx(146.0 - MARKS["launched"])
    assert split["fit_prepare"] + split["fit_train"] + split["fit_load"] == split["fit"]


def test_peer_split_rejects_missing_or_disordered_marks() -> None:
    with pytest.raises(ValueError, match="missing: trained"):
        peer.peer_split({k: v for k, v in MARKS.items() if k != "trained"}, ended=146.0)
    with pytest.raises(ValueError, match="out of order"):
        peer.peer_split({**MARKS, "fit_end": 139.0}, ended=146.0)
    with pytest.raises(ValueError, match="out of order"):
        peer.peer_split(MARKS, ended=143.0)


def test_peer_output_round_trip() -> None:
    result = {"test_accuracy": 0.97, "marks": MARKS, "history": {}, "versions": {}}
    stdout = "\n".join(
        [
            "writing dataframes",
            peer_runner.result_line({"test_accuracy": 0.1}),  # only the last one counts
            "[0]<stdout>:Epoch 1/8",
            peer_runner.result_line(result),
            "",
        ]
    )
    assert peer.parse_peer_output(stdout) == json.loads(json.dumps(result))
    with pytest.raises(ValueError, match="no result line"):
        peer.parse_peer_output("Traceback (most recent call last):\n")


def test_runner_command_line() -> None:
    args = peer_runner.parse_args(
        ["--dataset", "d", "--model-json", "m.json", "--work", "w", "--epochs", "8"]
        + ["--seed", "1", "--learning-rate", "0.0005", "--launched", "12.5"]
    )
    assert (args.epochs, args.seed, args.learning_rate) == (8, 1, 0.0005)
    assert (args.batch_size, args.num_proc, args.launched) == (32, 2, 12.5)


def test_runner_imports_nothing_from_pipelines() -> None:
    source = Path(peer_runner.__file__).read_text()
    assert "pipelines" not in "".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))
    )


def test_last_error_picks_pips_error_line() -> None:
    text = "Looking in links: /opt/wheels\nERROR: No matching distribution found for x<0\n"
    assert last_error(text) == "ERROR: No matching distribution found for x<0"
    assert last_error("") == "no output"


def test_process_past_its_timeout_is_stopped_with_its_children(tmp_path: Path) -> None:
    import psutil

    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(TimeoutError, match="ran past 2 s"):
        peer.run_process([sys.executable, "-c", code], tmp_path, {}, timeout_s=2)
    child = int(pid_file.read_text())
    try:  # SIGKILL is delivered asynchronously: give it a moment
        gone, alive = psutil.wait_procs([psutil.Process(child)], timeout=5)
    except psutil.NoSuchProcess:
        alive = []
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_model_json_round_trip_keeps_architecture_and_initial_weights() -> None:
    import numpy as np

    from pipelines.config import load_config
    from pipelines.keras_api import keras
    from pipelines.models import build_model

    cfg = load_config(None).train
    model = build_model(cfg, (28, 28, 1), 10)
    loaded = keras().models.model_from_json(model.to_json())
    assert [layer.get_config() for layer in loaded.layers] == [
        layer.get_config() for layer in model.layers
    ]
    assert loaded.count_params() == model.count_params()
    # The initialisers carry our seeds, so the peer starts from our initial weights.
    for ours, theirs in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_peer_runner_trains_one_epoch_in_the_built_environment(tmp_path: Path) -> None:
    from pipelines.config import load_config

    config = load_config(None)
    built = sorted(Store.of(config).bench.glob("peer-env-*/" + peer.ENV_MARKER))
    if not built:
        pytest.skip(f"no peer environment under {Store.of(config).bench} (bench_peer builds it)")
    digits = sorted(Store.of(config).bench.glob("prepared-digits-*x1-*-raw/_manifest.json"))
    if not digits:
        pytest.skip(f"no prepared digits under {Store.of(config).bench}")
    env = peer.PeerEnv(built[0].parent, built[0].parent / "bin" / "python", {}, 0.0)
    dataset = digits[0].parent
    model_json = tmp_path / "model.json"
    model_json.write_text(peer._model_json(config, dataset, 0))
    result = peer.run_peer(env, config, dataset, model_json, tmp_path / "peer", 0, 1)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["split_s"]["fit_train"] > 0


def test_our_split_adds_up_to_the_wall_time() -> None:
    times = {"run_start": 106.0, "trained": 128.0, "evaluated": 129.5, "run_end": 134.5}
    split = peer.our_split({**times, "ranks_s": 14.0}, launched=100.0, ended=135.5)
    assert split == {
        "start_up": 6.0,
        "fit": 22.0,
        "fit_ranks": 14.0,
        "fit_launch": 8.0,
        "evaluation": 1.5,
        "logging_report_registration": 5.0,
        "exit": 1.0,
    }
    parts = ("start_up", "fit", "evaluation", "logging_report_registration", "exit")
    assert sum(split[p] for p in parts) == pytest.approx(35.5)
    with pytest.raises(ValueError, match="out of order"):
        peer.our_split({**times, "ranks_s": 14.0}, launched=107.0, ended=135.5)
