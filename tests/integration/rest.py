"""Helpers of the tests that start a real MLflow scoring server and call it over HTTP."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any


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
        return json.loads(response.read())["predictions"]


def stop(server: subprocess.Popen, seconds: float) -> None:
    """Terminate the server; kill it if it has not exited within ``seconds``."""
    server.terminate()
    try:
        server.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
