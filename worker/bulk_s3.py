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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import FAILURE_KINDS
from captionfleet.core.images import ImageLimits
from captionfleet.core.s3 import ObjectStore, RetryPolicy, access_error, as_object_store, make_s3_client, parse_s3_uri
from captionfleet.core.settings import BulkS3Settings, WorkerSettings
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.bulk import BulkSummary, finish_on_signal, load_captioner
from captionfleet.worker.bulk_api import BulkApi
from captionfleet.worker.bulk_s3_feed import ListingFeed, Progress, make_decide, make_filter
from captionfleet.worker.bulk_s3_index import ShardIndex, compact, load_index, other_layouts, shard_counts
from captionfleet.worker.connectors.s3_listing import S3Object, list_pages
from captionfleet.worker.connectors.s3_parts import PartRef, PartStore, S3ResultSink, new_run_id
from captionfleet.worker.connectors.s3_reader import Prefetcher, S3Reader
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, RunStats
from captionfleet.worker.sharding import ShardSpec

logger = logging.getLogger(__name__)


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


# -- the job -------------------------------------------------------------------------------------------


def _folder(prefix: str) -> str:
    # "s3://b/photos" means the folder photos/, not also photos2/ (as for model prefixes).
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _retry_policy(bulk: BulkS3Settings) -> RetryPolicy:
    return RetryPolicy(attempts=bulk.retry_attempts, base_s=bulk.retry_base_s, max_s=bulk.retry_max_s)


@dataclass(frozen=True)
class _Plan:
    """What one run works on, resolved from its arguments before any I/O."""

    settings: WorkerSettings
    options: S3JobOptions
    client: ObjectStore
    retry: RetryPolicy
    src_bucket: str
    src_prefix: str
    out_bucket: str
    out_prefix: str

    @property
    def bulk(self) -> BulkS3Settings:
        return self.settings.bulk

    @property
    def endpoint(self) -> str | None:
        return self.settings.s3.endpoint_url

    @property
    def src_uri(self) -> str:
        return f"s3://{self.src_bucket}/{self.src_prefix}"

    @property
    def own_output(self) -> str | None:
        """The output prefix when it lies under the source prefix: the job's own results, not input."""
        same_folder = self.out_bucket == self.src_bucket and self.out_prefix.startswith(self.src_prefix)
        return self.out_prefix if same_folder else None


def _plan(source: str, out: str, settings: WorkerSettings, options: S3JobOptions, client: ObjectStore | None) -> _Plan:
    bulk = settings.bulk
    src_bucket, src_prefix = parse_s3_uri(source)
    out_bucket, out_prefix = parse_s3_uri(out)
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
    return _Plan(
        settings, options, client, _retry_policy(bulk), src_bucket, _folder(src_prefix), out_bucket, _folder(out_prefix)
    )


@dataclass
class _Run:
    """This run's own state: its id, the sink writing its parts, and the keys of the shard it listed."""

    version: str  # the model's
    run_id: str
    sink: S3ResultSink
    in_shard: set[str] = field(default_factory=set)


def run_s3_caption_job(
    source: str,
    out: str,
    settings: WorkerSettings,
    *,
    options: S3JobOptions = S3JobOptions(),
    show_progress: bool = True,
    captioner: CaptionModel | None = None,
    client: ObjectStore | None = None,
    on_result: Callable[[Result], None] | None = None,
    api: BulkApi | None = None,
) -> S3JobSummary:
    """Caption every object under ``source`` (s3://bucket/prefix/) in ``options.shard`` into result
    parts under ``out`` (s3://bucket/prefix/), resuming from the parts already there. ``api``: the caption
    API served while it captions.

    Raises S3AccessError / S3JobError (messages name the fix) before writing anything when the source
    cannot be listed, holds nothing, or the output cannot be listed.
    """
    plan = _plan(source, out, settings, options, client)
    # Preflight, before anything is written: the first page proves the endpoint, the credentials and
    # the source; listing our shard's folder proves the output bucket.
    pages = _list_source(plan)
    if options.overwrite:
        captioner = captioner or load_captioner(settings)  # a bad --model fails before --overwrite deletes
    store, parts = _open_output(plan)
    captioner = captioner or load_captioner(settings)
    index = _read_index(plan, store, parts)
    run_id = new_run_id()
    sink = S3ResultSink(store, run_id=run_id, rows_per_part=plan.bulk.rows_per_part, on_part=index.add)
    run = _Run(captioner.version, run_id, sink)
    summary = _caption(
        plan, store, index, pages, captioner, run, show_progress=show_progress, on_result=on_result, api=api
    )
    if summary.interrupted:
        return summary
    _check_anything_listed(plan, summary)
    _finish_shard(plan, store, index, {part.name: part for part in [*parts, *run.sink.parts_written]}, summary, run)
    summary.complete = True
    return summary


