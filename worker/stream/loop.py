"""The stream loop: ``StreamWorker`` polls requests, hands them to the fetch threads and the model thread,
sends each answer, and commits what is answered (the threads and the commit order: see the package note).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import TopicPartition

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import EXIT_GRACE_EXCEEDED, EXIT_OK, FETCH_FAILURE, MALFORMED
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.accounting import count_image
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.lanes import InteractiveItem
from captionfleet.worker.metrics import Health, WorkerMetrics
from captionfleet.worker.requests import MalformedMessage, parse_message
from captionfleet.worker.stream.answers import Answers
from captionfleet.worker.stream.commits import Commits
from captionfleet.worker.stream.items import Finished, Origin, StreamItem, names, where
from captionfleet.worker.stream.metered import MeteredCaptioner
from captionfleet.worker.stream.offsets import Offsets
from captionfleet.worker.stream.outages import BROKER, Dependency
from captionfleet.worker.stream.ports import Output, Record, Source
from captionfleet.worker.stream.stages import Stages

# The stream's one logger name for all its modules (captionfleet.worker.stream): log queries match on it.
log = logging.getLogger(__package__)


# How long one poll waits when nothing is in flight (it returns at once when records arrive);
# with requests in flight the loop waits on finished work instead, so results leave promptly.
_IDLE_POLL_S = 0.2
_BUSY_WAIT_S = 0.02


@dataclass
class StreamReport:
    exit_code: int
    messages: int
    abandoned: int  # requests unfinished at the end: grace period over, or given up during an outage


class StreamWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        captioner: CaptionModel,
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
        self.metrics = metrics or WorkerMetrics()
        self.health = health or Health()
        self.name = name
        self.model_version = captioner.version
        self._answers = Answers(output, self.kafka, self.metrics, name, lambda: self.model_version)
        self._offsets = Offsets()
        self._commits = Commits(source, output, self._offsets, self.metrics, self.kafka.commit_interval_ms / 1000)
        self._stages = Stages(
            settings, fetcher, MeteredCaptioner(captioner, self.metrics), self.metrics, lambda: self.model_version
        )
        self._in_flight = 0
        self._flying: set[StreamItem] = set()  # handed to the fetch threads, not finished yet
        # Requests parsed but not yet handed to the fetch threads. One message may hold thousands (an S3
        # event notification with many records): all in flight at once would break max_in_flight's bound on
        # memory. They wait here in order, pending for their partition's commit point like the rest.
        self._waiting: deque[StreamItem] = deque()
        self._paused = False
        # Outages (worker.stream.outages): the store's record is kept by the fetch threads, the broker's here.
        self._broker = Dependency(BROKER)
        # The whole session timeout (the broker evicts a member it has not heard from for that long, so a
        # member that has not heard from the broker for that long has lost it too), and never less than two
        # heartbeat intervals. Shorter limits mistook a starved client (a busy CPU delaying the heartbeat
        # thread) for a broker outage; an outage worth pausing for lasts minutes, not seconds.
        self._broker_silence_limit_s = max(self.kafka.session_timeout_ms, 2 * self.kafka.heartbeat_interval_ms) / 1000
        self._outage: str | None = None
        self._given_up = 0  # requests left unanswered by a stop during an outage (redone by the next owner)
        self._messages = 0
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self._stopping = False
        self._closing = False
        # A revocation waits this long for in-flight work and the flush of its answers, then gives what is
        # not done up to the next owner. It runs on kafka-python's IO thread, so it holds up this member's
        # heartbeats: stay well inside the session.
        self._revoke_drain_s = min(self.kafka.session_timeout_ms / 3, self.kafka.max_poll_interval_ms / 2) / 1000
        self.metrics.model.info({"version": captioner.version, "source": captioner.source})
        for dependency in (self._stages.store, self._broker):
            self.metrics.dependency_up.labels(dependency.name).set(1)

    def model_swapped(self, old: CaptionModel, new: CaptionModel) -> None:
        """A hot swap (worker.hotswap, in the model thread between batches): failures and the info metric
        name the new version from now on."""
        self.model_version = new.version
        self.metrics.model.info({"version": new.version, "source": new.source})
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

    def offer(self, item: InteractiveItem) -> None:
        """An API image for the same model thread as the stream's (thread-safe; answered through its own
        ``answer``). A stop waits for the offered images too."""
        self._stages.offer(item)

    def join(self, timeout_s: float) -> bool:
        """After run() returned: wait for the model thread to finish its last batch; False if it is still busy."""
        return self._stages.join(timeout_s)

    def run(self) -> StreamReport:
        self._stages.start()
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
        self._watch_outages()
        self._backpressure()
        room = max(1, min(self.kafka.max_in_flight - self._busy, self.kafka.max_poll_records))
        if self._in_flight:
            records = self.source.poll(0, room)
            self._dispatch_all(records)
            self._drain(0 if records else _BUSY_WAIT_S)
        else:
            self._dispatch_all(self.source.poll(_IDLE_POLL_S, room))
            self._drain(0)
        # No commit while the broker is down: its flush would wait out produce_timeout_s and fail the worker.
        self._commits.when_due(commit=self._broker.down() is None)

    def _raise_if_failed(self) -> None:
        if (failure := self._stages.failure) is not None:
            raise RuntimeError(f"the model thread failed: {failure}") from failure

    @property
    def _busy(self) -> int:
        """Requests in flight or waiting for room."""
        return self._in_flight + len(self._waiting)

    def _watch_outages(self) -> None:
        """Update the broker's and the store's state, /readyz and the metrics; log when an outage starts or ends."""
        silent = self.source.silent_for_s() if self.health.joined else None
        if silent is not None and silent > self._broker_silence_limit_s:
            self._broker.failed(f"no answer to the group's heartbeats for {silent:.0f}s", what="heartbeat")
        else:
            self._broker.succeeded()
        store = self._stages.store
        if self._busy == 0:
            # No read in flight can tell that the store is still down: the next requests find out (a store
            # still down pauses the worker again after a few reads).
            store.succeeded()
        outages = []
        for dependency in (store, self._broker):
            why = dependency.down()
            self.health.outage(dependency.name, why)
            self.metrics.dependency_up.labels(dependency.name).set(0 if why else 1)
            if why is not None:
                outages.append(why)
        outage = "; ".join(outages) or None
        if outage is not None and self._outage is None:
            log.warning("outage: %s; fetching paused, reads retried, no commits until it answers", outage)
        elif outage is None and self._outage is not None:
            log.info("outage over (%s): resuming", self._outage)
        self._outage = outage

    def _backpressure(self) -> None:
        if not self._paused and (self._outage is not None or self._busy >= self.kafka.max_in_flight):
            self._set_paused(True)
        # Resume at half, not at one below the limit, so a busy worker does not flap every message.
        elif (
            self._paused and not self._stopping and self._outage is None and self._busy <= self.kafka.max_in_flight // 2
        ):
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
        state = self._offsets.get(TopicPartition(record.topic, record.partition))
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
            self._answers.dead_letter(
                origin, bad.id, None, MALFORMED, bad.message, original=bad.original, metadata={}, result=None
            )
            state.finish(record.offset)
            return
        for what in parsed.ignored:
            self.metrics.ignored.inc()
            log.info("nothing to caption in %s (%s)", what, where(origin), extra=origin.fields())
        state.start(record.offset, len(parsed.requests))
        for request in parsed.requests:
            source = "s3_event" if request.metadata.get("source") == "s3-event" else "request"
            self.metrics.requests.labels(source).inc()
            self._waiting.append(StreamItem(request, origin, state.epoch))
        self._submit_waiting()

    def _submit_waiting(self) -> None:
        """Hand waiting requests to the fetch threads while fewer than max_in_flight are in flight."""
        while self._waiting and self._in_flight < self.kafka.max_in_flight and not self._closing:
            item = self._waiting.popleft()
            if self._offsets.current(item.origin.tp, item.epoch) is None:
                continue  # its partition was revoked meanwhile: the new owner redoes the whole message
            self._in_flight += 1
            self._flying.add(item)
            self._stages.submit(item)
        self.metrics.in_flight.set(self._in_flight)

    # -- finished requests ---------------------------------------------------------------------------

    def _drain(self, timeout_s: float) -> None:
        """Send the results of everything finished, waiting up to timeout_s for the first one; then fill
        the room they left with waiting requests."""
        try:
            finished = self._stages.done.get(timeout=timeout_s) if timeout_s > 0 else self._stages.done.get_nowait()
        except queue.Empty:
            return
        while True:
            self._finish(finished)
            try:
                finished = self._stages.done.get_nowait()
            except queue.Empty:
                break
        self._submit_waiting()

    def _finish(self, finished: Finished) -> None:
        item, result = finished.item, finished.result
        self._in_flight -= 1
        self._flying.discard(item)
        self.metrics.in_flight.set(self._in_flight)
        origin = item.origin
        state = self._offsets.current(origin.tp, item.epoch)
        if result is None:  # given up during an outage: left uncommitted, so it is redone
            if state is not None:  # not revoked meanwhile: a stop gave it up
                self._given_up += 1
                log.info("leaving %s unanswered: stopping during an outage", item.id, extra=origin.fields())
            return
        if state is None:
            # Revoked before it finished and not committed: the partition's owner now redoes it.
            log.info("dropping the answer for %s: %s was reassigned", item.id, where(origin), extra=origin.fields())
            return
        if item.fetch_ms is not None:
            result.fetch_ms = round(item.fetch_ms, 3)
        latency_ms = self._latency_ms(origin)
        if result.ok:
            unanswerable = self._answers.result(item, result, latency_ms)
            if unanswerable is not None:  # its dead letter below says why
                result.caption, result.error_kind, result.error_message = None, MALFORMED, unanswerable
        count_image(self.metrics, result)
        if not result.ok:
            self._answers.dead_letter(
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

    # -- rebalances (called from inside poll() / close(), see the package note) ----------------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        self._offsets.assign(partitions)
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self._offsets))
        self.health.set(joined=True, partitions=len(self._offsets))
        if self._paused or self._stopping:
            self.source.pause(partitions)
        log.info("assigned %s", names(partitions))

    def revoking(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Finish what is in flight for these partitions, flush, and say what to commit: all of it within
        the revocation's bound, since this holds up the member's heartbeats (see __init__)."""
        if self._closing:  # shutdown committed already; after a failure nothing more may be committed
            return {}
        deadline = time.monotonic() + self._revoke_drain_s
        self._finish_pending(partitions, deadline)
        if self._stages.failure is not None:
            # The consumer thread raises on its next turn and commits nothing more (_abort): nor do we.
            log.warning("the model thread failed: committing nothing for %s", names(partitions))
            return {}
        offsets = self._offsets.committable(partitions)
        # A broker slow to acknowledge must not stall the heartbeats past the session timeout (a flush may
        # take up to produce_timeout_s): give up the commit instead, and the next owner redoes the work.
        if offsets and not self.output.flush(max(0.0, deadline - time.monotonic())):
            log.warning(
                "results for %s not acknowledged within %.1fs of the revocation: committing nothing, "
                "their new owner redoes them",
                names(partitions),
                self._revoke_drain_s,
            )
            return {}
        return offsets

    def _finish_pending(self, partitions: list[TopicPartition], deadline: float) -> None:
        """Send the answers of these partitions' work until none is left, the deadline, or a dead model."""
        while self._offsets.pending(partitions) and self._stages.failure is None and time.monotonic() < deadline:
            self.health.beat()
            self._drain(0.05)
        left = self._offsets.pending(partitions)
        if left and self._stages.failure is None:
            log.warning(
                "%d requests of %s still in flight after %.1fs: their new owner redoes them",
                left,
                names(partitions),
                self._revoke_drain_s,
            )

    def revoked(self, partitions: list[TopicPartition], committed: dict[TopicPartition, int]) -> None:
        if committed:
            self._commits.committed(committed)
        self._forget(partitions)
        if partitions:
            log.info("revoked %s", names(partitions))

    def lost(self, partitions: list[TopicPartition]) -> None:
        # Evicted (session expired): the group has given these away, and any commit would be refused.
        log.warning("lost %s (session expired?): in-flight work there is dropped", names(partitions))
        self._forget(partitions)

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        gone = set(partitions)
        self._waiting = deque(item for item in self._waiting if item.origin.tp not in gone)
        for item in self._flying:
            if item.origin.tp in gone:
                item.cancelled = True
        for tp in self._offsets.forget(gone):
            with contextlib.suppress(KeyError):  # never set: no fetch answered before the revocation
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        self.metrics.assigned.set(len(self._offsets))
        self.health.set(partitions=len(self._offsets))

    # -- shutdown ------------------------------------------------------------------------------------

    def _shutdown(self) -> StreamReport:
        self._stopping = True
        self.health.set(stopping=True)
        grace = self.settings.shutdown.grace_s
        started = self._stop_at or time.monotonic()
        # Leave time for the flush, the commit and leaving the group.
        deadline = started + grace - min(5.0, grace * 0.2)
        left_s = deadline - time.monotonic()
        log.info("stopping: finishing %d requests in flight (up to %.1fs)", self._busy, left_s)
        self._stages.give_up_outage_retries()
        if not self._paused:
            self._set_paused(True)
        # A dead model thread finishes nothing more: stop waiting, and fail (run() aborts) rather than
        # wait out the grace period and report it as one.
        # API images (worker/http/) are waited for too: their requests were admitted before the drain began.
        while (self._busy or self._stages.interactive) and self._stages.failure is None and time.monotonic() < deadline:
            self.health.beat()
            self._drain(0.05)
            # Keep the membership alive while draining; partitions are paused, so nothing new arrives
            # (records that still do are not dispatched, so not committed: their next owner reads them).
            self.source.poll(0, 1)
        self._raise_if_failed()
        abandoned = self._busy + self._given_up
        broker_down = self._broker.down()
        if broker_down is None:
            self._commits.commit(self._offsets.partitions())
        else:
            # Its flush would wait out produce_timeout_s and fail: leave it all uncommitted (redone).
            log.warning("stopping during an outage (%s): nothing more is committed, it is redone", broker_down)
        self._commits.update_lag()
        self._closing = True
        self._stages.end_input()
        self._stages.join(max(0.1, started + grace - time.monotonic() - 1))
        self.source.close()  # leaves the group (a static member keeps its place until its session ends)
        self.output.close()
        self._stages.stop_fetching()
        if abandoned or broker_down is not None:
            log.warning(
                "stopped with %d requests unfinished (%d given up during an outage, the rest at the end of the "
                "%.1fs grace period)%s: not committed, so they are redone",
                abandoned,
                self._given_up,
                grace,
                ", the answered ones uncommitted (the broker was down)" if broker_down is not None else "",
            )
            return StreamReport(EXIT_GRACE_EXCEEDED, self._messages, abandoned)
        log.info("stopped cleanly after %d messages", self._messages)
        return StreamReport(EXIT_OK, self._messages, 0)

    def _abort(self, error: BaseException) -> None:
        """A fatal error: close without committing anything more; the uncommitted work is redone."""
        log.error("stopping after a fatal error: %s", error)
        self.health.set(failed=str(error) or type(error).__name__)
        self._stopping = self._closing = True
        self._stages.end_input()
        for close in (self.source.close, self.output.close):
            try:
                close()
            except Exception as close_error:
                log.warning("while closing after the error: %s", close_error)
        self._stages.stop_fetching()
