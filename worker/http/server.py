"""uvicorn in its own thread, on a socket bound before it starts (a taken port is one error line naming
WORKER_HTTP__PORT, and port 0 is known at once), and the drain that SIGTERM starts: new requests get 503,
those being answered finish, then the server closes."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from captionfleet.core.settings import HttpSettings, WorkerSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.http.app import ApiContext, create_app
from captionfleet.worker.http.guard import ServerState
from captionfleet.worker.http.lane import BoundedLane
from captionfleet.worker.lanes import InteractiveItem
from captionfleet.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class HttpPortError(Exception):
    """The API's port could not be opened; the message names the setting to change."""


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError as error:
        raise HttpPortError(
            f"cannot serve the caption API on {host}:{port}: {error}; set WORKER_HTTP__PORT to a free port "
            "(0 picks one) or WORKER_HTTP__HOST to an address of this machine"
        ) from error
    sock.setblocking(False)
    return sock


class ApiServer:
    def __init__(self, ctx: ApiContext) -> None:
        settings: HttpSettings = ctx.settings
        settings.check_auth()  # SettingsError: reachable from elsewhere without tokens
        self.ctx = ctx
        self._socket = _bind(settings.host, settings.port)
        self.host = settings.host
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            create_app(ctx),
            lifespan="off",
            log_config=None,  # the worker's logging (core/logs.py); uvicorn's access log is off: no headers logged
            access_log=False,
            server_header=False,
            timeout_keep_alive=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http-api", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as error:  # reported by start() or seen as not alive
            self._error = error
            log.exception("the caption API server stopped")

    def start(self, timeout_s: float = 30.0) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise HttpPortError(f"the caption API did not start on {self.host}:{self.port}: {self._error}")
            time.sleep(0.01)
        auth = "bearer tokens required" if self.ctx.settings.auth_required() else "no auth (loopback only)"
        log.info("caption API on http://%s:%d/v1/captions (%s)", self.host, self.port, auth)
        return self

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests (503) and wait for those being answered; False if some were still at the timeout."""
        self.ctx.state.drain()
        idle = self.ctx.state.wait_idle(timeout_s)
        if not idle:
            log.warning("%d API requests still unanswered after %.1fs of draining", self.ctx.state.active, timeout_s)
        return idle

    def close(self) -> None:
        """Stop serving and free the port; also for a server opened but never started (its job did not run)."""
        self._server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        self._socket.close()


def worker_name(settings: WorkerSettings) -> str:
    """The worker's name in its answers (``worker``, X-Captionfleet-Worker) and its Kafka client id."""
    return settings.kafka.client_id or f"captionfleet-{socket.gethostname()}-{os.getpid()}"


def open_api(
    settings: WorkerSettings,
    offer: Callable[[InteractiveItem], None],
    version: Callable[[], str],
    fetcher: Fetcher,
    metrics: WorkerMetrics,
    worker: str,
    *,
    starting: bool = False,
) -> ApiServer:
    """The caption API over the engine's interactive intake ``offer``, its port bound but not served yet
    (``start()``). ``starting``: served before ``offer`` and ``version`` can be called, every API request is
    503 with Retry-After until ``ctx.state.ready()``: a bulk job serves it so from before its model loads (a
    taken port fails it before it writes anything) until its pipeline exists. Raises HttpPortError or
    SettingsError (reachable beyond loopback without tokens)."""
    lane = BoundedLane(offer, version, settings.http.max_queued, metrics)
    state = ServerState(starting=starting)
    ctx = ApiContext(settings.http, settings.decoding, lane, fetcher, metrics, worker, state)
    return ApiServer(ctx)


def start_api(
    settings: WorkerSettings,
    offer: Callable[[InteractiveItem], None],
    version: Callable[[], str],
    fetcher: Fetcher,
    metrics: WorkerMetrics,
    worker: str,
) -> ApiServer:
    """``open_api``, started."""
    return open_api(settings, offer, version, fetcher, metrics, worker).start()
