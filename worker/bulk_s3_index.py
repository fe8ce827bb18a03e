"""Which keys a shard's result parts already answer: ``ShardIndex`` over the key columns of every part,
read at the start of a run (``load_index``) and kept up to date as parts are written; ``compact``
removes the rows it says are superseded, ``shard_counts`` counts what the shard holds for its marker,
and ``other_layouts`` finds results written with another shard count (whose rows a run cannot see)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

from captionfleet.core.s3 import ObjectStore, RetryPolicy
from captionfleet.worker.connectors.s3_listing import S3Object
from captionfleet.worker.connectors.s3_parts import PartRef, PartStore
from captionfleet.worker.sharding import ShardSpec

logger = logging.getLogger(__name__)


class RowRef(NamedTuple):
    part: str
    position: int
    etag: str
    model_version: str
    error_kind: str | None


class ShardIndex:
    """What the shard's parts hold, per key, oldest row first (parts are added in order)."""

    COLUMNS = ("key", "etag", "model_version", "error_kind")

    def __init__(self) -> None:
        self._rows: dict[str, list[RowRef]] = {}
        self._lock = threading.Lock()  # the listing thread reads while the pipeline adds new parts

    def add(self, part: PartRef, rows: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for position, row in enumerate(rows):
                ref = RowRef(part.name, position, str(row["etag"]), str(row["model_version"]), row["error_kind"])
                self._rows.setdefault(str(row["key"]), []).append(ref)

    def rows(self, key: str) -> list[RowRef]:
        with self._lock:
            return list(self._rows.get(key, ()))

    def __len__(self) -> int:
        return sum(len(refs) for refs in self._rows.values())

    def answer(self, key: str, model_version: str, any_model_version: bool, etag: str | None = None) -> RowRef | None:
        """The row that answers ``key`` for this run: the newest one of an accepted model version
        (and, when ``etag`` is given, for that content)."""
        for ref in reversed(self.rows(key)):
            if (etag is None or ref.etag == etag) and (any_model_version or ref.model_version == model_version):
                return ref
        return None

    def decide(
        self, obj: S3Object, model_version: str, any_model_version: bool, retry: frozenset[str] | None
    ) -> Literal["todo", "retry", "skip"]:
        ref = self.answer(obj.key, model_version, any_model_version, obj.etag)
        if ref is None:
            return "todo"
        if ref.error_kind is not None and retry is not None and (not retry or ref.error_kind in retry):
            return "retry"
        return "skip"

    def superseded(self) -> dict[str, set[int]]:
        """Rows no reader should see, by part: per key, all but the newest row of each model version,
        and every row for content older than the newest row's (a different ETag)."""
        drop: dict[str, set[int]] = {}
        with self._lock:
            for refs in self._rows.values():
                if len(refs) < 2:
                    continue
                current_etag = refs[-1].etag
                versions: set[str] = set()
                for ref in reversed(refs):
                    if ref.etag != current_etag or ref.model_version in versions:
                        drop.setdefault(ref.part, set()).add(ref.position)
                    else:
                        versions.add(ref.model_version)
        return drop

    def remove(self, drop: dict[str, set[int]]) -> None:
        """Forget rows that compaction removed from their parts."""
        with self._lock:
            for key, refs in list(self._rows.items()):
                kept = [ref for ref in refs if ref.position not in drop.get(ref.part, ())]
                if len(kept) != len(refs):
                    self._rows[key] = kept

    def part_names(self) -> list[str]:
        """The parts that hold at least one row."""
        with self._lock:
            return sorted({ref.part for refs in self._rows.values() for ref in refs})


def load_index(store: PartStore, parts: list[PartRef], threads: int) -> ShardIndex:
    """Read the key columns of every part (in parallel: each is a GET), in part order."""
    index = ShardIndex()
    columns = list(ShardIndex.COLUMNS)
    with ThreadPoolExecutor(max(1, min(threads, len(parts)))) as pool:
        for part, rows in zip(parts, pool.map(lambda part: store.read(part, columns), parts), strict=True):
            index.add(part, rows)
    return index


def compact(store: PartStore, index: ShardIndex, parts: dict[str, PartRef]) -> int:
    """Remove superseded rows (retried failures, older content) so each key has one row per version.

    The rows that replace them are already stored, so a crash half-way only leaves duplicates that the
    next run's index resolves (latest part wins) and compacts again.
    """
    drop = index.superseded()
    if not drop:
        return 0
    store.delete_marker()
    for name, positions in sorted(drop.items()):
        left = store.drop_rows(parts[name], positions)
        logger.info("%s: removed %d superseded rows (%d left)", store.uri(name), len(positions), left)
    index.remove(drop)
    return sum(len(positions) for positions in drop.values())


def shard_counts(index: ShardIndex, keys: set[str], version: str, any_model_version: bool) -> dict[str, Any]:
    """What the shard's parts now answer for ``keys`` (the completion marker's counts)."""
    kinds: Counter[str] = Counter()
    for key in keys:
        ref = index.answer(key, version, any_model_version)
        if ref is not None:
            kinds[ref.error_kind or "captioned"] += 1
    answered = sum(kinds.values())
    captioned = kinds.pop("captioned", 0)
    return {
        "objects": len(keys),
        "rows": answered,
        "captioned": captioned,
        "failed": sum(kinds.values()),
        "failed_by_kind": dict(sorted(kinds.items())),
    }


def other_layouts(client: ObjectStore, bucket: str, prefix: str, shard: ShardSpec, retry: RetryPolicy) -> set[int]:
    """Shard counts other than ours already used under the output prefix."""
    page, _ = retry.call(
        lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000), f"list {prefix}"
    )
    totals = set()
    for common in page.get("CommonPrefixes", []):
        name = str(common.get("Prefix", ""))[len(prefix) :].rstrip("/")
        if name.startswith("shard-") and "-of-" in name:
            try:
                totals.add(int(name.rsplit("-of-", 1)[1]))
            except ValueError:
                continue
    totals.discard(shard.total)
    return totals
