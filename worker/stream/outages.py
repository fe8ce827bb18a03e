"""Outages of what the stream depends on: the object store its images come from and the broker it answers on.

A store or a broker that stops answering for a minute is an outage, not a verdict on the requests in flight:
failing them would dead-letter work that succeeds seconds later. So while one is down the loop stops taking
new work (its partitions paused), ``/readyz`` says why, the store's reads are retried with a budget in
minutes (``WORKER_FETCH__OUTAGE_BUDGET_S``) and only what stays failed past it is dead-lettered, and no
commit is attempted until the broker answers again (the producer keeps the answers for
``WORKER_KAFKA__OUTAGE_BUDGET_S``).

``Dependency`` is the one record of each: fetch threads report to the store's, the consumer thread to the
broker's; the consumer thread reads both.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from captionfleet.core.failures import TIMEOUT, UNAVAILABLE

STORE = "object_store"
BROKER = "broker"

# What an S3 read fails with when the store itself, not the object, is the problem (after the fetcher's own
# few quick attempts): refused connections, timeouts, throttling and 5xx on every attempt.
OUTAGE_KINDS = frozenset({UNAVAILABLE, TIMEOUT})

# Objects whose reads failed as unreachable, with no read succeeding in between, before the store counts as
# down: one slow or throttled object is that object's problem (its retries do not count again), several
# different ones across the fetch threads are the store's.
STORE_DOWN_AFTER = 3


def is_store_outage(uri: str, kind: str) -> bool:
    """A failed read that says the object store is unreachable, not that the object is bad. Only s3:// uris:
    an http host is someone else's server, and one of them being down must not pause the worker."""
    return kind in OUTAGE_KINDS and uri[:5].lower() == "s3://"


class Dependency:
    """Whether one dependency is down now, and since when. Thread-safe."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._failing: set[str] = set()  # what failed since the last success (up to down_after of them)
        self._down_since: float | None = None
        self._why = ""

    def failed(self, why: str, *, what: str = "", down_after: int = 1) -> None:
        """An attempt at ``what`` (an object, a heartbeat) failed; down once ``down_after`` different ones
        have failed with no success in between."""
        with self._lock:
            if len(self._failing) < down_after:
                self._failing.add(what)
            self._why = why
            if self._down_since is None and len(self._failing) >= down_after:
                self._down_since = self._clock()

    def succeeded(self) -> None:
        with self._lock:
            self._failing.clear()
            self._down_since = None

    def down(self) -> str | None:
        """Why it is down (for /readyz and the logs), or None when it is up."""
        with self._lock:
            if self._down_since is None:
                return None
            return f"{self.name} unreachable for {self._clock() - self._down_since:.0f}s ({self._why})"


def outage_wait_s(attempt: int, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """The wait before the ``attempt``-th retry (from 1) of a read during an outage: 1 s doubling up to
    ``max_s``, each wait between half and all of that (so the fetch threads' retries spread out)."""
    ceiling = min(max_s, 2.0 ** (attempt - 1))
    return ceiling * (0.5 + rand() / 2)
