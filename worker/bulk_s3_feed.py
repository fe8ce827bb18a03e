"""Listing ahead of the S3 bulk job's pipeline: ``ListingFeed`` lists in a background thread and queues
the objects to caption, deciding for each what it needs (``make_decide``: the job's own output, filtered
out, another shard's, already answered, to do, to retry); ``Progress`` is the bar whose total grows as
the listing runs."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from tqdm import tqdm

from captionfleet.core.settings import BulkS3Settings
from captionfleet.worker.bulk_s3_index import ShardIndex
from captionfleet.worker.connectors.s3_listing import S3Object
from captionfleet.worker.messages import Result
from captionfleet.worker.sharding import ShardSpec

# What the listing decides for each object; "own_output" is the job's own results under the source prefix.
Decision = Literal["own_output", "filtered", "other_shard", "skip", "todo", "retry"]


class ListingFeed:
    """Lists in a background thread, decides what each object needs, and queues the ones to caption.

    Listing ahead (up to ``ahead`` keys) means page latency never stalls the pipeline and the progress
    bar knows how much work is coming while the listing is still running.
    """

    _END = object()

    def __init__(self, pages: Iterable[list[S3Object]], decide: Callable[[S3Object], Decision], *, ahead: int) -> None:
        self._pages = pages
        self._decide = decide
        self._queue: queue.Queue[object] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="s3-list", daemon=True)

    def start(self) -> ListingFeed:
        self._thread.start()
        return self

    @property
    def listed(self) -> int:
        """Objects listed so far, the job's own output excluded."""
        return sum(self.counts.values()) - self.counts["own_output"]

    @property
    def queued(self) -> int:
        return self.counts["todo"] + self.counts["retry"]

    def _put(self, entry: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for page in self._pages:
                for obj in page:
                    decision = self._decide(obj)
                    self.counts[decision] += 1
                    if decision in ("todo", "retry") and not self._put(obj):
                        return
        except BaseException as error:  # handed to the consumer, which raises it
            self.error = error
        finally:
            self.finished.set()
            self._put(self._END)

    def __iter__(self) -> Iterator[S3Object]:
        while True:
            entry = self._queue.get()
            if entry is self._END:
                if self.error is not None:
                    raise self.error
                return
            assert isinstance(entry, S3Object)
            yield entry

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def make_filter(bulk: BulkS3Settings) -> Callable[[S3Object], bool]:
    """True for objects the job takes: not a folder marker, and matching the suffix and size filters."""
    suffixes = tuple(s.lower() if s.startswith(".") else "." + s.lower() for s in bulk.suffixes)

    def keep(obj: S3Object) -> bool:
        if obj.key.endswith("/"):
            return False
        if suffixes and not obj.key.lower().endswith(suffixes):
            return False
        return obj.size >= bulk.min_size and (not bulk.max_size or obj.size <= bulk.max_size)

    return keep


def make_decide(
    *,
    exclude: str | None,
    keep: Callable[[S3Object], bool],
    shard: ShardSpec,
    index: ShardIndex,
    version: str,
    any_model_version: bool,
    retry_failed: frozenset[str] | None,
    in_shard: set[str],
) -> Callable[[S3Object], Decision]:
    """What each listed object needs; the keys of this shard are collected into ``in_shard``.
    ``exclude``: the output prefix when it lies under the source prefix (the job's own results)."""

    def decide(obj: S3Object) -> Decision:
        if exclude is not None and obj.key.startswith(exclude):
            return "own_output"
        if not keep(obj):
            return "filtered"
        if not shard.owns(obj.key):
            return "other_shard"
        in_shard.add(obj.key)
        return index.decide(obj, version, any_model_version, retry_failed)

    return decide


class Progress:
    """tqdm bar whose total grows while the listing runs; images/s and ETA come from tqdm."""

    def __init__(self, feed: ListingFeed, enabled: bool) -> None:
        self.feed = feed
        self.bar = tqdm(total=0, unit="img", disable=not enabled, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        if enabled:
            self._ticker.start()

    def _refresh_total(self) -> None:
        self.bar.total = self.feed.queued
        listing = "done" if self.feed.finished.is_set() else "running"
        self.bar.set_postfix(listed=self.feed.listed, skipped=self.feed.counts["skip"], listing=listing, refresh=False)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._refresh_total()
                self.bar.refresh()

    def update(self, result: Result) -> None:
        with self._lock:
            if self.bar.total != self.feed.queued:
                self._refresh_total()
            self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=2)
        with self._lock:
            self._refresh_total()
            self.bar.close()
