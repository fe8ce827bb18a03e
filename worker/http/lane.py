"""The API's side of the interactive lane: at most WORKER_HTTP__MAX_QUEUED images given to the model and not
answered yet (a request that would pass it is a 429), each handed to the engine's interactive intake."""

from __future__ import annotations

import threading
from collections.abc import Callable

from captionfleet.worker.http.items import ApiItem, QueueFull
from captionfleet.worker.lanes import InteractiveItem
from captionfleet.worker.metrics import WorkerMetrics


class BoundedLane:
    """A ``Lane`` over ``offer`` (the engine's interactive intake: the stream's stages, ``serve``'s own pipeline
    or a bulk job's); ``version`` reads the serving model's version (a hot swap changes it)."""

    def __init__(
        self,
        offer: Callable[[InteractiveItem], None],
        version: Callable[[], str],
        max_queued: int,
        metrics: WorkerMetrics,
    ) -> None:
        self._offer = offer
        self._version = version
        self.max_queued = max_queued
        self.metrics = metrics
        self._lock = threading.Lock()
        self.queued = 0

    @property
    def version(self) -> str:
        return self._version()

    def submit(self, items: list[ApiItem]) -> None:
        with self._lock:
            if self.queued + len(items) > self.max_queued:
                raise QueueFull(
                    f"{self.queued} images are queued for the model already and this request brings {len(items)} "
                    f"(WORKER_HTTP__MAX_QUEUED={self.max_queued}): retry after the Retry-After seconds"
                )
            self.queued += len(items)
        self.metrics.http_queued.inc(len(items))
        for item in items:
            item.on_drop = self._dropped
            item.future.add_done_callback(lambda _future: self._left())
            self._offer(item)

    def _left(self) -> None:
        """An image was answered or cancelled: its room is free again."""
        with self._lock:
            self.queued -= 1
        self.metrics.http_queued.dec()

    def _dropped(self, item: ApiItem) -> None:
        self.metrics.http_dropped.labels(item.drop_reason or "cancelled").inc()
