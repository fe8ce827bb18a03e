"""The caption API alone (``captionfleet serve``): the API's images through one pipeline's latency lane on its
own model thread, no Kafka. ``ApiWorker.start()``, then ``run()`` until ``stop()`` or the model thread's death;
run() drains."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import EXIT_FAILED, EXIT_GRACE_EXCEEDED, EXIT_OK
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.accounting import answer_interactive
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.http.items import ApiItem
from captionfleet.worker.http.server import ApiServer, start_api
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import Health, WorkerMetrics
from captionfleet.worker.pipeline import CaptionPipeline, Item
from captionfleet.worker.sinks import NullSink
from captionfleet.worker.stream.metered import MeteredCaptioner

log = logging.getLogger("captionfleet.serve")


class ApiWorker:
    """The API over one pipeline on its own model thread. ``start()``, then ``run()`` until ``stop()`` (signal
    safe: it only flags; new requests get 503 from then on) or the model thread's death; run() drains."""

    def __init__(
        self, settings: WorkerSettings, model: CaptionModel, metrics: WorkerMetrics, health: Health, name: str
    ) -> None:
        self.settings = settings
        self.model = model
        self.metrics = metrics
        self.health = health
        self.name = name
        self.fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)  # ValueError
        self._pipeline = CaptionPipeline(
            MeteredCaptioner(model, metrics),
            NullSink(),
            settings.batch,
            ImageLimits.from_settings(settings.images),
            on_item_result=self._answered,
            interactive_wait_ms=settings.http.max_wait_ms,  # every image is interactive here
        )
        self._ended = threading.Event()
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._model_thread = threading.Thread(target=self._run_model, name="model", daemon=True)
        self.api: ApiServer | None = None

    def _answered(self, item: Item, result: Result) -> None:
        assert isinstance(item, ApiItem)
        answer_interactive(self.metrics, item, result)

    def _no_stream(self) -> Iterator[Item]:
        """The pipeline's stream/bulk input: none here (the API's images come through ``offer``); ends at stop."""
        self._ended.wait()
        yield from ()

    def _run_model(self) -> None:
        try:
            self._pipeline.run(self._no_stream())
        except BaseException as error:  # reported by run(), which stops the server
            log.exception("the model thread failed")
            self._failure = error
            self.health.set(failed=str(error) or type(error).__name__)

    def start(self) -> ApiWorker:
        """Raises HttpPortError or SettingsError (reachable beyond loopback without tokens)."""
        model = self.model
        self.api = start_api(
            self.settings, self._pipeline.offer, lambda: model.version, self.fetcher, self.metrics, self.name
        )
        self.metrics.model.info({"version": model.version, "source": model.source})
        self._model_thread.start()
        self.health.set(model_loaded=True)
        return self

    def stop(self) -> None:
        if self.api is not None:
            self.api.ctx.state.drain()
        self.health.set(stopping=True)
        self._stop.set()

    def run(self) -> int:
        assert self.api is not None, "start() first"
        try:
            while not self._stop.wait(0.2):
                if self._failure is not None or not self._model_thread.is_alive():
                    break
            if self._failure is not None:
                return EXIT_FAILED
            drained = self.api.drain(self.settings.shutdown.grace_s)
            self._ended.set()
            self._model_thread.join(timeout=5)
            log.info("stopped %s", "cleanly" if drained else "with API requests unanswered")
            return EXIT_OK if drained else EXIT_GRACE_EXCEEDED
        finally:
            self.api.close()
