"""How a finished image is counted in the worker metrics, in one place for both applications that
report them: the streaming worker (``worker.stream``) and the S3 bulk job run as a fleet worker
(``worker.bulk_worker``). Same metric names, so one dashboard reads either."""

from __future__ import annotations

from captionfleet.worker.messages import Result
from captionfleet.worker.metrics import WorkerMetrics


def count_image(metrics: WorkerMetrics, result: Result) -> None:
    """One finished image: captioned or failed, and for a captioned one how long it waited for its batch.
    Failures by kind are counted by the caller, which knows what to call a failure without a kind."""
    if result.ok:
        metrics.images.labels("captioned").inc()
        if result.queue_ms is not None:
            metrics.queue_wait.observe(result.queue_ms / 1000)
    else:
        metrics.images.labels("failed").inc()
