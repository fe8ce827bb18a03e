"""The stream's commits, in the order that makes it at least once, and the consumer lag they leave.

The commit points are taken first (per partition, the first offset with a request still in flight), then
the output is flushed (it returns only once every answer sent so far is acknowledged, or raises), and
only then are those points committed: every answer they cover was sent before the flush. A crash
anywhere redoes at most the uncommitted tail; duplicates are possible, loss is not.
"""

from __future__ import annotations

import logging
import time

from kafka import TopicPartition

from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.offsets import Offsets
from captionfleet.worker.stream.ports import CommitRejectedError, Output, Source

# The stream's one logger name for all its modules (captionfleet.worker.stream): log queries match on it.
log = logging.getLogger(__package__)

_LAG_EVERY_S = 1.0
# A periodic commit waits this long for the broker's acknowledgements, then tries again at the next interval.
_FLUSH_WAIT_S = 5.0


class Commits:
    def __init__(
        self, source: Source, output: Output, offsets: Offsets, metrics: WorkerMetrics, interval_s: float
    ) -> None:
        self.source = source
        self.output = output
        self.offsets = offsets
        self.metrics = metrics
        self._interval_s = interval_s
        self._last_commit = time.monotonic()
        self._last_lag = 0.0

    def when_due(self, *, commit: bool = True) -> None:
        """Commit every commit interval (unless ``commit`` is False: the broker is down), and update the lag
        every second (the consumer thread's turns)."""
        if commit and time.monotonic() - self._last_commit >= self._interval_s:
            self.commit(self.offsets.partitions(), wait_s=_FLUSH_WAIT_S)
        if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
            self.update_lag()

    def commit(self, partitions: list[TopicPartition], *, wait_s: float | None = None) -> None:
        """Commit what is answered and acknowledged. ``wait_s``: how long to wait for the acknowledgements
        before putting the commit off to the next interval (the periodic commits: a broker that stops
        answering must not hold the consumer thread, which notices the outage); None waits the producer's
        full timeout and raises if they do not come (shutdown)."""
        self._last_commit = time.monotonic()
        offsets = self.offsets.committable(partitions)
        if not offsets:
            return
        # The order that makes this at-least-once: the commit points were taken before the flush, so
        # every answer they cover was sent before it, and flush() returns only once all are acknowledged.
        if not self.output.flush(wait_s):
            log.info("results not acknowledged within %.1fs: commit put off to the next interval", wait_s)
            return
        try:
            self.source.commit(offsets)
        except CommitRejectedError as error:
            log.warning("commit not done (%s): tried again at the next interval, or the next owner redoes it", error)
            return
        self.committed(offsets)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record offsets committed, here or by the Source on a revocation."""
        self.offsets.committed(offsets)
        self.metrics.commits.inc()
        log.debug("committed %s", {f"{tp.topic}[{tp.partition}]": offset for tp, offset in offsets.items()})

    def update_lag(self) -> None:
        self._last_lag = time.monotonic()
        for tp, done in self.offsets.done():
            highwater = self.source.highwater(tp)
            if highwater is not None and done is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - done))
