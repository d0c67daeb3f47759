"""A real Spark standalone cluster and MLflow tracking server on 127.0.0.1, for tests.

The master and workers are the pinned pyspark's own (``spark-class ...deploy.master.Master``
and ``...deploy.worker.Worker``); every process is started in a session of its own, and
:meth:`Processes.stop` ends each process group and then sweeps every process left whose
working directory lies under the test's folder (executor JVMs, Python workers, Horovod
ranks), so nothing outlives the test, pass or fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spark_home() -> Path:
    """The pinned pyspark package: its bin/ and jars/ are a whole Spark distribution."""
    import pyspark

    return Path(pyspark.__file__).parent


def stack_without_project(folder: Path) -> Path:
    """A Python environment with the project's stack but without the project; its python.

    The new venv's site-packages holds one ``.pth`` line naming this venv's site-packages,
    so the stack imports, while the editable install of the project (itself a ``.pth`` file
    there, which Python processes only in site directories) does not: an executor running
    this python imports the project only from what spark-submit shipped.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    site = next((folder / "lib").glob("python3*/site-packages"))
    stack = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "stack.pth").write_text(f"{stack}\n")
    return folder / "bin" / "python"


@dataclass
class Processes:
    """Processes started for a test, stopped together."""

    root: Path
    started: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen:
        """Start ``argv`` in its own session, logging to ``root/logs/NAME.log``."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def leftovers(self) -> list[psutil.Process]:
        """Processes still alive that belong to this test (by group or working directory)."""
        groups = {proc.pid for proc in self.started}
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == os.getpid():
                continue
            try:
                if os.getpgid(proc.pid) in groups or _under(proc.cwd(), self.root):
                    found.append(proc)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def close(self, what: str) -> None:
        """:meth:`stop`, then fail if any process of ``what`` is still alive."""
        self.stop()
        left = self.leftovers()
        assert not left, f"{what} processes left behind: {[p.pid for p in left]}"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every group, then SIGKILL whatever is left, and wait for it."""
        for proc in self.started:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.leftovers():
            time.sleep(0.2)
        for proc in self.started:
            _signal_group(proc.pid, signal.SIGKILL)
        for proc in self.leftovers():
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self.leftovers(), timeout=10)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _under(path: str, root: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Cluster:
    """A running standalone cluster."""

    master_url: str
    master_ui: str
    workers: int


def _wait_until(check, timeout: float, what: str, logs: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s\n{logs[-3000:]}")


def _alive_workers(ui: str) -> int:
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=2) as answer:
            import json

            state = json.load(answer)
    except OSError:
        return 0
    return sum(1 for worker in state.get("workers", []) if worker.get("state") == "ALIVE")


@contextmanager
def standalone_cluster(
    root: Path, worker_python: Path, workers: int = 2, cores: int = 1, memory: str = "3g"
) -> Iterator[Cluster]:
    """A master and ``workers`` workers of ``cores`` cores each, started in ``root``.

    Args:
        root: The test's folder: logs, worker folders; every process runs below it.
        worker_python: The Python the executors are told to use.
        workers: Number of workers.
        cores: Cores per worker (1: every Horovod rank lands on an executor of its own).
        memory: Memory per worker.

    Yields:
        The master's URL and web UI, once every worker is registered.
    """
    home = spark_home()
    procs = Processes(root)
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(root / "logs"),
        "PYSPARK_PYTHON": str(worker_python),
    }
    env.pop("PYSPARK_DRIVER_PYTHON", None)
    env.pop("PYTHONPATH", None)
    spark_class = str(home / "bin" / "spark-class")
    port, ui_port = free_port(), free_port()
    master_url = f"spark://127.0.0.1:{port}"
    ui = f"http://127.0.0.1:{ui_port}"
    try:
        procs.start(
            "master",
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui_port)],
            env, root,
        )  # fmt: skip
        _wait_until(lambda: _ui_up(ui), 60, "master", procs.log("master"))
        for index in range(workers):
            folder = root / f"worker-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            procs.start(
                f"worker-{index}",
                [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(cores), "--memory", memory, "--work-dir", str(folder),
                 "--webui-port", str(free_port()), master_url],
                env, folder,
            )  # fmt: skip
        _wait_until(lambda: _alive_workers(ui) == workers, 90, "workers", procs.log("worker-0"))
        yield Cluster(master_url=master_url, master_ui=ui, workers=workers)
    finally:
        procs.close("cluster")


def _ui_up(ui: str) -> bool:
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def mlflow_server(root: Path, artifacts: Path) -> Iterator[str]:
    """``mlflow server`` with a sqlite backend and proxied artifacts under ``artifacts``."""
    procs = Processes(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    try:
        procs.start(
            "mlflow-server",
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow-server.db'}",
             "--artifacts-destination", str(artifacts), "--workers", "1"],
            env, root,
        )  # fmt: skip
        _wait_until(lambda: _health(url), 90, "mlflow server", procs.log("mlflow-server"))
        yield url
    finally:
        procs.close("mlflow server")


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