def _list_source(plan: _Plan) -> Iterator[list[S3Object]]:
    """The source's pages, the first one listed now (so a bad endpoint, credentials or source fail
    here, before anything is written), the rest as they are iterated; listing errors are S3AccessErrors."""
    pages = list_pages(
        plan.client, plan.src_bucket, plan.src_prefix, page_size=plan.bulk.list_page_size, retry=plan.retry
    )
    try:
        first_page = next(pages)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list", plan.src_uri, plan.endpoint) from error
    if not first_page:
        raise S3JobError(
            f"no objects under {plan.src_uri}: check the bucket and prefix (keys are case-sensitive, and the prefix "
            "is a folder: s3://bucket/photos lists photos/...); nothing was written"
        )
    return _rest_of_listing(plan, first_page, pages)


def _rest_of_listing(
    plan: _Plan, first_page: list[S3Object], pages: Iterator[list[S3Object]]
) -> Iterator[list[S3Object]]:
    yield first_page
    try:
        yield from pages
    except (ClientError, BotoCoreError) as error:  # e.g. credentials revoked half-way
        raise access_error(error, "list", plan.src_uri, plan.endpoint) from error


def _open_output(plan: _Plan) -> tuple[PartStore, list[PartRef]]:
    """The shard's output folder and the parts already in it (none after --overwrite deletes them)."""
    shard = plan.options.shard
    store = PartStore(
        plan.client, plan.out_bucket, plan.out_prefix + shard.name + "/", fmt=plan.bulk.format, retry=plan.retry
    )
    try:
        if plan.options.overwrite:
            removed = store.delete_all()
            logger.warning("--overwrite: removed %d objects under %s", removed, store.uri())
        parts = store.list_parts()
        other_totals = other_layouts(plan.client, plan.out_bucket, plan.out_prefix, shard, plan.retry)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "list the output folder", store.uri(), plan.endpoint) from error
    if other_totals:
        logger.warning(
            "%s already holds results split into %s shards; this run uses %d shards, so it will not see those rows "
            "and redoes their keys: use --shard i/%d to resume them, or another --out",
            f"s3://{plan.out_bucket}/{plan.out_prefix}",
            "/".join(map(str, sorted(other_totals))),
            shard.total,
            min(other_totals),
        )
    return store, parts


def _read_index(plan: _Plan, store: PartStore, parts: list[PartRef]) -> ShardIndex:
    try:
        index = load_index(store, parts, plan.bulk.fetch_concurrency)
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "read the existing parts in", store.uri(), plan.endpoint) from error
    if parts:
        logger.info("%s: %d rows in %d existing parts", store.uri(), len(index), len(parts))
    return index


