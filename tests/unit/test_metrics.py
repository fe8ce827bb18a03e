"""The worker's HTTP endpoint: /metrics in Prometheus text format, /healthz and /readyz from the Health state."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captionfleet.core.settings import MetricsSettings
from captionfleet.worker.metrics import Health, MetricsPortError, MetricsServer, WorkerMetrics, serve_metrics


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, WorkerMetrics, Health]]:
    metrics, health = WorkerMetrics(), Health(stall_after_s=60)
    server = MetricsServer("127.0.0.1", 0, metrics, health)
    try:
        yield server, metrics, health
    finally:
        server.close()


def get(server: MetricsServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_are_served_with_the_project_names(served: tuple[MetricsServer, WorkerMetrics, Health]) -> None:
    server, metrics, _ = served
    metrics.images.labels("captioned").inc(3)
    metrics.failures.labels("not_found").inc()
    metrics.lag.labels("requests", "2").set(7)
    metrics.batch_size.observe(8)
    metrics.model.info({"version": "v1", "source": "s3://models/x"})
    status, text = get(server, "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("captionfleet_images_total", (("outcome", "captioned"),))] == 3
    assert samples[("captionfleet_failures_total", (("kind", "not_found"),))] == 1
    assert samples[("captionfleet_consumer_lag", (("partition", "2"), ("topic", "requests")))] == 7
    assert samples[("captionfleet_batch_size_count", ())] == 1
    assert samples[("captionfleet_model_info", (("source", "s3://models/x"), ("version", "v1")))] == 1
    names = {name for name, _ in samples}
    assert all(name.startswith("captionfleet_") for name in names)
    assert {"captionfleet_inference_seconds_bucket", "captionfleet_end_to_end_latency_seconds_bucket"} <= names


def test_ready_with_a_model_once_in_the_group(served: tuple[MetricsServer, WorkerMetrics, Health]) -> None:
    server, _, health = served
    assert get(server, "/healthz")[0] == 200  # alive while loading the model: no restart loop on slow loads
    status, why = get(server, "/readyz")
    assert status == 503 and "model" in why
    health.set(model_loaded=True)
    status, why = get(server, "/readyz")
    assert status == 503 and "joining" in why
    # In the group with nothing assigned (more workers than partitions): ready, and it says so.
    health.set(joined=True, partitions=0)
    status, why = get(server, "/readyz")
    assert status == 200 and "no partitions" in why
    health.set(partitions=2)
    assert get(server, "/readyz") == (200, "ok\n")
    # An outage: not ready, saying which dependency and why; alive all the same (a restart would not help).
    health.outage("broker", "broker unreachable for 4s (no answer)")
    assert get(server, "/readyz") == (503, "broker unreachable for 4s (no answer)\n")
    assert get(server, "/healthz")[0] == 200
    health.outage("broker", None)
    assert get(server, "/readyz") == (200, "ok\n")
    health.set(stopping=True)
    assert get(server, "/readyz")[0] == 503
    assert get(server, "/healthz")[0] == 200


def test_failure_and_stall_make_it_unhealthy() -> None:
    now = [100.0]
    health = Health(stall_after_s=60, clock=lambda: now[0])
    health.set(model_loaded=True, joined=True, partitions=1)
    assert health.live()[0] is True  # the loop has not started yet (loading the model)
    health.beat()
    now[0] += 61
    alive, why = health.live()
    assert alive is False and "stalled" in why
    assert health.ready()[0] is False
    health.beat()
    assert health.ready() == (True, "ok")
    health = Health()
    health.set(failed="broker gone")
    assert health.live() == (False, "failed: broker gone")


def test_unknown_path(served: tuple[MetricsServer, WorkerMetrics, Health]) -> None:
    server, _, _ = served
    status, text = get(server, "/")
    assert status == 404 and "/metrics" in text


def test_two_workers_in_one_process_do_not_share_counters() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.images.labels("captioned").inc()
    assert a.sample("captionfleet_images_total", {"outcome": "captioned"}) == 1
    assert b.sample("captionfleet_images_total", {"outcome": "captioned"}) == 0


def test_a_busy_metrics_port_names_the_setting_and_disabled_serves_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError, match="WORKER_METRICS__PORT"):
            serve_metrics(MetricsSettings(host="127.0.0.1", port=port), WorkerMetrics(), Health())
    assert serve_metrics(MetricsSettings(enabled=False), WorkerMetrics(), Health()) is None


def test_every_failure_kind_exists_at_zero_from_the_start() -> None:
    # rate()/increase() need a sample before the first event: a series born at its first failure hides it.
    from captionfleet.core.failures import FAILURE_KINDS, MALFORMED, UNAVAILABLE

    registry = WorkerMetrics().registry
    for kind in sorted(FAILURE_KINDS | {MALFORMED, UNAVAILABLE}):
        assert registry.get_sample_value("captionfleet_failures_total", {"kind": kind}) == 0, kind
