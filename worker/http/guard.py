"""What is refused before a request is read: the bearer token, a server still starting or draining, too many
requests at once, a body over the limit. An ASGI middleware around the API routes (``/v1/...``), so a refused
request costs no parsing and an oversized body is never held whole.

Tokens are compared in constant time (``hmac.compare_digest``, against every configured token), and neither
they nor bodies are logged.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import SecretStr

from captionfleet.core.failures import TOO_LARGE
from captionfleet.core.settings import HttpSettings
from captionfleet.worker.http.answers import JSON, error_bytes
from captionfleet.worker.metrics import WorkerMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

UNAUTHORIZED = "unauthorized"
DRAINING = "draining"
STARTING = "starting"
BUSY = "busy"


def token_ok(header: str | None, tokens: list[SecretStr]) -> bool:
    """``Authorization: Bearer <token>`` names one of ``tokens``; every token is compared, in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    given = value.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token.get_secret_value().encode())
    return matched


class ServerState:
    """Requests being answered, whether the server drains (SIGTERM), and whether it is still starting: served
    before the model side behind it exists (a bulk job loading its model), it answers 503 until ``ready()``.
    Read from other threads."""

    def __init__(self, *, starting: bool = False) -> None:
        self._lock = threading.Condition()
        self.active = 0
        self.draining = False
        self.starting = starting

    def enter(self, limit: int) -> bool:
        with self._lock:
            if self.active >= limit:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            self._lock.notify_all()

    def drain(self) -> None:
        with self._lock:
            self.draining = True

    def ready(self) -> None:
        """The model side exists: requests are admitted from now on."""
        with self._lock:
            self.starting = False

    def wait_idle(self, timeout_s: float) -> bool:
        """After drain(): wait until no request is being answered; False if some still are at the timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self.active == 0, timeout=timeout_s)


class Guard:
    def __init__(self, app: App, settings: HttpSettings, state: ServerState, metrics: WorkerMetrics) -> None:
        self.app = app
        self.settings = settings
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        retry = {"retry-after": str(self.settings.retry_after_s)}
        if self.settings.auth_required() and not token_ok(headers.get("authorization"), self.settings.tokens):
            message = "missing or unknown bearer token: send Authorization: Bearer <one of WORKER_HTTP__TOKENS>"
            await self._refuse(send, 401, UNAUTHORIZED, message, {"www-authenticate": "Bearer"})
            return
        if self.state.draining:
            await self._refuse(send, 503, DRAINING, "this worker is shutting down: retry on another", retry)
            return
        if self.state.starting:
            message = "this worker is starting (its model is loading): retry after the Retry-After seconds"
            await self._refuse(send, 503, STARTING, message, retry)
            return
        if not self.state.enter(self.settings.max_concurrent):
            message = (
                f"{self.settings.max_concurrent} requests are being answered already (WORKER_HTTP__MAX_CONCURRENT): "
                "retry after the Retry-After seconds"
            )
            await self._refuse(send, 429, BUSY, message, retry)
            return
        self.metrics.http_in_flight.inc()
        try:
            body = await self._body(headers, receive, send)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.metrics.http_in_flight.dec()
            self.state.leave()

    async def _body(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (as soon as the declared or received size says so)."""
        limit = self.settings.max_body_bytes
        too_large = (
            f"the body is over {limit} bytes (WORKER_HTTP__MAX_BODY_BYTES): send fewer or smaller images, or uris"
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(send, 413, TOO_LARGE, too_large, {"connection": "close"})
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, 413, TOO_LARGE, too_large, {"connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send, status: int, kind: str, message: str, headers: dict[str, str]) -> None:
        self.metrics.http_refused.labels(kind).inc()
        body = error_bytes(kind, message)
        raw = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        raw += [(name.encode(), value.encode()) for name, value in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read by the guard, once; then the connection's own messages (a disconnect, for the route)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
