"""In-memory Source and Output for the stream loop (the httpx MockTransport idea): same protocols as
the Kafka connector, with the checks that make at-least-once testable without a broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from captionfleet.core.captioner import Captioner, CaptionModel, ModelInput, ModelWrapper
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.messages import encode_json, encode_key
from captionfleet.worker.stream.ports import Rebalance


@dataclass(frozen=True)
class MemoryRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


class OutputFailedError(Exception):
    pass


@dataclass
class MemoryOutput:
    """Sent messages become 'acknowledged' only at flush(), like a producer's buffer."""

    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    acked: int = 0
    flushes: int = 0
    fail_flush: bool = False
    closed: bool = False
    # Like the producer's max_request_size: a larger message fails at send().
    max_bytes: int | None = None
    # A slow broker: flush() takes this long to see everything acknowledged.
    ack_delay_s: float = 0.0

    def send(self, topic: str, key: str, value: dict[str, Any]) -> None:
        size = len(encode_key(key)) + len(encode_json(value))
        if self.max_bytes is not None and size > self.max_bytes:
            raise OutputFailedError(f"message of {size} bytes is larger than max_request_size {self.max_bytes}")
        self.sent.append((topic, key, value))

    def flush(self, timeout_s: float | None = None) -> bool:
        self.flushes += 1
        if self.fail_flush:
            raise OutputFailedError("broker unreachable")
        if timeout_s is not None and timeout_s < self.ack_delay_s:
            time.sleep(timeout_s)
            return False
        time.sleep(self.ack_delay_s)
        self.acked = len(self.sent)
        return True

    def close(self) -> None:
        self.closed = True

    def acked_keys(self) -> list[str]:
        return [key for _, key, _ in self.sent[: self.acked]]

    def keys(self, topic: str | None = None) -> list[str]:
        return [key for t, key, _ in self.sent if topic is None or t == topic]

    def values(self, topic: str) -> list[dict[str, Any]]:
        return [value for t, _, value in self.sent if t == topic]


class MemorySource:
    """One topic's partitions as lists; a single member that owns them all unless told otherwise.

    Rebalances are queued with ``rebalance()`` and run inside the next poll(), as with kafka-python.
    A partition with no committed offset is read from its start, or from its end with ``reset="latest"``
    (auto_offset_reset). ``revoking_started`` is set and ``revoking_s`` records each ``revoking()``'s duration.
    Every commit is checked: each message below a committed offset must have all of its expected
    answers (``expect[(partition, offset)]`` = keys) acknowledged by the output at that moment.
    """

    def __init__(self, topic: str, partitions: int, output: MemoryOutput, reset: str = "earliest") -> None:
        self.topic = topic
        self.output = output
        self.reset = reset
        self.logs: dict[int, list[MemoryRecord]] = {p: [] for p in range(partitions)}
        self.expect: dict[tuple[int, int], list[str]] = {}
        self.positions: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.owned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self.handler: Rebalance | None = None
        self.polls = 0
        self.polls_while_paused = 0
        self.pause_calls = 0
        self.closed = False
        self.violations: list[str] = []
        self.revoking_started = threading.Event()
        self.revoking_s: list[float] = []
        # What silent_for_s() answers: set it to make the broker look down (seconds without an answer).
        self.silence_s: float | None = 0.0
        self._queued: list[str] = []
        self._lock = threading.Lock()

    def append(self, partition: int, value: bytes | None, key: bytes | None = None, answers: Iterable[str] = ()) -> int:
        with self._lock:
            log = self.logs[partition]
            offset = len(log)
            log.append(MemoryRecord(self.topic, partition, offset, int(time.time() * 1000), key, value))
            self.expect[(partition, offset)] = list(answers)
            return offset

    def rebalance(self) -> None:
        """Revoke everything and assign it again (an eager rebalance), at the next poll."""
        with self._lock:
            self._queued += ["revoke", "assign"]

    # -- the Source protocol ---------------------------------------------------------------------

    def subscribe(self, handler: Rebalance) -> None:
        self.handler = handler
        self._queued.append("assign")

    def poll(self, timeout_s: float, max_records: int) -> list[MemoryRecord]:
        self.polls += 1
        if self.owned and self.paused >= self.owned:
            self.polls_while_paused += 1
        with self._lock:
            queued, self._queued = self._queued, []
        for action in queued:
            self._revoke() if action == "revoke" else self._assign()
        records: list[MemoryRecord] = []
        with self._lock:
            for tp in sorted(self.owned - self.paused):
                log = self.logs[tp.partition]
                while self.positions[tp] < len(log) and len(records) < max_records:
                    records.append(log[self.positions[tp]])
                    self.positions[tp] += 1
        if not records and timeout_s:
            time.sleep(min(timeout_s, 0.005))
        return records

    def _assign(self) -> None:
        assert self.handler is not None
        self.owned = {TopicPartition(self.topic, p) for p in self.logs}
        self.paused = set()
        self.positions = {tp: self.committed.get(tp, self._reset_offset(tp)) for tp in self.owned}
        self.handler.assigned(sorted(self.owned))

    def _reset_offset(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition]) if self.reset == "latest" else 0

    def _revoke(self) -> None:
        assert self.handler is not None
        partitions = sorted(self.owned)
        self.revoking_started.set()
        start = time.monotonic()
        offsets = self.handler.revoking(partitions)
        self.revoking_s.append(time.monotonic() - start)
        self.commit(offsets)
        self.handler.revoked(partitions, offsets)
        self.owned, self.paused = set(), set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.pause_calls += 1
        self.paused |= set(partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.paused -= set(partitions)

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        acked = set(self.output.acked_keys())
        for tp, offset in offsets.items():
            for below in range(offset):
                missing = [k for k in self.expect.get((tp.partition, below), []) if k not in acked]
                if missing:
                    self.violations.append(f"commit {tp.partition}@{offset} before {missing} were acknowledged")
        self.committed.update(offsets)

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.logs[partition.partition])

    def silent_for_s(self) -> float | None:
        return self.silence_s

    def close(self) -> None:
        if self.owned:
            self._revoke()
        self.closed = True


class GatedCaptioner(ModelWrapper):
    """The real (tiny) model behind a gate: batches wait until the test opens it. A ``CaptionModel`` by
    delegation to the model it wraps, like the stream's own wrapper."""

    def __init__(self, inner: Captioner) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    @property
    def wrapped(self) -> CaptionModel:
        return self._inner

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        self.entered.set()
        self.gate.wait(timeout=60)
        self.batches.append(len(inputs))
        return self._inner.caption_inputs(inputs, decoding)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
