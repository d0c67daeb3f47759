"""Helpers of the tests that start a real MLflow scoring server and call it over HTTP.

Every request goes to 127.0.0.1 with a timeout; every helper that waits is bounded in time.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(
    base: str, server: subprocess.Popen, output: Callable[[], str], seconds: float = 120
) -> None:
    """Poll ``base/ping`` until it answers 200; fail with the server's output if it exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited: {output()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as ping:
                if ping.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server did not answer {base}/ping within {seconds}s")


def post_images(base: str, images: Sequence[bytes], timeout: float) -> list[dict[str, Any]]:
    """POST image files as base64 to ``base/invocations`` (the README's format); the rows."""
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(image).decode("ascii")] for image in images],
        }
    }
    request = urllib.request.Request(
        f"{base}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return strict_json(response.read())["predictions"]


def image_request(images: Sequence[bytes]) -> bytes:
    """The README's request body for image files: base64 in an ``image`` column."""
    data = [[base64.b64encode(image).decode("ascii")] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as strict parsers do: ``NaN`` and ``Infinity`` are errors, not numbers."""

    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def post(
    base: str,
    body: bytes,
    content_type: str | None = "application/json",
    timeout: float = 30,
    chunked: bool = False,
) -> tuple[int, bytes]:
    """POST ``body`` to ``base/invocations``; the status and body of any answer (4xx too).

    ``chunked`` sends it with ``Transfer-Encoding: chunked``, which declares no length.
    """
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        if chunked:
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            connection.request(
                "POST", "/invocations", body=pieces, headers=headers, encode_chunked=True
            )
        else:
            connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running (zombies count as gone)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def in_group(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on 127.0.0.1:``port`` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def stop(server: subprocess.Popen, seconds: float, group: bool = False) -> None:
    """Terminate the server; kill it if it has not exited within ``seconds``.

    With ``group`` (a server started with ``start_new_session=True``) whatever is left of
    its process group is killed too, even once the server itself has exited and been reaped,
    so that nothing it started outlives the test.
    """
    tree = process_tree(server.pid)
    server.terminate()
    try:
        server.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    for process in alive(tree):
        process.kill()
    if group:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
