"""The ASGI guard of ``dlpipe serve`` around a real (tiny) ASGI app, without a network."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pipelines.rest_server import MAX_ERROR_MESSAGE_CHARS, RequestGuard


async def _nan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echo the body length as JSON with the NaN an old model's float column gives."""
    message = await receive()
    body = json.dumps({"n": len(message["body"]), "p": float("nan"), "q": [float("inf")]})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


def _call(app: Any, body: bytes, headers: list[tuple[bytes, bytes]], chunk: int = 1 << 20):
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    incoming = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    length = dict(start["headers"])[b"content-length"]
    assert int(length) == len(payload)
    return start["status"], payload


JSON = (b"content-type", b"application/json")


def test_nan_and_infinity_become_null() -> None:
    status, body = _call(RequestGuard(_nan_app, 100), b"abc", [JSON])
    assert status == 200
    assert b"NaN" not in body and json.loads(body) == {"n": 3, "p": None, "q": [None]}


def test_bodies_over_the_limit_get_413_declared_or_streamed() -> None:
    guard = RequestGuard(_nan_app, 100)
    declared = [JSON, (b"content-length", b"101")]
    status, body = _call(guard, b"x" * 101, declared)
    assert status == 413 and "101 bytes" in json.loads(body)["message"]
    status, body = _call(guard, b"x" * 101, [JSON], chunk=10)  # no length: counted
    assert status == 413 and "exceeds the limit of 100 bytes" in json.loads(body)["message"]
    assert _call(guard, b"x" * 100, [JSON], chunk=10)[0] == 200


def test_no_content_type_is_415_and_long_error_messages_are_cut() -> None:
    status, body = _call(RequestGuard(_nan_app, 100), b"{}", [])
    assert status == 415 and "Content-Type" in json.loads(body)["message"]

    async def echo_error(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        body = json.dumps({"message": "bad input: " + message["body"].decode()}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [JSON]})
        await send({"type": "http.response.body", "body": body})

    status, body = _call(RequestGuard(echo_error, 1 << 20), b"y" * 50_000, [JSON])
    message = json.loads(body)["message"]
    assert status == 400 and message.startswith("bad input: yyy")
    assert len(message) <= MAX_ERROR_MESSAGE_CHARS + 20
