"""The stream's fetch threads and model thread: requests in, finished answers out.

Fetch threads read each image (policy first, see ``worker.fetch``) and pass the bytes on to the model
thread, or a failure straight back. A read that fails because the object store is unreachable is retried
through the outage (``worker.stream.outages``) within its budget, and reported to the store's record that the
consumer thread watches. The model thread runs the same ``CaptionPipeline`` as the bulk path
(decode pool, batcher, captioner), so batches span partitions and one bad image fails alone. Both talk
to the consumer thread through queues only: it drains ``done``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import FETCH_FAILURE, FetchError
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.accounting import answer_interactive
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.lanes import InteractiveItem
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.pipeline import CaptionPipeline, Item
from captionfleet.worker.sinks import NullSink
from captionfleet.worker.stream.items import Finished, StreamItem
from captionfleet.worker.stream.outages import STORE, STORE_DOWN_AFTER, Dependency, is_store_outage, outage_wait_s

# The stream's one logger name for all its modules (captionfleet.worker.stream): log queries match on it.
log = logging.getLogger(__package__)

_END = object()  # closes the pipeline's input


class _GaveUp:
    """A read abandoned because the worker is stopping during an outage: neither answered nor committed."""


_GAVE_UP = _GaveUp()


class Stages:
    """``model_version``: the version a fetch failure names (the serving model's, which a hot swap changes)."""

    def __init__(
        self,
        settings: WorkerSettings,
        fetcher: Fetcher,
        captioner: CaptionModel,
        metrics: WorkerMetrics,
        model_version: Callable[[], str],
    ) -> None:
        self.fetcher = fetcher
        self.metrics = metrics
        self.store = Dependency(STORE)
        self._outage_budget_s = settings.fetch.outage_budget_s
        self._outage_retry_max_s = settings.fetch.outage_retry_max_s
        self._giving_up = threading.Event()
        self._model_version = model_version
        self.done: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        # Set by the model thread if it dies; the consumer thread then stops the worker.
        self.failure: BaseException | None = None
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._fetch_pool = ThreadPoolExecutor(settings.fetch.concurrency, thread_name_prefix="fetch")
        self._pipeline = CaptionPipeline(
            captioner,
            NullSink(),  # results leave through the consumer thread instead (see on_item_result)
            settings.batch,
            ImageLimits.from_settings(settings.images),
            on_item_result=self._on_item_result,
            # The caption API's images (worker/http/), when the worker serves it: the latency lane.
            interactive_wait_ms=settings.http.max_wait_ms,
            bulk_share=settings.http.stream_share,
            pause_batches=settings.http.enabled and settings.http.pause_batches,
            on_item_dropped=lambda _item: self._interactive_left(),
        )
        self._model_thread = threading.Thread(target=self._run_model, name="model", daemon=True)
        # API images given to the model thread and not answered or dropped yet (a drain waits for them).
        self._interactive_lock = threading.Lock()
        self.interactive = 0

    def start(self) -> None:
        self._model_thread.start()

    def submit(self, item: StreamItem) -> None:
        self._fetch_pool.submit(self._fetch, item)

    def offer(self, item: InteractiveItem) -> None:
        """An API image (worker/http/), already read: to the front of the model thread's input (the pipeline's
        latency lane), answered through its own ``answer``, never through ``done`` (it has no message, offset
        or commit)."""
        with self._interactive_lock:
            self.interactive += 1
        self._pipeline.offer(item)

    def _interactive_left(self) -> None:
        with self._interactive_lock:
            self.interactive -= 1

    def end_input(self) -> None:
        """No more requests: the model thread finishes what it holds, then ends."""
        self._inbox.put(_END)

    def join(self, timeout_s: float) -> bool:
        """Wait for the model thread to finish its last batch; False if it is still busy."""
        self._model_thread.join(timeout_s)
        return not self._model_thread.is_alive()

    def give_up_outage_retries(self) -> None:
        """Stopping: reads waiting out an outage end now, unanswered and uncommitted (their next owner redoes
        them), instead of holding the shutdown for the rest of their budget."""
        self._giving_up.set()

    def stop_fetching(self) -> None:
        """Drop the fetches not started yet (they were not committed, so they are redone) and do not wait."""
        self.give_up_outage_retries()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, item: StreamItem) -> None:
        start = time.perf_counter()
        failed = self._read_through_outages(item)
        item.fetch_ms = (time.perf_counter() - start) * 1000
        if failed is _GAVE_UP:
            self.done.put(Finished(item, None))
            return
        # Failed reads too: a store that times out after every retry is what this histogram must show.
        self.metrics.fetch.observe(item.fetch_ms / 1000)
        if failed is None:
            self._inbox.put(item)
            return
        assert isinstance(failed, tuple)
        kind, message = failed
        failure = Result(
            id=item.id,
            uri=item.uri,
            model_version=self._model_version(),
            error_kind=kind,
            error_message=message,
            fetch_ms=round(item.fetch_ms, 3),
        )
        self.done.put(Finished(item, failure))

    def _read_through_outages(self, item: StreamItem) -> tuple[str, str] | _GaveUp | None:
        """``_read``, retried while the store is unreachable, for up to the outage budget from the first such
        failure; then that failure (its message says how long the store was tried)."""
        first_failure: float | None = None
        attempt = 0
        while True:
            failed = self._read(item)
            if failed is None or not is_store_outage(item.uri, failed[0]):
                if failed is None and item.uri[:5].lower() == "s3://":
                    self.store.succeeded()
                return failed
            kind, message = failed
            if self._outage_budget_s > 0:  # 0: no outage handling at all, so no pause either
                self.store.failed(message, what=item.uri, down_after=STORE_DOWN_AFTER)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure >= self._outage_budget_s:
                if self._outage_budget_s > 0:
                    message += (
                        f"; still failing after {now - first_failure:.0f}s of retries "
                        "(WORKER_FETCH__OUTAGE_BUDGET_S): the store looks down, replay it once it is back"
                    )
                return kind, message
            attempt += 1
            self.metrics.outage_retries.labels(STORE).inc()
            wait_s = min(outage_wait_s(attempt, self._outage_retry_max_s), first_failure + self._outage_budget_s - now)
            # Stopping, or its partition was revoked (its next owner reads it again): no answer from here.
            if self._giving_up.wait(wait_s) or item.cancelled:
                return _GAVE_UP

    def _read(self, item: StreamItem) -> tuple[str, str] | None:
        """Read the image into item.data; the failure's kind and message if it could not be read."""
        try:
            item.data = self.fetcher.fetch(item.uri)
        except FetchError as error:
            return error.kind, error.message
        except Exception as error:  # a bug or an unexpected library error: one failure, not a dead worker
            log.exception("fetch of %s (%s) failed unexpectedly", item.id, item.uri)
            return FETCH_FAILURE, f"{type(error).__name__}: {error}"
        return None

    def _inputs(self) -> Iterator[Item]:
        while (entry := self._inbox.get()) is not _END:
            assert isinstance(entry, StreamItem)
            yield entry

    def _run_model(self) -> None:
        try:
            self._pipeline.run(self._inputs())
        except BaseException as error:  # reported by the consumer thread, which stops the worker
            log.exception("the model thread failed")
            self.failure = error

    def _on_item_result(self, item: Item, result: Result) -> None:
        if isinstance(item, StreamItem):
            self.done.put(Finished(item, result))
            return
        interactive: InteractiveItem = item  # type: ignore[assignment]
        answer_interactive(self.metrics, interactive, result)
        self._interactive_left()
