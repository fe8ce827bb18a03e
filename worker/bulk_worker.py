"""`captionfleet worker --source s3://… --out s3://…`: the S3 bulk job run as a fleet worker.

The same job as `captionfleet caption s3://…` (worker/bulk_s3.py: sharded, resumable, parts written
whole), but shaped for a Kubernetes Indexed Job pod rather than a terminal: no progress bar, the
shard from the pod's environment, and Prometheus metrics with /healthz and /readyz on the worker's
metrics port while it runs. It exits when its shard is done (0), done with failure rows (3), or
interrupted by SIGTERM after writing what it finished (130).
"""

from __future__ import annotations

import logging
import sys

from captionfleet.core.failures import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    exit_for_access_error,
)
from captionfleet.core.settings import WorkerSettings, load_kubernetes_job_env
from captionfleet.worker.accounting import count_image
from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import Health, MetricsPortError, WorkerMetrics, serve_metrics

log = logging.getLogger(__name__)


def record(metrics: WorkerMetrics, health: Health, result: Result) -> None:
    """One finished image, counted the way the streaming worker counts it (same metric names)."""
    health.beat()
    count_image(metrics, result)
    if not result.ok:
        metrics.failures.labels(result.error_kind or "unknown").inc()
    if result.fetch_ms is not None:
        metrics.fetch.observe(result.fetch_ms / 1000)


def run_bulk_worker(settings: WorkerSettings, source: str, out: str) -> int:
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.core.s3 import S3AccessError
    from captionfleet.core.settings import SettingsError
    from captionfleet.worker.bulk import load_captioner
    from captionfleet.worker.bulk_s3 import S3JobError, S3JobOptions, run_s3_caption_job
    from captionfleet.worker.sharding import resolve_shard

    metrics, health = WorkerMetrics(), Health()
    try:
        server = serve_metrics(settings.metrics, metrics, health)
    except MetricsPortError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            shard = resolve_shard(None, settings.shard, load_kubernetes_job_env().job_completion_index)
            captioner = load_captioner(settings)
        except (SettingsError, ModelRefError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        metrics.model.info({"version": captioner.version, "source": captioner.source})
        # A bulk worker's unit of work is its shard, held from start to finish: ready once the model is in.
        health.set(model_loaded=True, joined=True, partitions=1)
        health.beat()
        try:
            summary = run_s3_caption_job(
                source,
                out,
                settings,
                options=S3JobOptions(shard=shard),
                show_progress=False,
                captioner=captioner,
                on_result=lambda result: record(metrics, health, result),
            )
        except S3AccessError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_for_access_error(error)
        except (S3JobError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        for line in summary.lines():
            log.info("%s", line)
        if summary.interrupted:
            log.warning("interrupted: parts written so far are in %s; run again to resume", summary.output)
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if summary.failed else EXIT_OK
    finally:
        if server is not None:
            server.close()
