"""Prometheus metrics and the HTTP endpoint every worker serves: /metrics, /healthz, /readyz.

Each worker has its own registry (not prometheus-client's global one), so several workers in one
process, as in tests, never share counters. Names follow the project's conventions: the
``captionfleet_`` prefix, counters ending in ``_total``, durations as ``_seconds`` histograms.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from captionfleet.core.failures import FAILURE_KINDS
from captionfleet.core.settings import MetricsSettings

log = logging.getLogger(__name__)

# Seconds: from a few ms (tiny models, warm cache) to a minute (a big model on CPU under load).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Defined by area, in this order (the order of /metrics' output).
        self._request_metrics(self.registry)
        self._stage_metrics(self.registry)
        self._consumer_metrics(self.registry)
        self._model_metrics(self.registry)
        self._bulk_metrics(self.registry)
        self._http_metrics(self.registry)

    def _request_metrics(self, r: CollectorRegistry) -> None:
        """Messages in, requests parsed, images out by outcome, dead letters by kind."""
        self.messages = Counter(
            "captionfleet_messages_consumed", "Kafka messages consumed from the request topic", ["topic"], registry=r
        )
        self.requests = Counter(
            "captionfleet_requests", "caption requests parsed from messages, by message shape", ["source"], registry=r
        )
        self.images = Counter(
            "captionfleet_images", "requests finished, by outcome (captioned or failed)", ["outcome"], registry=r
        )
        self.failures = Counter(
            "captionfleet_failures",
            "dead letters by failure kind (malformed messages included, as kind=malformed)",
            ["kind"],
            registry=r,
        )
        self.ignored = Counter(
            "captionfleet_ignored_events", "S3 events with nothing to caption (test events, deletions)", registry=r
        )
        # Every outcome and failure kind exists at 0 from the start: Prometheus's rate()/increase()
        # need a sample before the first event, or a new worker's first burst is never counted.
        for outcome in ("captioned", "failed"):
            self.images.labels(outcome)
        for kind in sorted(FAILURE_KINDS):
            self.failures.labels(kind)

    def _stage_metrics(self, r: CollectorRegistry) -> None:
        """Batch sizes and the time each stage of a request takes."""
        self.batch_size = Histogram(
            "captionfleet_batch_size", "images per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "captionfleet_queue_wait_seconds",
            "time an image waited between being decoded and its batch starting",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "captionfleet_inference_seconds",
            "duration of one model call (a batch)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fetch = Histogram(
            "captionfleet_fetch_seconds",
            "time to read one image (retries included), failed reads included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "captionfleet_end_to_end_latency_seconds",
            "request message timestamp to its result (or dead letter) being sent",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _consumer_metrics(self, r: CollectorRegistry) -> None:
        """The Kafka consumer: lag, in-flight requests, back-pressure, partitions, rebalances, commits."""
        self.lag = Gauge(
            "captionfleet_consumer_lag",
            "messages on the partition not yet done and committed (high watermark minus commit point)",
            ["topic", "partition"],
            registry=r,
        )
        self.in_flight = Gauge("captionfleet_in_flight_requests", "requests fetched but not yet answered", registry=r)
        self.fetch_paused = Gauge(
            "captionfleet_fetch_paused", "1 while fetching is paused because the in-flight limit is reached", registry=r
        )
        self.assigned = Gauge("captionfleet_assigned_partitions", "partitions this worker owns", registry=r)
        self.rebalances = Counter(
            "captionfleet_rebalances", "partition assignments received (1 per join; more means rebalances)", registry=r
        )
        self.commits = Counter("captionfleet_commits", "offset commits (each after a producer flush)", registry=r)
        # Outages (worker.stream.outages): while a dependency is down fetching is paused and /readyz says why.
        self.dependency_up = Gauge(
            "captionfleet_dependency_up",
            "1 while the dependency answers, 0 during an outage (object_store, broker)",
            ["dependency"],
            registry=r,
        )
        self.outage_retries = Counter(
            "captionfleet_outage_retries",
            "reads retried because the dependency was unreachable (after the fetcher's own quick attempts)",
            ["dependency"],
            registry=r,
        )

    def _model_metrics(self, r: CollectorRegistry) -> None:
        """The loaded model, and hot swaps to newly published versions."""
        self.model = Info("captionfleet_model", "the loaded model", registry=r)
        # Hot swaps (worker.hotswap): a new version taking over, and versions that failed to load.
        self.model_swaps = Counter(
            "captionfleet_model_swaps", "switches to a newly published model version", registry=r
        )
        self.model_load_failures = Counter(
            "captionfleet_model_load_failures",
            "published model versions that failed to load (the serving model stays)",
            registry=r,
        )
        self.model_load_failure = Info(
            "captionfleet_model_load_failure", "the last model version that failed to load, and why", registry=r
        )

    def _bulk_metrics(self, r: CollectorRegistry) -> None:
        """An archive job's progress (worker/archive_progress.py): input files, pace, time left."""
        self.bulk_files_total = Gauge(
            "captionfleet_bulk_files_total", "input files (tar shards, manifests) in this worker's shard", registry=r
        )
        self.bulk_files_done = Gauge(
            "captionfleet_bulk_files_done", "input files of this worker's shard with their outputs written", registry=r
        )
        self.bulk_images_per_second = Gauge(
            "captionfleet_bulk_images_per_second", "images finished per second since this run started", registry=r
        )
        self.bulk_eta = Gauge(
            "captionfleet_bulk_eta_seconds",
            "seconds left for this worker's shard at this run's pace (-1 until a file is done)",
            registry=r,
        )

    def _http_metrics(self, r: CollectorRegistry) -> None:
        """The caption API (worker/http/): requests by route and status, refusals, queued and dropped images."""
        self.http_requests = Counter(
            "captionfleet_http_requests", "API requests answered, by route and status", ["route", "code"], registry=r
        )
        self.http_seconds = Histogram(
            "captionfleet_http_request_seconds",
            "API request received to answered, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_refused = Counter(
            "captionfleet_http_refused",
            "API requests refused before being read (unauthorized, draining, starting, busy, too_large)",
            ["reason"],
            registry=r,
        )
        self.http_in_flight = Gauge("captionfleet_http_in_flight_requests", "API requests being answered", registry=r)
        self.http_queued = Gauge(
            "captionfleet_http_queued_images", "API images given to the model and not answered yet", registry=r
        )
        self.http_dropped = Counter(
            "captionfleet_http_dropped_images",
            "API images dropped before their batch because their request timed out or its client went away",
            ["reason"],
            registry=r,
        )

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent): for tests and the bench."""
        value = self.registry.get_sample_value(name, labels or {})
        return value or 0.0


class Health:
    """What /healthz and /readyz answer. Written by the worker loop, read by the HTTP threads."""

    def __init__(
        self, stall_after_s: float = 120.0, clock: Callable[[], float] = time.monotonic, *, consumer: bool = True
    ) -> None:
        self._lock = threading.Lock()
        # False for `captionfleet serve` (the API alone): no consumer group to join before being ready.
        self.consumer = consumer
        # The consumer loop turns several times a second; a minute of silence means it is stuck.
        self.stall_after_s = stall_after_s
        self._clock = clock
        self.model_loaded = False
        # In the consumer group: an assignment has been received, possibly of no partitions.
        self.joined = False
        self.partitions = 0
        self.stopping = False
        self.failed: str | None = None
        # Dependencies down now (name -> why): not ready while any is, so a rollout waits for them.
        self.outages: dict[str, str] = {}
        # None until the loop starts: loading a big model can take minutes and is not a stall.
        self._beat: float | None = None

    def beat(self) -> None:
        """The consumer loop is alive: called on every turn, rebalance drains included."""
        self._beat = self._clock()

    def set(
        self,
        *,
        model_loaded: bool | None = None,
        joined: bool | None = None,
        partitions: int | None = None,
        stopping: bool | None = None,
        failed: str | None = None,
    ) -> None:
        with self._lock:
            if model_loaded is not None:
                self.model_loaded = model_loaded
            if joined is not None:
                self.joined = joined
            if partitions is not None:
                self.partitions = partitions
            if stopping is not None:
                self.stopping = stopping
            if failed is not None:
                self.failed = failed

    def outage(self, dependency: str, why: str | None) -> None:
        """``dependency`` is down (why) or up again (None)."""
        with self._lock:
            if why is None:
                self.outages.pop(dependency, None)
            else:
                self.outages[dependency] = why

    def live(self) -> tuple[bool, str]:
        with self._lock:
            if self.failed:
                return False, f"failed: {self.failed}"
        stalled = 0.0 if self._beat is None else self._clock() - self._beat
        if stalled > self.stall_after_s:
            return False, f"consumer loop stalled for {stalled:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        with self._lock:
            if not live:
                return False, why
            if not self.model_loaded:
                return False, "model not loaded yet"
            if self.stopping:
                return False, "shutting down"
            if self.outages:
                return False, "; ".join(self.outages[name] for name in sorted(self.outages))
            if not self.consumer:
                return True, "ok"
            if not self.joined:
                return False, "joining the consumer group"
            # Ready with no partitions: with more workers than partitions (a rollout's surge pod, say)
            # the idle one is healthy and waiting, and holding it unready would stall the rollout.
            if self.partitions == 0:
                return True, "ok: no partitions assigned (more workers than partitions)"
        return True, "ok"


class MetricsServer:
    """A small threaded HTTP server; ``port`` is the bound one (useful with port 0)."""

    def __init__(self, host: str, port: int, metrics: WorkerMetrics, health: Health) -> None:
        handler = _make_handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(metrics: WorkerMetrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, why = health.live()
                self._send(200 if ok else 503, why.encode() + b"\n")
            elif path == "/readyz":
                ok, why = health.ready()
                self._send(200 if ok else 503, why.encode() + b"\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics http: " + format, *args)  # probes every few seconds must not flood the logs

    return Handler


class MetricsPortError(Exception):
    """The metrics endpoint could not be opened; the message names the setting to change."""


def serve_metrics(settings: MetricsSettings, metrics: WorkerMetrics, health: Health) -> MetricsServer | None:
    """The worker's /metrics, /healthz and /readyz server, or None when WORKER_METRICS__ENABLED is false."""
    if not settings.enabled:
        return None
    try:
        return MetricsServer(settings.host, settings.port, metrics, health)
    except OSError as error:
        raise MetricsPortError(
            f"cannot serve metrics on {settings.host}:{settings.port}: {error}; "
            "set WORKER_METRICS__PORT to a free port (0 picks one)"
        ) from error
