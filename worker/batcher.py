"""Dynamic batching policy, free of threads and I/O so it can be tested with a fake clock.

A batch is flushed when it reaches ``max_items``, when adding an item would exceed the cost
limit (e.g. total pixels), or when ``max_wait`` has passed since its *first* item arrived, so
a lone request waits at most ``max_wait`` however quiet the stream is.

Urgent items (the interactive lane, ``add(..., urgent=True)``) have their own, shorter wait: a batch holding
one is due ``urgent_wait`` after the first of them arrived, whatever the other items' wait says; the rows
it leaves free are filled by whatever else is ready when it is due. ``urgent_rows`` and ``rows`` let the
caller (the pipeline's model loop) keep a share of the rows for the stream/bulk lane.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(
        self,
        max_items: int,
        max_wait_s: float,
        max_cost: float = 0,
        clock: Callable[[], float] = time.monotonic,
        urgent_wait_s: float | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self.max_cost = max_cost  # 0 means no cost limit
        self._clock = clock
        self._items: list[T] = []
        self._costs: list[float] = []
        self._urgent: list[bool] = []
        self._cost = 0.0
        self._first_at: float | None = None
        # The interactive lane's own wait (None: urgent items wait like the others).
        self.urgent_wait_s = max_wait_s if urgent_wait_s is None else min(urgent_wait_s, max_wait_s)
        self._urgent_at: float | None = None
        self.urgent_rows = 0

    @property
    def rows(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, cost: float = 0, *, urgent: bool = False) -> list[list[T]]:
        """Add one item; return the batches that became ready (zero, one, or two).

        Two batches come back when the item does not fit in the open batch's cost budget and
        alone already fills a batch (max_items == 1).
        """
        ready: list[list[T]] = []
        if self._items and self.max_cost and self._cost + cost > self.max_cost:
            ready.append(self.flush())
        if not self._items:
            self._first_at = self._clock()
        if urgent:
            if self._urgent_at is None:
                self._urgent_at = self._clock()
            self.urgent_rows += 1
        self._items.append(item)
        self._costs.append(cost)
        self._urgent.append(urgent)
        self._cost += cost
        if len(self._items) >= self.max_items or (self.max_cost and self._cost >= self.max_cost):
            ready.append(self.flush())
        return ready

    def time_left(self) -> float | None:
        """Seconds until the open batch is due, None when there is no open batch."""
        if self._first_at is None:
            return None
        due = self._first_at + self.max_wait_s
        if self._urgent_at is not None:
            due = min(due, self._urgent_at + self.urgent_wait_s)
        return max(0.0, due - self._clock())

    def due(self) -> bool:
        left = self.time_left()
        return left is not None and left <= 0

    def take_urgent(self) -> list[T]:
        """Take the open batch's urgent items out of it (the rest stays open, its wait unchanged): for the
        pipeline to caption them while another batch runs (core/between_steps.py)."""
        taken = [item for item, urgent in zip(self._items, self._urgent, strict=True) if urgent]
        if not taken:
            return []
        kept = [i for i, urgent in enumerate(self._urgent) if not urgent]
        self._items = [self._items[i] for i in kept]
        self._costs = [self._costs[i] for i in kept]
        self._urgent = [False] * len(kept)
        self._cost = sum(self._costs)
        self._urgent_at = None
        self.urgent_rows = 0
        if not self._items:
            self._first_at = None
        return taken

    def flush(self) -> list[T]:
        batch, self._items = self._items, []
        self._costs, self._urgent = [], []
        self._cost = 0.0
        self._first_at = None
        self._urgent_at = None
        self.urgent_rows = 0
        return batch
