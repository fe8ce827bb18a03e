"""Offset bookkeeping for the stream loop: per assigned partition, which messages still have requests in
flight, and so which offset may be committed (everything before it answered: at least once).

Touched by the consumer thread only (rebalance callbacks run while it waits inside poll() or close()),
so nothing here locks.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import TopicPartition


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


class Offsets:
    """The states of every partition assigned now. Each assignment gets a new epoch, so an answer that
    belongs to an earlier assignment of the same partition (revoked, then assigned back) is recognised."""

    def __init__(self) -> None:
        self._states: dict[TopicPartition, PartitionState] = {}
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._states)

    def partitions(self) -> list[TopicPartition]:
        return list(self._states)

    def get(self, tp: TopicPartition) -> PartitionState | None:
        return self._states.get(tp)

    def current(self, tp: TopicPartition, epoch: int) -> PartitionState | None:
        """The partition's state if the assignment of that epoch still holds it; None once revoked."""
        state = self._states.get(tp)
        return state if state is not None and state.epoch == epoch else None

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self._states:
                self._epoch += 1
                self._states[tp] = PartitionState(self._epoch)

    def forget(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        """Drop these partitions' states; the ones that were held."""
        return [tp for tp in partitions if self._states.pop(tp, None) is not None]

    def committable(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The commit points of these partitions that moved since this worker last committed them."""
        offsets = {}
        for tp in partitions:
            state = self._states.get(tp)
            point = state.commit_point() if state is not None else None
            if state is not None and point is not None and point != state.committed:
                offsets[tp] = point
        return offsets

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._states.get(tp)
            if state is not None:
                state.committed = offset

    def pending(self, partitions: Iterable[TopicPartition]) -> int:
        """Requests still in flight for these partitions."""
        return sum(sum(state.pending.values()) for tp in partitions if (state := self._states.get(tp)))

    def done(self) -> list[tuple[TopicPartition, int | None]]:
        """Per partition, how far it is answered: what was committed, else the commit point (for the lag)."""
        return [
            (tp, state.committed if state.committed is not None else state.commit_point())
            for tp, state in list(self._states.items())
        ]
