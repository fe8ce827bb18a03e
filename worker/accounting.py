"""How a finished image is counted in the worker metrics, in one place for both applications that
report them: the streaming worker (``worker.stream``) and the S3 bulk job run as a fleet worker
(``worker.bulk_worker``). Same metric names, so one dashboard reads either. The caption API's images
are counted the same way wherever it runs (``answer_interactive``)."""

from __future__ import annotations

from captionfleet.core.failures import FETCH_FAILURE
from captionfleet.worker.lanes import InteractiveItem
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


def answer_interactive(metrics: WorkerMetrics, item: InteractiveItem, result: Result) -> None:
    """An interactive (API) image finished: counted like any image, then answered to its client. One place for
    every owner of a pipeline's latency lane (`serve`, the stream, a bulk job)."""
    count_image(metrics, result)
    if not result.ok:
        metrics.failures.labels(result.error_kind or FETCH_FAILURE).inc()
    item.answer(result)
