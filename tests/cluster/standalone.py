"""A real Spark standalone cluster and MLflow tracking server on 127.0.0.1, for tests.

The master and workers are the pinned pyspark's own (``spark-class ...deploy.master.Master``
and ``...deploy.worker.Worker``); every process is started in a session of its own, and
:meth:`Processes.stop` ends each process group and then sweeps every process left whose
working directory lies under the test's folder (executor JVMs, Python workers, Horovod
ranks), so nothing outlives the test, pass or fail.
"""

from __future__ import annotations

import os
import secrets
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
REPO = Path(__file__).resolve().parents[2]


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
        """Processes still alive that belong to this test (by group or working directory).

        Dead ones are not: the started processes that ended are reaped first, and a zombie
        (ended, not yet reaped by its parent) is not counted.
        """
        for proc in self.started:
            proc.poll()
        groups = {proc.pid for proc in self.started}
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
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


#: What a shared standalone cluster enables besides its secret (README, "Security").
SECURED = {
    "spark.authenticate": "true",
    "spark.network.crypto.enabled": "true",
    "spark.io.encryption.enabled": "true",
}


def spark_properties(path: Path, properties: dict[str, str]) -> Path:
    """Write ``properties`` as a Spark properties file readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text("".join(f"{key} {value}\n" for key, value in properties.items()))
    return path


@dataclass
class Cluster:
    """A running standalone cluster, whose workers a test may kill and start again."""

    master_url: str
    master_ui: str
    workers: int
    root: Path
    processes: Processes
    env: dict[str, str]
    cores: int
    memory: str
    #: Each worker's current folder (a restarted worker gets a new one), JVM and UI port.
    folders: dict[int, Path] = field(default_factory=dict)
    jvms: dict[int, subprocess.Popen] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)

    def start_worker(self, index: int, wait: bool = True) -> None:
        """Start worker ``index`` (again) in a folder of its own, by default until registered."""
        folder = self.root / f"worker-{index}"
        if index in self.folders:  # a restart: the dead worker's folder keeps its logs
            folder = self.root / f"worker-{index}.{len(list(self.root.glob(f'worker-{index}.*')))}"
        folder.mkdir(parents=True, exist_ok=True)
        self.folders[index] = folder
        port = free_port()
        self.jvms[index] = self.processes.start(
            folder.name,
            [str(spark_home() / "bin" / "spark-class"), "org.apache.spark.deploy.worker.Worker",
             "--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
             "--work-dir", str(folder), "--webui-port", str(port), self.master_url],
            self.env, folder,
        )  # fmt: skip
        self.ports[index] = port
        if wait:
            self.wait_for_workers()

    def wait_for_workers(self) -> None:
        """Wait until every worker started last is registered with the master."""
        _wait_until(
            lambda: _alive_ports(self.master_ui) >= set(self.ports.values()),
            90,
            "workers",
            "\n".join(self.processes.log(folder.name) for folder in self.folders.values()),
        )

    def worker_of(self, process: psutil.Process) -> int:
        """The worker whose folder holds ``process``'s working directory (its executor's)."""
        cwd = process.cwd()
        (index,) = [i for i, folder in self.folders.items() if _under(cwd, folder)]
        return index

    def revive(self) -> None:
        """Start again every worker whose JVM has ended (one a test killed)."""
        for index, jvm in self.jvms.items():
            if jvm.poll() is not None:
                self.start_worker(index, wait=False)
        self.wait_for_workers()

    def kill_worker(self, index: int) -> list[int]:
        """SIGKILL worker ``index`` whole: its JVM, executors, Python workers, Horovod ranks.

        What belongs to it: every process whose working directory lies under the worker's
        folder, and every descendant of its JVM. All are killed at once (a process left
        alive a moment would notice the others die and act on it).

        Returns:
            The pids killed.
        """
        folder = self.folders[index]
        doomed: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.jvms[index].pid)
            doomed = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter(["pid"]):
            try:
                if _under(proc.cwd(), folder):
                    doomed.setdefault(proc.pid, proc)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        for proc in doomed.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(doomed.values()), timeout=10)
        return sorted(doomed)


def _wait_until(check, timeout: float, what: str, logs: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready within {timeout:.0f} s\n{logs[-3000:]}")


def _alive_ports(ui: str) -> set[int]:
    """The web UI ports of the workers the master lists as alive."""
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=2) as answer:
            import json

            state = json.load(answer)
    except OSError:
        return set()
    return {
        int(worker["webuiaddress"].rsplit(":", 1)[-1])
        for worker in state.get("workers", [])
        if worker.get("state") == "ALIVE"
    }


@contextmanager
def standalone_cluster(
    root: Path,
    worker_python: Path,
    workers: int = 2,
    cores: int = 1,
    memory: str = "3g",
    properties: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A master and ``workers`` workers of ``cores`` cores each, started in ``root``.

    Args:
        root: The test's folder: logs, worker folders; every process runs below it.
        worker_python: The Python the executors are told to use.
        workers: Number of workers.
        cores: Cores per worker (1: every Horovod rank lands on an executor of its own).
        memory: Memory per worker.
        properties: Spark properties of the master and the workers (e.g. :data:`SECURED`
            and ``spark.authenticate.secret``), in ``spark-defaults.conf`` of a
            ``SPARK_CONF_DIR`` of their own (owner-only), as a standalone daemon reads them:
            off its command line, so a secret shows in no process list.

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
    for name in [key for key in env if key.startswith("MLFLOW_")]:
        env.pop(name)  # nothing of the test's tracking credentials reaches the cluster
    if properties:
        spark_properties(root / "conf" / "spark-defaults.conf", properties)
        env["SPARK_CONF_DIR"] = str(root / "conf")
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
        cluster = Cluster(master_url, ui, workers, root, procs, env, cores, memory)
        for index in range(workers):
            cluster.start_worker(index, wait=False)
        cluster.wait_for_workers()
        yield cluster
    finally:
        procs.close("cluster")


def _ui_up(ui: str) -> bool:
    try:
        with urllib.request.urlopen(f"{ui}/json/", timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def mlflow_server(
    root: Path, artifacts: Path, admin: tuple[str, str] | None = None
) -> Iterator[str]:
    """``mlflow server`` with a sqlite backend and proxied artifacts under ``artifacts``.

    Args:
        root: The server's folder: its stores, its auth configuration, its log.
        artifacts: The artifact root it serves.
        admin: ``(user, password)``: run MLflow's basic-auth app (``--app-name
            basic-auth``), every request needing credentials. Its user store and
            configuration lie in ``root``; the admin user is created on the first start
            from ``MLFLOW_AUTH_ADMIN_PASSWORD`` in the server's environment (not a file).
    """
    root.mkdir(parents=True, exist_ok=True)
    procs = Processes(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    auth: list[str] = []
    if admin is not None:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
            f"admin_username = {admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
            # The auth app's CSRF protection signs with it.
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        )
        auth = ["--app-name", "basic-auth"]
    try:
        server = procs.start(
            "mlflow-server",
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow-server.db'}",
             "--artifacts-destination", str(artifacts), "--workers", "1", *auth],
            env, root,
        )  # fmt: skip
        _wait_until(lambda: _health(url) or server.poll() is not None, 90, "mlflow server")
        assert server.poll() is None, f"mlflow server ended:\n{procs.log('mlflow-server')[-3000:]}"
        yield url
    finally:
        procs.close("mlflow server")


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def build_project_zip(dist: Path, stack: str = "default") -> Path:
    """``make wheel`` into ``dist``: the project as the zip ``spark-submit --py-files`` ships.

    ``stack``: whose venv builds it (``keras``: ``.venv-keras``, for the Keras stack's tests).
    """
    venv_dir = ".venv-keras" if stack == "keras" else ".venv"
    subprocess.run(
        # -o: a venv older than pyproject.toml is not rebuilt from inside a test.
        ["make", "-s", "-o", f"{venv_dir}/.ready", "wheel", f"DIST={dist}", f"STACK={stack}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (archive,) = dist.glob("spark_dl_pipelines-*.zip")
    return archive


def driver_env() -> dict[str, str]:
    """The submitting shell's environment: Spark's home, loopback only, no tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYSPARK"))}
    env.pop("PYTHONPATH", None)
    return {**env, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1"}


def spark_submit(
    master: str, package: Path, python: Path, job: str, properties: Path | None = None
) -> list[str]:
    """spark-submit of ``jobs/JOB`` shipping the project zip, driver bound to loopback.

    ``properties``: a Spark properties file (the cluster's secret and security settings).
    """
    return [
        str(spark_home() / "bin" / "spark-submit"),
        "--master", master,
        *(["--properties-file", str(properties)] if properties else []),
        "--py-files", str(package),
        "--conf", f"spark.pyspark.python={python}",
        "--conf", "spark.driver.host=127.0.0.1",
        "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.ui.enabled=false",
        str(REPO / "jobs" / job),
    ]  # fmt: skip
