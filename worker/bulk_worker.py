"""`captionfleet worker --source s3://… --out s3://…`: the S3 bulk job run as a fleet worker.

The same job as `captionfleet caption s3://…` (worker/bulk_s3.py: sharded, resumable, parts written
whole), but shaped for a Kubernetes Indexed Job pod rather than a terminal: no progress bar, the
shard from the pod's environment, and Prometheus metrics with /healthz and /readyz on the worker's
metrics port while it runs (and with WORKER_HTTP__ENABLED the caption API, see worker/bulk_api.py). It exits
when its shard is done (0), done with failure rows (3), or interrupted by SIGTERM after writing what it
finished (130).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from captionfleet.core.failures import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    exit_for_access_error,
)
from captionfleet.core.settings import WorkerSettings, load_kubernetes_job_env
from captionfleet.worker.accounting import count_image
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import Health, MetricsPortError, WorkerMetrics, serve_metrics

if TYPE_CHECKING:
    from captionfleet.worker.archive_progress import ArchiveProgress

log = logging.getLogger(__name__)


def record(metrics: WorkerMetrics, health: Health, result: Result) -> None:
    """One finished image, counted the way the streaming worker counts it (same metric names)."""
    health.beat()
    count_image(metrics, result)
    if not result.ok:
        metrics.failures.labels(result.error_kind or "unknown").inc()
    if result.fetch_ms is not None:
        metrics.fetch.observe(result.fetch_ms / 1000)


def show_progress(metrics: WorkerMetrics, progress: ArchiveProgress) -> None:
    """An archive job's progress as gauges (the terminal shows the same on its bar)."""
    metrics.bulk_files_total.set(progress.files_total)
    metrics.bulk_files_done.set(progress.files_done)
    metrics.bulk_images_per_second.set(progress.images_per_second)
    eta = progress.eta_s
    metrics.bulk_eta.set(-1 if eta is None else eta)


def run_bulk_worker(settings: WorkerSettings, source: str, out: str, input_format: str | None = None) -> int:
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.core.s3 import S3AccessError
    from captionfleet.core.settings import SettingsError
    from captionfleet.worker.bulk import BulkSummary, load_captioner
    from captionfleet.worker.bulk_api import BulkApi
    from captionfleet.worker.bulk_archive import (
        ArchiveJobError,
        ArchiveOptions,
        input_format_from_name,
        run_archive_job,
    )
    from captionfleet.worker.bulk_s3 import S3JobError, S3JobOptions, run_s3_caption_job
    from captionfleet.worker.http.server import HttpPortError
    from captionfleet.worker.sharding import resolve_shard

    archive = input_format or input_format_from_name(source)

    metrics, health = WorkerMetrics(), Health()
    try:
        server = serve_metrics(settings.metrics, metrics, health)
    except MetricsPortError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    api = BulkApi.off()
    try:
        try:
            shard = resolve_shard(None, settings.shard, load_kubernetes_job_env().job_completion_index)
            # WORKER_HTTP__ENABLED: the caption API while the shard runs, its port bound before the model loads.
            api = BulkApi.open(settings, metrics, health)
            captioner = load_captioner(settings)
        except (SettingsError, ModelRefError, OSError, ValueError, HttpPortError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        metrics.model.info({"version": captioner.version, "source": captioner.source})
        # A bulk worker's unit of work is its shard, held from start to finish: ready once the model is in.
        health.set(model_loaded=True, joined=True, partitions=1)
        health.beat()
        summary: BulkSummary
        try:
            if archive:  # tar shards, manifests, Parquet datasets: this pod's shard of the input files
                summary = run_archive_job(
                    source,
                    out,
                    settings,
                    options=ArchiveOptions(input_format=archive, shard=shard),
                    show_progress=False,
                    captioner=captioner,
                    on_result=lambda result: record(metrics, health, result),
                    on_progress=lambda progress: show_progress(metrics, progress),
                    api=api,
                )
            else:
                summary = run_s3_caption_job(
                    source,
                    out,
                    settings,
                    options=S3JobOptions(shard=shard),
                    show_progress=False,
                    captioner=captioner,
                    on_result=lambda result: record(metrics, health, result),
                    api=api,
                )
        except S3AccessError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_for_access_error(error)
        except (S3JobError, ArchiveJobError, HttpPortError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except ValueError as error:
            if archive:
                raise  # the archive job names its usage errors (ArchiveJobError); this one is a bug: exit 1, retried
            print(f"error: {error}", file=sys.stderr)  # the S3 job's bad uri (parse_s3_uri)
            return EXIT_USAGE
        for line in summary.lines():
            log.info("%s", line)
        output = getattr(summary, "output", out)
        if summary.interrupted:
            log.warning("interrupted: outputs written so far are in %s; run again to resume", output)
            return EXIT_INTERRUPTED
        if getattr(summary, "unfinished", None):
            log.error("some input files could not be read to their end: run again to resume")
            return EXIT_TEMPFAIL
        return EXIT_SOME_FAILED if summary.failed or getattr(summary, "files_failed", False) else EXIT_OK
    finally:
        api.close()
        if server is not None:
            server.close()
