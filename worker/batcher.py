"""Dynamic batching policy, free of threads and I/O so it can be tested with a fake clock.

A batch is flushed when it reaches ``max_items``, when adding an item would exceed a cost
limit, or when ``max_wait`` has passed since its *first* item arrived, so a lone request waits at most
``max_wait`` however quiet the stream is. There may be several cost limits (the pipeline's: the pixels the
vision encoder processes, and the decoder sequences, images x beams, that decoding's work and KV cache
scale with): each item has one cost per limit, and a batch stays within all of them. An item that alone
exceeds a limit still goes, in a batch of its own.

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

# One cost per limit, in the limits' order; a single number is a one-limit batcher's.
Costs = float | tuple[float, ...]


def within(limits: tuple[float, ...], total: tuple[float, ...], extra: tuple[float, ...]) -> bool:
    """Whether ``extra`` added to ``total`` stays within every limit (0: no limit)."""
    return all(not limit or now + more <= limit for limit, now, more in zip(limits, total, extra, strict=True))


def added(total: tuple[float, ...], extra: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(now + more for now, more in zip(total, extra, strict=True))


def _as_costs(costs: Costs) -> tuple[float, ...]:
    return costs if isinstance(costs, tuple) else (costs,)


class Batcher(Generic[T]):
    def __init__(
        self,
        max_items: int,
        max_wait_s: float,
        max_cost: Costs = 0,
        clock: Callable[[], float] = time.monotonic,
        urgent_wait_s: float | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_cost = _as_costs(max_cost)  # each 0 means no limit on that cost
        if any(limit < 0 for limit in self.max_cost):
            raise ValueError(f"max_cost must be >= 0 each (0: no limit), got {max_cost}")
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._costs: list[tuple[float, ...]] = []
        self._urgent: list[bool] = []
        self._cost = self._zero = (0.0,) * len(self.max_cost)
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

    def add(self, item: T, cost: Costs = 0, *, urgent: bool = False) -> list[list[T]]:
        """Add one item, ``cost``: one per limit; return the batches that became ready (zero, one, or two).

        Two batches come back when the item does not fit in the open batch's cost budget and
        alone already fills a batch (max_items == 1, or it reaches a cost limit on its own).
        """
        costs = _as_costs(cost)
        if len(costs) != len(self.max_cost):
            raise ValueError(
                f"cost {cost} does not match the batcher's {len(self.max_cost)} limits {self.max_cost}: "
                "pass one cost per limit, in their order"
            )
        ready: list[list[T]] = []
        if self._items and not within(self.max_cost, self._cost, costs):
            ready.append(self.flush())
        if not self._items:
            self._first_at = self._clock()
        if urgent:
            if self._urgent_at is None:
                self._urgent_at = self._clock()
            self.urgent_rows += 1
        self._items.append(item)
        self._costs.append(costs)
        self._urgent.append(urgent)
        self._cost = added(self._cost, costs)
        full = any(limit and now >= limit for limit, now in zip(self.max_cost, self._cost, strict=True))
        if len(self._items) >= self.max_items or full:
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
        self._cost = tuple(sum(column) for column in zip(*self._costs, strict=True)) if kept else self._zero
        self._urgent_at = None
        self.urgent_rows = 0
        if not self._items:
            self._first_at = None
        return taken

    def flush(self) -> list[T]:
        batch, self._items = self._items, []
        self._costs, self._urgent = [], []
        self._cost = self._zero
        self._first_at = None
        self._urgent_at = None
        self.urgent_rows = 0
        return batch