def _caption(
    plan: _Plan,
    store: PartStore,
    index: ShardIndex,
    pages: Iterator[list[S3Object]],
    captioner: CaptionModel,
    run: _Run,
    *,
    show_progress: bool,
    on_result: Callable[[Result], None] | None,
    api: BulkApi | None,
) -> S3JobSummary:
    """List and caption: every object of the shard that the index does not answer yet goes through
    the pipeline, fetched ahead, into new parts."""
    api = api or BulkApi.off()
    options, bulk = plan.options, plan.bulk
    decide = make_decide(
        exclude=plan.own_output,
        keep=make_filter(bulk),
        shard=options.shard,
        index=index,
        version=run.version,
        any_model_version=options.any_model_version,
        retry_failed=options.retry_failed,
        in_shard=run.in_shard,
    )
    feed = ListingFeed(pages, decide, ahead=bulk.list_ahead)
    progress = Progress(feed, show_progress)

    def on_each(result: Result) -> None:
        progress.update(result)
        if on_result is not None:
            on_result(result)

    pipeline = CaptionPipeline(
        captioner,
        run.sink,
        plan.settings.batch,
        ImageLimits.from_settings(plan.settings.images),
        on_result=on_each,
        flush_interval_s=bulk.part_interval_s,
        prompt=bulk.prompt,
        **api.lane_options(),
    )
    reader = S3Reader(plan.client, retry=plan.retry, max_bytes=plan.settings.images.max_bytes)
    with stop_on_signals(api.on_signal(finish_on_signal(pipeline))):
        feed.start()
        try:
            with Prefetcher(
                reader, concurrency=bulk.fetch_concurrency, ahead_bytes=bulk.fetch_ahead_mb << 20
            ) as fetcher:
                stats = pipeline.run(api.run_input(pipeline, fetcher.items(feed, on_item=run.sink.track)))
        except (ClientError, BotoCoreError) as error:  # listing errors come as S3AccessError already
            raise access_error(error, "write results to", store.uri(), plan.endpoint) from error
        finally:
            feed.stop()
            progress.close()
    return _summary(plan, store, run, feed, stats, interrupted=pipeline.stop_event.is_set())


def _summary(
    plan: _Plan, store: PartStore, run: _Run, feed: ListingFeed, stats: RunStats, *, interrupted: bool
) -> S3JobSummary:
    return S3JobSummary(
        total=len(run.in_shard),
        skipped=feed.counts["skip"],
        done=stats.done,
        model_version=run.version,
        failed_by_kind=stats.failed_by_kind,
        seconds=stats.seconds,
        interrupted=interrupted,
        shard=str(plan.options.shard),
        listed=feed.listed,
        filtered_out=feed.counts["filtered"],
        retried=feed.counts["retry"],
        parts_written=len(run.sink.parts_written),
        output=store.uri(),
    )


def _check_anything_listed(plan: _Plan, summary: S3JobSummary) -> None:
    """A finished listing that gave the job nothing at all is a mistake in the source or the filters."""
    bulk = plan.bulk
    if summary.listed == 0:
        raise S3JobError(f"no objects under {plan.src_uri} apart from this job's own output: check the prefix")
    if summary.listed - summary.filtered_out == 0:
        raise S3JobError(
            f"none of the {summary.listed} objects under {plan.src_uri} pass the filters "
            f"(suffixes={bulk.suffixes or 'any'}, size {bulk.min_size}..{bulk.max_size or 'any'} bytes): "
            "loosen --suffix / --min-size / --max-size; nothing was written"
        )


def _finish_shard(
    plan: _Plan, store: PartStore, index: ShardIndex, parts: dict[str, PartRef], summary: S3JobSummary, run: _Run
) -> None:
    """Compact the shard's parts, then write its completion marker."""
    try:
        summary.superseded = compact(store, index, parts)
        store.write_marker(_marker(plan, summary, index, run))
    except (ClientError, BotoCoreError) as error:
        raise access_error(error, "finish the shard in", store.uri(), plan.endpoint) from error


def _marker(plan: _Plan, summary: S3JobSummary, index: ShardIndex, run: _Run) -> dict[str, Any]:
    """The completion marker: what the shard's parts now answer for the keys listed in this run."""
    options, bulk = plan.options, plan.bulk
    return {
        "shard": {"index": options.shard.index, "total": options.shard.total},
        "source": plan.src_uri,
        "filters": {"suffixes": bulk.suffixes, "min_size": bulk.min_size, "max_size": bulk.max_size},
        "model_version": run.version,
        "format": bulk.format,
        **shard_counts(index, run.in_shard, run.version, options.any_model_version),
        "last_run": {
            "run_id": run.run_id,
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
