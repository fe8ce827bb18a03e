"""The S3 bulk job: caption every image under an S3 prefix into result parts under another, per shard.

    captionfleet caption s3://bucket/images/ --out s3://bucket/captions/ [--shard i/N]

Layout of the output (one folder per shard; N is in the name because N decides which keys are in it)::

    s3://bucket/captions/shard-00001-of-00004/part-000000-<run>.parquet   whole files, one PUT each
    s3://bucket/captions/shard-00001-of-00004/_COMPLETE.json              counts, once the shard is done

Rows: one per input key and model version (key, uri, etag, size, caption or error kind + message,
model_version, timings). When a key has several rows, the latest part wins; a finished shard is
compacted so that each key has exactly one row per model version (its current ETag's).

Resume: a restarted shard reads its parts and skips every listed key that already has a row with the
same ETag from the same model version (``any_model_version`` accepts rows of any version), so a crash
loses at most the rows of the part being filled. ``retry_failed`` re-runs keys whose row is a failure
(optionally only of some kinds); the new rows supersede the failures.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import FAILURE_KINDS
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BulkS3Settings, WorkerSettings
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.bulk import BulkSummary, finish_on_signal, load_captioner
from captionfleet.worker.connectors.s3 import (
    ObjectStore,
    PartRef,
    PartStore,
    Prefetcher,
    RetryPolicy,
    S3Object,
    S3Reader,
    S3ResultSink,
    access_error,
    as_object_store,
    list_pages,
    make_s3_client,
    new_run_id,
    parse_s3_uri,
)
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline
from captionfleet.worker.sharding import ShardSpec

logger = logging.getLogger(__name__)

# What the listing decides for each object; "own_output" is the job's own results under the source prefix.
Decision = Literal["own_output", "filtered", "other_shard", "skip", "todo", "retry"]


class S3JobError(Exception):
    """The job cannot start or go on (nothing to caption, bad option); the message names the fix."""


@dataclass(frozen=True)
class S3JobOptions:
    shard: ShardSpec = field(default_factory=ShardSpec)
    # None: failure rows count as done. Empty: re-run every failure. Else: only failures of these kinds.
    retry_failed: frozenset[str] | None = None
    # Count rows from any model version as done (default: a new model version is a new run).
    any_model_version: bool = False
    # Delete this shard's parts and marker first.
    overwrite: bool = False


@dataclass
class S3JobSummary(BulkSummary):
    shard: str = "0/1"
    listed: int = 0  # every object under the prefix (all shards)
    filtered_out: int = 0  # left out by suffix / size filters (or the output's own objects)
    retried: int = 0  # failure rows re-run by retry_failed
    superseded: int = 0  # older rows removed when the shard was compacted
    parts_written: int = 0
    output: str = ""  # the shard's folder
    complete: bool = False  # listing and captioning finished and the marker is written

    def lines(self) -> list[str]:
        lines = super().lines()
        lines.insert(
            0,
            f"shard {self.shard}: listed {self.listed} objects under the prefix, {self.filtered_out} filtered out, "
            f"{self.total} in this shard",
        )
        if self.retried:
            lines.append(f"failures retried: {self.retried}")
        lines.append(
            f"output: {self.output} ({self.parts_written} new part{'' if self.parts_written == 1 else 's'}"
            + (f", {self.superseded} superseded rows removed" if self.superseded else "")
            + (", complete)" if self.complete else ")")
        )
        return lines


# -- which keys are done: an index over the shard's parts ---------------------------------------------


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


# -- listing ahead of the pipeline ---------------------------------------------------------------------


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


# -- the job -------------------------------------------------------------------------------------------


def _folder(prefix: str) -> str:
    # "s3://b/photos" means the folder photos/, not also photos2/ (as for model prefixes).
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _retry_policy(bulk: BulkS3Settings) -> RetryPolicy:
    return RetryPolicy(attempts=bulk.retry_attempts, base_s=bulk.retry_base_s, max_s=bulk.retry_max_s)


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


def _other_layouts(client: ObjectStore, bucket: str, prefix: str, shard: ShardSpec, retry: RetryPolicy) -> set[int]:
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


class _Progress:
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


def run_s3_caption_job(
    source: str,
    out: str,
    settings: WorkerSettings,
    *,
    options: S3JobOptions = S3JobOptions(),
    show_progress: bool = True,
    captioner: Captioner | None = None,
    client: ObjectStore | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> S3JobSummary:
    """Caption every object under ``source`` (s3://bucket/prefix/) in ``options.shard`` into result
    parts under ``out`` (s3://bucket/prefix/), resuming from the parts already there.

    Raises S3AccessError / S3JobError (messages name the fix) before writing anything when the source
    cannot be listed, holds nothing, or the output cannot be listed.
    """
    bulk = settings.bulk
    src_bucket, src_prefix = parse_s3_uri(source)
    out_bucket, out_prefix = parse_s3_uri(out)
    src_prefix, out_prefix = _folder(src_prefix), _folder(out_prefix)
    shard = options.shard
    endpoint = settings.s3.endpoint_url
    retry = _retry_policy(bulk)
    if client is None:
        # botocore's own retries are off: RetryPolicy does them, with the same backoff for every call,
        # and also retries a body read that times out half-way (botocore cannot).
        client = as_object_store(
            make_s3_client(
                settings.s3,
                connect_timeout=bulk.connect_timeout_s,
                read_timeout=bulk.read_timeout_s,
                max_attempts=1,
                max_pool_connections=bulk.fetch_concurrency + 8,
            )
        )
    if options.retry_failed:
        unknown = sorted(options.retry_failed - FAILURE_KINDS)
        if unknown:
            raise S3JobError(
                f"--retry-failed: unknown failure kind(s) {', '.join(unknown)}; use some of "
                f"{', '.join(sorted(FAILURE_KINDS))}, or none for every kind"
            )
    src_uri = f"s3://{src_bucket}/{src_prefix}"

    # Preflight, before anything is written: the first page proves the endpoint, the credentials and
    # the source; listing our shard's folder proves the output bucket.
    pages = list_pages(client, src_bucket, src_prefix, page_size=bulk.list_page_size, retry=retry)
    try:
        first_page = next(pages)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list", src_uri, endpoint) from error
    if not first_page:
        raise S3JobError(
            f"no objects under {src_uri}: check the bucket and prefix (keys are case-sensitive, and the prefix is "
            "a folder: s3://bucket/photos lists photos/...); nothing was written"
        )
    if options.overwrite:
        captioner = captioner or load_captioner(settings)  # a bad --model fails before --overwrite deletes
    store = PartStore(client, out_bucket, out_prefix + shard.name + "/", fmt=bulk.format, retry=retry)
    try:
        if options.overwrite:
            removed = store.delete_all()
            logger.warning("--overwrite: removed %d objects under %s", removed, store.uri())
        parts = store.list_parts()
        other_totals = _other_layouts(client, out_bucket, out_prefix, shard, retry)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list the output folder", store.uri(), endpoint) from error
    if other_totals:
        logger.warning(
            "%s already holds results split into %s shards; this run uses %d shards, so it will not see those rows "
            "and redoes their keys: use --shard i/%d to resume them, or another --out",
            f"s3://{out_bucket}/{out_prefix}",
            "/".join(map(str, sorted(other_totals))),
            shard.total,
            min(other_totals),
        )

    captioner = captioner or load_captioner(settings)
    version = captioner.version
    try:
        index = load_index(store, parts, bulk.fetch_concurrency)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "read the existing parts in", store.uri(), endpoint) from error
    if parts:
        logger.info("%s: %d rows in %d existing parts", store.uri(), len(index), len(parts))

    exclude = out_prefix if out_bucket == src_bucket and out_prefix.startswith(src_prefix) else None
    keep = make_filter(bulk)
    in_shard: set[str] = set()

    def decide(obj: S3Object) -> Decision:
        if exclude is not None and obj.key.startswith(exclude):
            return "own_output"
        if not keep(obj):
            return "filtered"
        if not shard.owns(obj.key):
            return "other_shard"
        in_shard.add(obj.key)
        return index.decide(obj, version, options.any_model_version, options.retry_failed)

    def rest_of_listing() -> Iterator[list[S3Object]]:
        yield first_page
        try:
            yield from pages
        except (ClientError, BotoCoreError) as error:  # e.g. credentials revoked half-way
            raise access_error(error, "list", src_uri, endpoint) from error

    feed = ListingFeed(rest_of_listing(), decide, ahead=bulk.list_ahead)
    run_id = new_run_id()
    sink = S3ResultSink(store, run_id=run_id, rows_per_part=bulk.rows_per_part, on_part=index.add)
    summary = S3JobSummary(total=0, skipped=0, done=0, model_version=version, shard=str(shard), output=store.uri())
    progress = _Progress(feed, show_progress)

    def on_each(result: Result) -> None:
        progress.update(result)
        if on_result is not None:
            on_result(result)

    pipeline = CaptionPipeline(
        captioner,
        sink,
        settings.batch,
        ImageLimits.from_settings(settings.images),
        on_result=on_each,
        flush_interval_s=bulk.part_interval_s,
    )
    reader = S3Reader(client, retry=retry, max_bytes=settings.images.max_bytes)
    with stop_on_signals(finish_on_signal(pipeline)):
        feed.start()
        try:
            with Prefetcher(
                reader, concurrency=bulk.fetch_concurrency, ahead_bytes=bulk.fetch_ahead_mb << 20
            ) as fetcher:
                stats = pipeline.run(fetcher.items(feed, on_item=sink.track))
        except (ClientError, BotoCoreError) as error:  # listing errors come as S3AccessError already
            raise access_error(error, "write results to", store.uri(), endpoint) from error
        finally:
            feed.stop()
            progress.close()

    summary.listed = feed.listed
    summary.filtered_out = feed.counts["filtered"]
    summary.total = len(in_shard)
    summary.skipped = feed.counts["skip"]
    summary.retried = feed.counts["retry"]
    summary.done = stats.done
    summary.failed_by_kind = stats.failed_by_kind
    summary.seconds = stats.seconds
    summary.parts_written = len(sink.parts_written)
    summary.interrupted = pipeline.stop_event.is_set()
    if summary.interrupted:
        return summary
    if summary.listed == 0:
        raise S3JobError(f"no objects under {src_uri} apart from this job's own output: check the prefix")
    if summary.listed - summary.filtered_out == 0:
        raise S3JobError(
            f"none of the {summary.listed} objects under {src_uri} pass the filters "
            f"(suffixes={bulk.suffixes or 'any'}, size {bulk.min_size}..{bulk.max_size or 'any'} bytes): "
            "loosen --suffix / --min-size / --max-size; nothing was written"
        )
    try:
        summary.superseded = _compact(store, index, {part.name: part for part in [*parts, *sink.parts_written]})
        store.write_marker(_marker(summary, index, in_shard, version, options, bulk, src_uri, run_id))
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "finish the shard in", store.uri(), endpoint) from error
    summary.complete = True
    return summary


def _compact(store: PartStore, index: ShardIndex, parts: dict[str, PartRef]) -> int:
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


def _marker(
    summary: S3JobSummary,
    index: ShardIndex,
    in_shard: set[str],
    version: str,
    options: S3JobOptions,
    bulk: BulkS3Settings,
    src_uri: str,
    run_id: str,
) -> dict[str, Any]:
    """The completion marker: what the shard's parts now answer for the keys listed in this run."""
    kinds: Counter[str] = Counter()
    answered = 0
    for key in in_shard:
        ref = index.answer(key, version, options.any_model_version)
        if ref is not None:
            answered += 1
            kinds[ref.error_kind or "captioned"] += 1
    captioned = kinds.pop("captioned", 0)
    return {
        "shard": {"index": options.shard.index, "total": options.shard.total},
        "source": src_uri,
        "filters": {"suffixes": bulk.suffixes, "min_size": bulk.min_size, "max_size": bulk.max_size},
        "model_version": version,
        "format": bulk.format,
        "objects": len(in_shard),
        "rows": answered,
        "captioned": captioned,
        "failed": sum(kinds.values()),
        "failed_by_kind": dict(sorted(kinds.items())),
        "last_run": {
            "run_id": run_id,
            "skipped": summary.skipped,
            "captioned": summary.done,
            "failed": summary.failed,
            "retried": summary.retried,
            "parts_written": summary.parts_written,
            "superseded_rows_removed": summary.superseded,
            "seconds": round(summary.seconds, 3),
        },
        "parts": index.part_names(),
        "completed_at": datetime.now(UTC),
    }
