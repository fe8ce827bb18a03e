"""The interactive lane's items, as the shared engine sees them: images a client waits for (the caption
API), answered one by one through their own ``answer`` instead of the stream's or the bulk job's output,
and cancelled when their request times out or its client goes away.

The engine (pipeline, stream stages) takes them through this protocol only, so it never imports the API.
``LaneQueue`` is the model thread's input with the two lanes side by side.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.messages import Result

E = TypeVar("E")


class InteractiveItem(Protocol):
    """A ``pipeline.Item`` that someone waits for."""

    @property
    def id(self) -> str: ...
    @property
    def uri(self) -> str: ...
    def read(self) -> bytes: ...

    # Per-request decoding (None: the worker's own).
    @property
    def decoding(self) -> DecodingSettings | None: ...

    @property
    def cancelled(self) -> bool:
        """Nobody waits for it any more: drop it if its batch has not started."""
        ...

    def answer(self, result: Result) -> None: ...

    def dropped(self) -> None:
        """Called once when the engine drops it unanswered (it was cancelled before its batch)."""
        ...


class LaneQueue(Generic[E]):
    """The model thread's input, two FIFO lanes: stream/bulk entries (a put waits while ``bulk_max`` of them
    wait, as the prefetch queue always bounded decoded images) and interactive ones (never waits: the API
    bounds them). ``get`` takes the interactive lane first unless asked to prefer the other."""

    def __init__(self, bulk_max: int) -> None:
        self.bulk_max = bulk_max
        self._cond = threading.Condition()
        self._bulk: deque[E] = deque()
        self._urgent: deque[E] = deque()
        self._closed = False

    def put_bulk(self, entry: E) -> bool:
        """Waits for room; False (the entry is not queued) once the queue is closed."""
        with self._cond:
            while len(self._bulk) >= self.bulk_max and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._bulk.append(entry)
            self._cond.notify_all()
            return True

    def put_urgent(self, entry: E) -> None:
        with self._cond:
            self._urgent.append(entry)
            self._cond.notify_all()

    def get(self, timeout_s: float | None, *, prefer_bulk: bool = False) -> tuple[E, bool]:
        """The next entry and whether it is urgent; raises queue.Empty after ``timeout_s`` (None: no limit)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._bulk or self._urgent, timeout=timeout_s):
                raise queue.Empty
            if self._urgent and not (prefer_bulk and self._bulk):
                return self._urgent.popleft(), True
            entry = self._bulk.popleft()
            self._cond.notify_all()  # room for a waiting put_bulk
            return entry, False

    def take_urgent(self, ready: Callable[[E], bool]) -> E | None:
        """The first interactive entry if ``ready(entry)`` says it can go now, else None (it stays first)."""
        with self._cond:
            if self._urgent and ready(self._urgent[0]):
                return self._urgent.popleft()
            return None

    def close(self) -> None:
        """The model loop is gone: puts waiting for room give up instead of waiting forever."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
