"""The streaming worker: request topic -> fetch -> decode -> batch -> caption -> result / dead-letter topics.

Threads and who owns what:

- the **consumer thread** (``StreamWorker.run``) owns the consumer, the offsets and the producer
  sends: it polls, parses each message into requests, hands them to the fetch threads, sends every
  finished request's result or dead letter, and commits;
- **fetch threads** read each image (policy first, see ``worker.fetch``) and pass the bytes on to the
  model thread, or a failure straight back;
- the **model thread** runs the same ``CaptionPipeline`` as the bulk path (decode pool, batcher,
  captioner), so batches span partitions and one bad image fails alone.

Rebalance callbacks run on kafka-python's IO thread while the consumer thread waits inside ``poll()``
or ``close()``, so the partition state is only ever touched by one thread at a time; the fetch and
model threads talk to the consumer thread through queues only.

**At least once.** A message's offset is committed only when every request in it has had its result
or dead letter acknowledged by the broker: the consumer thread takes the commit points (per partition,
the first offset with a request still in flight), flushes the producer (which returns only when
everything sent so far is acknowledged, or raises), and then commits those points, the quix-streams
order. A crash anywhere redoes at most the uncommitted tail; duplicates are possible, loss is not.

**Slow batches.** The consumer thread never waits on the model: when ``max_in_flight`` requests are
in flight it pauses fetching on its partitions and keeps calling ``poll()`` (which returns nothing
for paused partitions), so the group sees a live member however long a batch takes. Sizing
``max_poll_interval_ms`` from a batch budget was the alternative; it needs a budget that holds for
the worst batch on the slowest node, and a wrong guess means leaving the group, a rebalance and the
same slow batch again on the next owner, in a loop. Pausing needs no guess.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from kafka import TopicPartition

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import EXIT_GRACE_EXCEEDED, EXIT_OK, FETCH_FAILURE, MALFORMED, FetchError
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.messages import Result, fit_value
from captionfleet.worker.metrics import Health, WorkerMetrics
from captionfleet.worker.pipeline import CaptionPipeline, Item
from captionfleet.worker.requests import MalformedMessage, Request, parse_message

log = logging.getLogger(__name__)

# How long one poll waits when nothing is in flight (it returns at once when records arrive);
# with requests in flight the loop waits on finished work instead, so results leave promptly.
_IDLE_POLL_S = 0.2
_BUSY_WAIT_S = 0.02
_LAG_EVERY_S = 1.0


# -- what flows through the loop -------------------------------------------------------------------


class Record(Protocol):
    """The parts of a consumed message the loop uses (kafka-python's ConsumerRecord has them)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class Origin:
    """Where a request came from: named in every log line and dead letter about it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def fields(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(eq=False)
class StreamItem:
    """One request on its way through fetch and the pipeline (a ``pipeline.Item``)."""

    request: Request
    origin: Origin
    epoch: int  # the partition assignment it belongs to; a stale one's result is dropped
    data: bytes = b""
    fetch_ms: float | None = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def uri(self) -> str:
        return self.request.uri

    def read(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Finished:
    item: StreamItem
    result: Result


class PartitionState:
    """Offsets of one assigned partition: which messages still have requests in flight."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.pending: dict[int, int] = {}  # offset -> requests not yet answered
        self.next_offset: int | None = None  # one past the last message dispatched
        # What this worker committed for this assignment. Not assumed to be where reading started: a new
        # group with auto_offset_reset=latest has no committed offset at all, and a restart would skip to
        # the end past a first message still in flight. One extra commit per assignment is the price.
        self.committed: int | None = None

    def start(self, offset: int, requests: int) -> None:
        if requests > 0:
            self.pending[offset] = self.pending.get(offset, 0) + requests
        self.next_offset = max(self.next_offset or 0, offset + 1)

    def finish(self, offset: int) -> None:
        left = self.pending[offset] - 1
        if left:
            self.pending[offset] = left
        else:
            del self.pending[offset]

    def commit_point(self) -> int | None:
        """The offset to commit: everything before it is answered. None before the first message."""
        if self.next_offset is None:
            return None
        return min(self.pending) if self.pending else self.next_offset


# -- the seams: real Kafka in worker.connectors.kafka, in memory in the unit tests ----------------


class Rebalance(Protocol):
    """Called by a Source during poll() or close(), while the consumer thread waits there."""

    def assigned(self, partitions: list[TopicPartition]) -> None: ...
    def revoking(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def revoked(self, partitions: list[TopicPartition], committed: dict[TopicPartition, int]) -> None: ...
    def lost(self, partitions: list[TopicPartition]) -> None: ...


class Source(Protocol):
    def subscribe(self, handler: Rebalance) -> None: ...
    def poll(self, timeout_s: float, max_records: int) -> list[Any]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, partitions: Iterable[TopicPartition]) -> None: ...
    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...
    def commit(self, offsets: dict[TopicPartition, int]) -> None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    def close(self) -> None: ...


class Output(Protocol):
    def send(self, topic: str, key: str, value: dict[str, Any]) -> None: ...

    # True once everything sent so far is acknowledged; raises if a send failed. With timeout_s (a caller
    # with its own deadline, a revocation), False when the acknowledgements did not all arrive in time.
    def flush(self, timeout_s: float | None = None) -> bool: ...
    def close(self) -> None: ...


class CommitRejectedError(Exception):
    """Raised by Source.commit when the group has moved on: the partitions' next owners redo the
    uncommitted work (duplicates are possible, loss is not). Connectors map their own errors to it."""


# -- helpers --------------------------------------------------------------------------------------


class MeteredCaptioner(Captioner):
    """The loaded model as it is (no copy), timing each batch for the metrics."""

    def __init__(self, inner: Captioner, metrics: WorkerMetrics) -> None:
        self.__dict__.update(inner.__dict__)  # version, preprocess, ... : what the pipeline reads
        self._inner = inner
        self._metrics = metrics

    def caption_pixels(self, pixel_values: torch.Tensor, decoding: DecodingSettings | None = None) -> list[str]:
        start = time.perf_counter()
        try:
            return self._inner.caption_pixels(pixel_values, decoding)
        finally:
            self._metrics.batch_size.observe(int(pixel_values.shape[0]))
            self._metrics.inference.observe(time.perf_counter() - start)
            if self.version != self._inner.version:  # hot-swapped (worker.models): name the model that ran
                self.__dict__.update({k: v for k, v in vars(self._inner).items() if not k.startswith("_")})


class _NullSink:
    """The pipeline's sink: results leave through the consumer thread instead (see on_item_result)."""

    def done_ids(self) -> set[str]:
        return set()

    def write(self, results: list[Result]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_END = object()  # closes the pipeline's input


@dataclass
class StreamReport:
    exit_code: int
    messages: int
    abandoned: int  # requests still in flight when the grace period ran out


# -- the worker -----------------------------------------------------------------------------------


class StreamWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        captioner: Captioner,
        source: Source,
        output: Output,
        fetcher: Fetcher,
        *,
        metrics: WorkerMetrics | None = None,
        health: Health | None = None,
        name: str = "captionfleet-worker",
    ) -> None:
        self.settings = settings
        self.kafka = settings.kafka
        self.source = source
        self.output = output
        self.fetcher = fetcher
        self.metrics = metrics or WorkerMetrics()
        self.health = health or Health()
        self.name = name
        self.model_version = captioner.version
        self._captioner = MeteredCaptioner(captioner, self.metrics)
        self._partitions: dict[TopicPartition, PartitionState] = {}
        self._epoch = 0
        self._in_flight = 0
        self._paused = False
        self._messages = 0
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self._stopping = False
        self._closing = False
        self._failure: BaseException | None = None
        self._last_commit = time.monotonic()
        self._last_lag = 0.0
        self._done: queue.SimpleQueue[Finished] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._fetch_pool = ThreadPoolExecutor(settings.fetch.concurrency, thread_name_prefix="fetch")
        self._pipeline = CaptionPipeline(
            self._captioner,
            _NullSink(),
            settings.batch,
            ImageLimits.from_settings(settings.images),
            on_item_result=self._on_item_result,
        )
        self._model_thread = threading.Thread(target=self._run_model, name="model", daemon=True)
        # Room for the key (ids are at most 1024 characters, 4 bytes each in UTF-8) and the record's framing.
        self._max_value_bytes = self.kafka.max_message_bytes - 8 * 1024
        # A revocation waits this long for in-flight work and the flush of its answers, then gives what is
        # not done up to the next owner. It runs on kafka-python's IO thread, so it holds up this member's
        # heartbeats: stay well inside the session.
        self._revoke_drain_s = min(self.kafka.session_timeout_ms / 3, self.kafka.max_poll_interval_ms / 2) / 1000
        self.metrics.model.info({"version": captioner.version, "source": str(getattr(captioner, "source", ""))})

    def model_swapped(self, old: Captioner, new: Captioner) -> None:
        """A hot swap (worker.models, in the model thread between batches): failures and the info metric
        name the new version from now on."""
        self.model_version = new.version
        self.metrics.model.info({"version": new.version, "source": str(getattr(new, "source", ""))})
        self.metrics.model_swaps.inc()

    # -- control -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (signal-handler safe): stop fetching, drain, flush, commit, leave."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def join(self, timeout_s: float) -> bool:
        """After run() returned: wait for the model thread to finish its last batch; False if it is still busy."""
        self._model_thread.join(timeout_s)
        return not self._model_thread.is_alive()

    def run(self) -> StreamReport:
        self._model_thread.start()
        self.source.subscribe(self)
        log.info(
            "worker %s consuming %s as group %s (model %s)",
            self.name,
            self.kafka.request_topic,
            self.kafka.group_id,
            self.model_version,
        )
        try:
            while not self._stop.is_set():
                self._turn()
            return self._shutdown()
        except BaseException as error:
            self._abort(error)
            raise

    # -- the loop ------------------------------------------------------------------------------------

    def _turn(self) -> None:
        self.health.beat()
        self._raise_if_failed()
        self._backpressure()
        room = max(1, min(self.kafka.max_in_flight - self._in_flight, self.kafka.max_poll_records))
        if self._in_flight:
            records = self.source.poll(0, room)
            self._dispatch_all(records)
            self._drain(0 if records else _BUSY_WAIT_S)
        else:
            self._dispatch_all(self.source.poll(_IDLE_POLL_S, room))
            self._drain(0)
        if time.monotonic() - self._last_commit >= self.kafka.commit_interval_ms / 1000:
            self._commit(list(self._partitions))
        if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
            self._update_lag()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the model thread failed: {self._failure}") from self._failure

    def _backpressure(self) -> None:
        if not self._paused and self._in_flight >= self.kafka.max_in_flight:
            self._set_paused(True)
        # Resume at half, not at one below the limit, so a busy worker does not flap every message.
        elif self._paused and not self._stopping and self._in_flight <= self.kafka.max_in_flight // 2:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        partitions = self.source.assignment()
        if paused:
            self.source.pause(partitions)
        else:
            self.source.resume(partitions)
        self._paused = paused
        self.metrics.fetch_paused.set(1 if paused else 0)
        log.debug("fetching %s (%d requests in flight)", "paused" if paused else "resumed", self._in_flight)

    def _dispatch_all(self, records: list[Record]) -> None:
        for record in records:
            self._dispatch(record)

    def _dispatch(self, record: Record) -> None:
        tp = TopicPartition(record.topic, record.partition)
        state = self._partitions.get(tp)
        if state is None or self._stopping:
            # Not ours any more, or we are stopping: left uncommitted, so it is read again by its owner.
            return
        self._messages += 1
        self.metrics.messages.labels(record.topic).inc()
        timestamp = record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None
        origin = Origin(record.topic, record.partition, record.offset, timestamp)
        try:
            parsed = parse_message(record.value, record.key)
        except MalformedMessage as bad:
            state.start(record.offset, 1)
            latency_ms = self._latency_ms(origin)
            if latency_ms is not None:
                self.metrics.end_to_end.observe(latency_ms / 1000)
            self._send_dead_letter(
                origin, bad.id, None, MALFORMED, bad.message, original=bad.original, metadata={}, result=None
            )
            state.finish(record.offset)
            return
        for what in parsed.ignored:
            self.metrics.ignored.inc()
            log.info("nothing to caption in %s (%s)", what, _where(origin), extra=origin.fields())
        state.start(record.offset, len(parsed.requests))
        for request in parsed.requests:
            source = "s3_event" if request.metadata.get("source") == "s3-event" else "request"
            self.metrics.requests.labels(source).inc()
            self._in_flight += 1
            self._fetch_pool.submit(self._fetch, StreamItem(request, origin, state.epoch))
        self.metrics.in_flight.set(self._in_flight)

    # -- fetch and model threads ---------------------------------------------------------------------

    def _fetch(self, item: StreamItem) -> None:
        start = time.perf_counter()
        failed = self._read(item)
        item.fetch_ms = (time.perf_counter() - start) * 1000
        # Failed reads too: a store that times out after every retry is what this histogram must show.
        self.metrics.fetch.observe(item.fetch_ms / 1000)
        if failed is None:
            self._inbox.put(item)
            return
        kind, message = failed
        failure = Result(
            id=item.id,
            uri=item.uri,
            model_version=self.model_version,
            error_kind=kind,
            error_message=message,
            fetch_ms=round(item.fetch_ms, 3),
        )
        self._done.put(Finished(item, failure))

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
            self._failure = error

    def _on_item_result(self, item: Item, result: Result) -> None:
        assert isinstance(item, StreamItem)
        self._done.put(Finished(item, result))

    # -- finished requests ---------------------------------------------------------------------------

    def _drain(self, timeout_s: float) -> None:
        """Send the results of everything finished; wait up to timeout_s for the first one."""
        try:
            finished = self._done.get(timeout=timeout_s) if timeout_s > 0 else self._done.get_nowait()
        except queue.Empty:
            return
        while True:
            self._finish(finished)
            try:
                finished = self._done.get_nowait()
            except queue.Empty:
                return

    def _finish(self, finished: Finished) -> None:
        item, result = finished.item, finished.result
        self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)
        origin = item.origin
        state = self._partitions.get(origin.tp)
        if state is None or state.epoch != item.epoch:
            # Revoked before it finished and not committed: the partition's owner now redoes it.
            log.info("dropping the answer for %s: %s was reassigned", item.id, _where(origin), extra=origin.fields())
            return
        if item.fetch_ms is not None:
            result.fetch_ms = round(item.fetch_ms, 3)
        latency_ms = self._latency_ms(origin)
        if result.ok:
            row = result.to_row()
            for absent in ("error_kind", "error_message"):
                row.pop(absent)
            row.update(metadata=item.request.metadata, end_to_end_ms=latency_ms, worker=self.name)
            self.output.send(self.kafka.result_topic, item.id, fit_value(row, self._max_value_bytes))
            self.metrics.images.labels("captioned").inc()
            if result.queue_ms is not None:
                self.metrics.queue_wait.observe(result.queue_ms / 1000)
        else:
            self.metrics.images.labels("failed").inc()
            self._send_dead_letter(
                origin,
                item.id,
                item.uri,
                result.error_kind or FETCH_FAILURE,
                result.error_message or "",
                original=item.request.original,
                metadata=item.request.metadata,
                result=result,
            )
        if latency_ms is not None:
            self.metrics.end_to_end.observe(latency_ms / 1000)
        state.finish(origin.offset)

    @staticmethod
    def _latency_ms(origin: Origin) -> float | None:
        if origin.timestamp_ms is None:
            return None
        return round(max(0.0, time.time() * 1000 - origin.timestamp_ms), 3)

    def _send_dead_letter(
        self,
        origin: Origin,
        request_id: str | None,
        uri: str | None,
        kind: str,
        message: str,
        *,
        original: Any,
        metadata: dict[str, Any],
        result: Result | None,
    ) -> None:
        value: dict[str, Any] = {
            "id": request_id,
            "uri": uri,
            "kind": kind,
            "message": message,
            "request": original,
            "metadata": metadata,
            "source": {**origin.fields(), "timestamp_ms": origin.timestamp_ms},
            "model_version": self.model_version,
            "worker": self.name,
        }
        if result is not None:
            value["timings"] = {
                name: getattr(result, name) for name in ("fetch_ms", "decode_ms", "queue_ms", "inference_ms")
            }
            value["bytes"] = result.bytes
        # Without an id (a message we could not read), its coordinates are the key: unique and findable.
        key = request_id if request_id is not None else f"{origin.topic}/{origin.partition}/{origin.offset}"
        self.output.send(self.kafka.dead_letter_topic, key, fit_value(value, self._max_value_bytes))
        self.metrics.failures.labels(kind).inc()
        log.warning(
            "failed id=%s uri=%s kind=%s at %s: %s",
            request_id,
            uri,
            kind,
            _where(origin),
            message,
            extra={"id": request_id, "uri": uri, "kind": kind, **origin.fields()},
        )

    # -- commits -------------------------------------------------------------------------------------

    def _committable(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        offsets = {}
        for tp in partitions:
            state = self._partitions.get(tp)
            point = state.commit_point() if state is not None else None
            if state is not None and point is not None and point != state.committed:
                offsets[tp] = point
        return offsets

    def _commit(self, partitions: list[TopicPartition]) -> None:
        self._last_commit = time.monotonic()
        offsets = self._committable(partitions)
        if not offsets:
            return
        # The order that makes this at-least-once: the commit points were taken before the flush, so
        # every answer they cover was sent before it, and flush() returns only once all are acknowledged.
        self.output.flush()
        try:
            self.source.commit(offsets)
        except CommitRejectedError as error:
            log.warning("commit refused, the group is rebalancing (%s): the next owner may redo some work", error)
            return
        self._committed(offsets)

    def _committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset
        self.metrics.commits.inc()
        log.debug("committed %s", {f"{tp.topic}[{tp.partition}]": offset for tp, offset in offsets.items()})

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        for tp, state in list(self._partitions.items()):
            highwater = self.source.highwater(tp)
            done = state.committed if state.committed is not None else state.commit_point()
            if highwater is not None and done is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - done))

    # -- rebalances (called from inside poll() / close(), see the module note) -----------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self._partitions:
                self._epoch += 1
                self._partitions[tp] = PartitionState(self._epoch)
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self._partitions))
        self.health.set(joined=True, partitions=len(self._partitions))
        if self._paused or self._stopping:
            self.source.pause(partitions)
        log.info("assigned %s", _names(partitions))

    def revoking(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Finish what is in flight for these partitions, flush, and say what to commit: all of it within
        the revocation's bound, since this holds up the member's heartbeats (see __init__)."""
        if self._closing:  # shutdown committed already; after a failure nothing more may be committed
            return {}
        deadline = time.monotonic() + self._revoke_drain_s
        self._finish_pending(partitions, deadline)
        if self._failure is not None:
            # The consumer thread raises on its next turn and commits nothing more (_abort): nor do we.
            log.warning("the model thread failed: committing nothing for %s", _names(partitions))
            return {}
        offsets = self._committable(partitions)
        # A broker slow to acknowledge must not stall the heartbeats past the session timeout (a flush may
        # take up to produce_timeout_s): give up the commit instead, and the next owner redoes the work.
        if offsets and not self.output.flush(max(0.0, deadline - time.monotonic())):
            log.warning(
                "results for %s not acknowledged within %.1fs of the revocation: committing nothing, "
                "their new owner redoes them",
                _names(partitions),
                self._revoke_drain_s,
            )
            return {}
        return offsets

    def _finish_pending(self, partitions: list[TopicPartition], deadline: float) -> None:
        """Send the answers of these partitions' work until none is left, the deadline, or a dead model."""
        while self._pending(partitions) and self._failure is None and time.monotonic() < deadline:
            self.health.beat()
            self._drain(0.05)
        left = self._pending(partitions)
        if left and self._failure is None:
            log.warning(
                "%d requests of %s still in flight after %.1fs: their new owner redoes them",
                left,
                _names(partitions),
                self._revoke_drain_s,
            )

    def revoked(self, partitions: list[TopicPartition], committed: dict[TopicPartition, int]) -> None:
        if committed:
            self._committed(committed)
        self._forget(partitions)
        if partitions:
            log.info("revoked %s", _names(partitions))

    def lost(self, partitions: list[TopicPartition]) -> None:
        # Evicted (session expired): the group has given these away, and any commit would be refused.
        log.warning("lost %s (session expired?): in-flight work there is dropped", _names(partitions))
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if self._partitions.pop(tp, None) is not None:
                with contextlib.suppress(KeyError):  # never set: no fetch answered before the revocation
                    self.metrics.lag.remove(tp.topic, str(tp.partition))
        self.metrics.assigned.set(len(self._partitions))
        self.health.set(partitions=len(self._partitions))

    def _pending(self, partitions: Iterable[TopicPartition]) -> int:
        return sum(sum(state.pending.values()) for tp in partitions if (state := self._partitions.get(tp)))

    # -- shutdown ------------------------------------------------------------------------------------

    def _shutdown(self) -> StreamReport:
        self._stopping = True
        self.health.set(stopping=True)
        grace = self.settings.shutdown.grace_s
        started = self._stop_at or time.monotonic()
        # Leave time for the flush, the commit and leaving the group.
        deadline = started + grace - min(5.0, grace * 0.2)
        left_s = deadline - time.monotonic()
        log.info("stopping: finishing %d requests in flight (up to %.1fs)", self._in_flight, left_s)
        if not self._paused:
            self._set_paused(True)
        # A dead model thread finishes nothing more: stop waiting, and fail (run() aborts) rather than
        # wait out the grace period and report it as one.
        while self._in_flight and self._failure is None and time.monotonic() < deadline:
            self.health.beat()
            self._drain(0.05)
            # Keep the membership alive while draining; partitions are paused, so nothing new arrives
            # (records that still do are not dispatched, so not committed: their next owner reads them).
            self.source.poll(0, 1)
        self._raise_if_failed()
        abandoned = self._in_flight
        self._commit(list(self._partitions))
        self._update_lag()
        self._closing = True
        self._inbox.put(_END)
        self._model_thread.join(timeout=max(0.1, started + grace - time.monotonic() - 1))
        self.source.close()  # leaves the group (a static member keeps its place until its session ends)
        self.output.close()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        if abandoned:
            log.warning(
                "grace period (%.1fs) over with %d requests unfinished: not committed, so they are redone",
                grace,
                abandoned,
            )
            return StreamReport(EXIT_GRACE_EXCEEDED, self._messages, abandoned)
        log.info("stopped cleanly after %d messages", self._messages)
        return StreamReport(EXIT_OK, self._messages, 0)

    def _abort(self, error: BaseException) -> None:
        """A fatal error: close without committing anything more; the uncommitted work is redone."""
        log.error("stopping after a fatal error: %s", error)
        self.health.set(failed=str(error) or type(error).__name__)
        self._stopping = self._closing = True
        self._inbox.put(_END)
        for close in (self.source.close, self.output.close):
            try:
                close()
            except Exception as close_error:
                log.warning("while closing after the error: %s", close_error)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)


def _where(origin: Origin) -> str:
    return f"{origin.topic}[{origin.partition}]@{origin.offset}"


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
