"""REST serving: a registered model behind MLflow's scoring app, in this process.

In: a model URI (default ``models:/<model_name>@champion``), host, port and the ``serve``
config. Out: a server with MLflow's scoring protocol (``/ping``, ``/health``, ``/version``,
``/invocations``) until SIGTERM or SIGINT stops it; then a small summary. Requests carry
images as base64 in a binary ``image`` column::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG/JPEG file>"]]}}

and get one prediction per image (``predicted_label``, ``probability``, ``probabilities``,
``error``; unknown values are JSON ``null``). Bound to 127.0.0.1 unless told otherwise.

The app is MLflow's own (``mlflow.pyfunc.scoring_server.init``) run by uvicorn in this
process, not ``mlflow models serve``: that command starts uvicorn as a child, which a SIGTERM
to ``dlpipe`` left running with the port. Here there is no child to orphan: SIGTERM/SIGINT
stop the server within ``serve.stop_timeout_s`` and ``dlpipe serve`` exits 0. A small ASGI
layer (:class:`RequestGuard`) answers 413 to a body over ``serve.max_body_mb`` before it is
decoded, and shortens error messages that would echo a whole request back.

``python -m pipelines.rest_server --model-uri URI ...`` runs the same server without the CLI (what
:func:`serve_command` returns, for supervisors and tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

from pipelines.config import Config
from pipelines.errors import UserError
from pipelines.registry import resolve_model_uri
from pipelines.store import Store
from pipelines.tracking import use_stores

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Error messages longer than this are cut: MLflow's invalid-JSON error quotes the whole body.
MAX_ERROR_MESSAGE_CHARS = 1000

#: Seconds past ``stop_timeout_s`` before a stop that still hangs (a prediction running in a
#: worker thread cannot be cancelled) ends the process with ``os._exit``.
_HARD_STOP_GRACE_S = 2.0


class RequestGuard:
    """ASGI middleware: 413 for a body over ``max_bytes``, 415 without a content type.

    The body is checked against ``Content-Length`` before any of it is read, and counted
    while it streams (chunked requests declare no length), so an oversized body is never
    held in memory nor decoded. uvicorn discards the unread rest of a rejected body and keeps
    the connection usable. A POST without ``Content-Type`` gets 415 with a message (MLflow's
    app fails on it with a bare 500). Error responses (status >= 400) whose JSON ``message``
    is longer than :data:`MAX_ERROR_MESSAGE_CHARS` are cut to that length, and NaN or
    Infinity in a JSON response become ``null`` (see :func:`_clean_responses`).

    Args:
        app: The ASGI app to protect (MLflow's scoring app).
        max_bytes: Largest accepted request body, in bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope (lifespan and websockets pass through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send, int(declared))
            return
        if scope.get("method") == "POST" and not _header(scope, b"content-type"):
            message = (
                "no Content-Type header: send JSON as application/json "
                "(or text/csv, application/vnd.apache.parquet)"
            )
            await _send_json(send, 415, {"error_code": "BAD_REQUEST", "message": message})
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect is left

        await self.app(scope, replay, _clean_responses(send))

    async def _too_large(self, send: Send, declared: int | None) -> None:
        size = f" of {declared} bytes" if declared is not None else ""
        limit_mb = self.max_bytes / 2**20
        message = (
            f"request body{size} exceeds the limit of {self.max_bytes} bytes "
            f"(serve.max_body_mb={limit_mb:g}); send fewer or smaller images per request"
        )
        await _send_json(send, 413, {"error_code": "REQUEST_TOO_LARGE", "message": message})


def _header(scope: Scope, name: bytes) -> str | None:
    """The value of a request header (``name`` in lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _clean_responses(send: Send) -> Send:
    """Wrap ``send``: cut an error's long JSON message; write NaN and Infinity as null.

    Models logged before unknown numbers became null (and any other pyfunc model) still
    return NaN, which MLflow writes as a bare ``NaN``; strict JSON parsers reject the whole
    response, so this server never sends one.
    """
    held: Message | None = None
    parts: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            held = message  # sent with the body, once its length is known
            return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(parts)
        if held.get("status", 200) >= 400:
            body = _shorten(body)
        elif (b"NaN" in body or b"Infinity" in body) and _is_json(held):
            body = _without_nan(body)
        headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", b"%d" % len(body)))
        await send({**held, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _is_json(start: Message) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"application/json")
        for k, v in start.get("headers", [])
    )


def _without_nan(body: bytes) -> bytes:
    """Re-encode a JSON body with NaN and +-Infinity as null (unchanged if not JSON)."""

    def null(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: null(item) for key, item in value.items()}
        if isinstance(value, list):
            return [null(item) for item in value]
        return value

    try:
        payload = json.loads(body)
    except ValueError:
        return body
    return json.dumps(null(payload), allow_nan=False).encode()


def _shorten(body: bytes) -> bytes:
    """Cut the ``message`` of a JSON error body to MAX_ERROR_MESSAGE_CHARS; drop tracebacks."""
    if len(body) <= MAX_ERROR_MESSAGE_CHARS:
        return body
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:MAX_ERROR_MESSAGE_CHARS] + b" ... (cut)"
    if not isinstance(payload, dict):
        return body
    message = str(payload.get("message", ""))
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        payload["message"] = message[:MAX_ERROR_MESSAGE_CHARS] + " ... (cut)"
    payload.pop("stack_trace", None)  # server internals; the server log has them
    return json.dumps(payload).encode()


def build_app(model: Any, max_body_mb: float) -> ASGIApp:
    """MLflow's scoring app for a loaded pyfunc model, behind :class:`RequestGuard`.

    Args:
        model: A ``mlflow.pyfunc.PyFuncModel``.
        max_body_mb: Largest accepted request body in MiB.

    Returns:
        The ASGI app.
    """
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(model), int(max_body_mb * 2**20))


class _Server:
    """uvicorn in this process; the first SIGTERM/SIGINT stops it, bounded in time."""

    def __init__(self, app: ASGIApp, host: str, port: int, stop_timeout_s: float) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                if not self.should_exit:
                    outer.stopped(sig)
                super().handle_exit(sig, frame)

        self.stop_timeout_s = stop_timeout_s
        self.stopped_by: str | None = None
        self._hard_stop: threading.Timer | None = None
        self.server = Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                timeout_graceful_shutdown=max(1, round(stop_timeout_s)),
                log_level="info",
            )
        )

    def stopped(self, sig: int) -> None:
        """Note the first stop signal and bound the stop in time."""
        if self.stopped_by is not None:
            return
        self.stopped_by = signal.Signals(sig).name
        log.info("serve: %s, stopping (at most %gs)", self.stopped_by, self.stop_timeout_s)
        # A prediction in a worker thread cannot be cancelled, and asyncio.run joins those
        # threads on the way out: a stop must not wait on them for ever.
        self._hard_stop = threading.Timer(self.stop_timeout_s + _HARD_STOP_GRACE_S, os._exit, (0,))
        self._hard_stop.daemon = True
        self._hard_stop.start()

    def _note(self, sig: int, frame: FrameType | None) -> None:
        # Outside uvicorn's own handlers: just before it installs them, and when it re-raises
        # the signal it caught after stopping (the default handlers would then kill the
        # process, or raise KeyboardInterrupt, after a clean stop).
        self.stopped(sig)
        self.server.should_exit = True

    def run(self) -> None:
        """Serve until stopped; raise UserError if the server cannot start (port taken)."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, self._note)
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
            raise UserError(
                f"the server could not start on {self.server.config.host}:"
                f"{self.server.config.port} (see the log above: is the port in use?)"
            ) from exc
        finally:
            if self._hard_stop is not None:
                self._hard_stop.cancel()  # stopped in time: the worker threads are joined
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(
    model_uri: str,
    host: str,
    port: int,
    *,
    max_body_mb: float,
    stop_timeout_s: float,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
) -> dict[str, Any]:
    """Load the model and serve it until SIGTERM or SIGINT.

    Args:
        model_uri: Any MLflow model URI (a pinned ``models:/<name>/<version>`` from
            :func:`serve`).
        host: Bind address.
        port: TCP port.
        max_body_mb: Largest accepted request body in MiB (413 above it).
        stop_timeout_s: Seconds a stop waits for requests in flight.
        tracking_uri: MLflow tracking URI to load ``models:/`` and ``runs:/`` URIs from.
        registry_uri: MLflow registry URI when it is not the tracking store's.

    Returns:
        ``model_uri``, ``url``, ``stopped`` and ``stopped_by`` (the signal's name).

    Raises:
        UserError: The server could not bind its port.
    """
    import mlflow
    import mlflow.pyfunc

    use_stores(tracking_uri, registry_uri)
    # A signal while the model loads (TensorFlow start-up takes seconds) stops as cleanly.
    stopped: list[str] = []

    def early_stop(sig: int, frame: FrameType | None) -> None:
        stopped.append(signal.Signals(sig).name)
        raise _StoppedWhileLoading

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, early_stop)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        server = _Server(build_app(model, max_body_mb), host, port, stop_timeout_s)
    except _StoppedWhileLoading:
        return _summary(model_uri, host, port, stopped[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info(
        "serve: %s at http://%s:%d/invocations (max body %g MB; SIGTERM or Ctrl-C stops)",
        model_uri,
        host,
        port,
        max_body_mb,
    )
    server.run()
    return _summary(model_uri, host, port, server.stopped_by)


class _StoppedWhileLoading(BaseException):
    """SIGTERM or SIGINT arrived before the server started.

    A BaseException, as KeyboardInterrupt is: MLflow's ``except Exception`` must not catch it.
    """


def _summary(uri: str, host: str, port: int, stopped_by: str | None) -> dict[str, Any]:
    return {
        "model_uri": uri,
        "url": f"http://{host}:{port}",
        "stopped": True,
        "stopped_by": stopped_by,
    }


def serve_command(
    config: Config, model: str | None, host: str, port: int, store: Store | None = None
) -> tuple[list[str], dict[str, str], str]:
    """The server as a separate process: its command line, environment and model URI.

    The command (``python -m pipelines.rest_server``) serves the resolved model as
    :func:`serve` does and stops the same way on SIGTERM.
    """
    store = store or Store.of(config)
    resolved = _resolve(config, store, model)
    command = [
        sys.executable, "-m", "pipelines.rest_server",
        "--model-uri", resolved,
        "--host", host,
        "--port", str(port),
        "--max-body-mb", repr(config.serve.max_body_mb),
        "--stop-timeout-s", repr(config.serve.stop_timeout_s),
    ]  # fmt: skip
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = store.tracking_uri
    if store.registry_uri:
        env["MLFLOW_REGISTRY_URI"] = store.registry_uri
    return command, env, resolved


def serve(config: Config, store: Store, model: str | None, host: str, port: int) -> dict[str, Any]:
    """Serve the model in this process until SIGTERM or SIGINT; then return a summary.

    Args:
        config: The configuration (``serve``, ``mlflow`` and ``score.model`` sections).
        store: The MLflow stores the model is resolved in.
        model: Model URI (default: ``score.model``, else the champion alias), pinned to a
            version before serving, so that a later promotion does not change answers.
        host: Bind address.
        port: TCP port.

    Returns:
        See :func:`run_server`.

    Raises:
        UserError: The model, alias or version does not exist, or the port is taken.
    """
    uri = _resolve(config, store, model)
    return run_server(
        uri,
        host,
        port,
        max_body_mb=config.serve.max_body_mb,
        stop_timeout_s=config.serve.stop_timeout_s,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    )


def _resolve(config: Config, store: Store, model: str | None) -> str:
    return resolve_model_uri(
        model or config.score.model,
        model_name=config.mlflow.model_name,
        alias=config.mlflow.champion_alias,
        tracking_uri=store.tracking_uri,
        registry_uri=store.registry_uri,
    ).uri


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.rest_server``: serve one model URI; exit 0 once stopped by a signal."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.rest_server", description=__doc__)
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--max-body-mb", type=float, default=32.0)
    parser.add_argument("--stop-timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dlpipe: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        run_server(
            args.model_uri,
            args.host,
            args.port,
            max_body_mb=args.max_body_mb,
            stop_timeout_s=args.stop_timeout_s,
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            registry_uri=os.environ.get("MLFLOW_REGISTRY_URI"),
        )
    except UserError as exc:
        print(f"pipelines.rest_server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
