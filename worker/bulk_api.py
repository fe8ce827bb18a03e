"""The caption API beside a bulk job (WORKER_HTTP__ENABLED): the folder, S3-prefix and archive jobs serve it
for as long as they run, from their one pipeline.

The API's images go through the pipeline's latency lane (``CaptionPipeline.offer``), ahead of the job's
backlog, while WORKER_HTTP__STREAM_SHARE of each batch's rows stays the job's. Their answers go to their
clients only (the pipeline keeps them out of the job's results, stats and per-row hook), so the job's
outputs, markers and resume are what they are without the API.

The port is bound and served before the job writes anything (a taken port fails the run before --overwrite
removes a thing, and before the model loads); until the job's pipeline exists (its model loading, its input
listed) every API request gets a quick 503 "starting" with Retry-After, not a connection that hangs, and a
job with nothing to do closes the port without ever admitting one. When the job's input ends, or on SIGTERM,
the API drains as ``captionfleet serve`` does: new requests 503, those admitted are answered by the model
thread, which keeps running until then (within WORKER_SHUTDOWN__GRACE_S); only then does the job's own stop
run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict, TypeVar

from captionfleet.core.settings import HttpSettings, WorkerSettings
from captionfleet.worker.accounting import answer_interactive
from captionfleet.worker.http.items import ApiItem
from captionfleet.worker.lanes import InteractiveItem
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import Health, WorkerMetrics
from captionfleet.worker.pipeline import CaptionPipeline, Item

if TYPE_CHECKING:
    from captionfleet.worker.http.server import ApiServer

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")  # the job's own item type, kept through run_input

ItemHook = Callable[[Item, Result], None]


class LaneOptions(TypedDict):
    """The ``CaptionPipeline`` arguments the API decides (``CaptionPipeline(..., **api.lane_options())``)."""

    on_item_result: ItemHook | None
    interactive_wait_ms: int | None
    bulk_share: float
    pause_batches: bool


class BulkApi:
    """The API for one bulk job, or none (``BulkApi.off()``, and ``open`` when WORKER_HTTP__ENABLED is false):
    then every method leaves the job exactly as it runs without it. Use as a context manager (it frees the port)."""

    def __init__(self, http: HttpSettings, grace_s: float, metrics: WorkerMetrics) -> None:
        self.server: ApiServer | None = None  # None: off
        self.metrics = metrics
        self._http = http
        self._grace_s = grace_s
        self._pipeline: CaptionPipeline | None = None
        self._health: Health | None = None
        # SIGTERM before the drain is over: the job's own stop waits for the drain (see on_signal).
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._input_over = False
        self._pending: tuple[Callable[[int], None], int] | None = None

    @classmethod
    def off(cls) -> BulkApi:
        return cls(HttpSettings(), 0.0, WorkerMetrics())

    @classmethod
    def open(
        cls, settings: WorkerSettings, metrics: WorkerMetrics | None = None, health: Health | None = None
    ) -> BulkApi:
        """Serve the API when WORKER_HTTP__ENABLED (else ``off()``): 503 "starting" until ``run_input``.
        ``metrics``: the worker's, when it serves /metrics (a terminal job counts in its own). ``health``: not
        ready from the drain on. Raises HttpPortError (the port is taken, or uvicorn cannot start), SettingsError
        (beyond loopback without tokens) or ValueError (bad WORKER_FETCH__*)."""
        if not settings.http.enabled:
            return cls.off()
        from captionfleet.worker.fetch import Fetcher
        from captionfleet.worker.http.server import open_api, worker_name

        metrics = metrics or WorkerMetrics()
        fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
        api = cls(settings.http, settings.shutdown.grace_s, metrics)
        api._health = health
        server = open_api(settings, api._offer, api._version, fetcher, metrics, worker_name(settings), starting=True)
        try:
            api.server = server.start()
        except BaseException:
            server.close()
            raise
        return api

    @property
    def port(self) -> int:
        assert self.server is not None, "the API is off"
        return self.server.port

    def _offer(self, item: InteractiveItem) -> None:
        assert self._pipeline is not None, "requests are admitted only once run_input() attached the pipeline"
        self._pipeline.offer(item)

    def _version(self) -> str:
        assert self._pipeline is not None, "requests are admitted only once run_input() attached the pipeline"
        return self._pipeline.captioner.version  # the job's model, fixed for its run

    # -- the job's pipeline ----------------------------------------------------------------------------

    def lane_options(self, then: ItemHook | None = None) -> LaneOptions:
        """The pipeline's latency lane when the API is on (none when off); ``then``: the job's own
        ``on_item_result``, which sees its own items only."""
        if self.server is None:
            return LaneOptions(on_item_result=then, interactive_wait_ms=None, bulk_share=0.0, pause_batches=False)
        return LaneOptions(
            on_item_result=self._route(then),
            interactive_wait_ms=self._http.max_wait_ms,
            bulk_share=self._http.stream_share,
            pause_batches=self._http.pause_batches,
        )

    def _route(self, then: ItemHook | None) -> ItemHook:
        def on_item_result(item: Item, result: Result) -> None:
            if isinstance(item, ApiItem):
                answer_interactive(self.metrics, item, result)
            elif then is not None:
                then(item, result)

        return on_item_result

    def run_input(self, pipeline: CaptionPipeline, items: Iterable[ItemT]) -> Iterable[ItemT]:
        """Admit the API's requests into ``pipeline`` from now on (503 "starting" until then); returns the
        job's input for ``pipeline.run``, which drains the API where it ends (see the module note)."""
        if self.server is None:
            return items
        self._pipeline = pipeline  # before ready(): an admitted request finds it
        self.server.ctx.state.ready()
        log.info("caption API: serving the job's model %s", pipeline.captioner.version)
        return self._then_drain(items)

    def _then_drain(self, items: Iterable[ItemT]) -> Iterator[ItemT]:
        # Runs in the pipeline's source thread: while it drains here, the pipeline's input is still open, so
        # its model thread goes on answering the API's images.
        try:
            for item in items:
                if self._stopping.is_set():
                    break
                yield item
        except GeneratorExit:  # the pipeline stopped pulling (it failed): nobody is left to answer them
            raise
        except BaseException:
            self._end_input()  # a listing or read failed: the requests admitted are still answered
            raise
        self._end_input()

    def _end_input(self) -> None:
        assert self.server is not None
        if self._health is not None:
            self._health.set(stopping=True)
        log.info("the job's input is over: draining the caption API")
        self.server.drain(self._grace_s)  # False: logged there; the job's status stands
        with self._lock:
            self._input_over = True
            pending, self._pending = self._pending, None
        if pending is not None:
            stop, signum = pending
            stop(signum)

    def on_signal(self, stop: Callable[[int], None]) -> Callable[[int], None]:
        """The job's signal handler ``stop``, run once the API has drained: at once new requests get 503 and
        the job takes no more input, but the pipeline runs until the requests admitted are answered."""
        if self.server is None:
            return stop
        server = self.server

        def on_signal(signum: int) -> None:
            # A Python signal handler, on the main thread (the model thread): a second signal (a double Ctrl-C)
            # runs it again from inside this call, on the same thread. So nothing but the state changes is done
            # under the (non-reentrant) lock: logging, or the job's stop, there would block that second call forever.
            server.ctx.state.drain()
            with self._lock:
                deferred = not self._input_over  # _end_input runs the job's stop after the drain
                if deferred:
                    self._pending = (stop, signum)
                    self._stopping.set()
            if deferred:
                log.warning("signal %d: draining the caption API, then stopping the job", signum)
            else:
                stop(signum)

        return on_signal

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def __enter__(self) -> BulkApi:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
