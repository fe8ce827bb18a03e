"""The fleet view's data without Prometheus: scraping a real worker metrics endpoint (in process, on a
free port) and turning successive scrapes into rates, batch sizes, quantiles, lag and versions."""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from streamlit.testing.v1 import AppTest

from captionfleet.dashboard.fleet import Scrape, ScrapeHistory, fleet_view, histogram_quantile, prometheus_view
from captionfleet.dashboard.settings import load_dashboard_settings
from captionfleet.worker.metrics import Health, MetricsServer, WorkerMetrics
from tests.services.kafka import free_port

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def worker() -> Iterator[tuple[WorkerMetrics, str]]:
    metrics = WorkerMetrics()
    metrics.model.info({"version": "v7", "source": "/models/v7"})
    server = MetricsServer("127.0.0.1", 0, metrics, Health())
    try:
        yield metrics, f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.close()


def warnings(at: AppTest) -> list[str]:
    """The text of the page's warning boxes (dashboard/charts.py's warning_html: HTML, its text verbatim)."""
    boxes = [element.value for element in at.markdown if "captionfleet-warning" in element.value]
    return [html.unescape(re.sub(r"<[^>]+>", "", box)) for box in boxes]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * (38 - 30) / 10)
    assert histogram_quantile(0.99, {1.0: 1.0, math.inf: 5.0}) == 1.0  # beyond the last finite bound
    assert math.isnan(histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}))


def test_scrapes_become_rates_batch_sizes_latency_lag_and_versions(worker: tuple[WorkerMetrics, str]) -> None:
    metrics, url = worker
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    history = ScrapeHistory([url, dead], timeout_s=2, history=10, min_interval_s=0)
    history.refresh(now=1000.0)
    metrics.images.labels("captioned").inc(8)
    metrics.images.labels("failed").inc(2)
    for size in (4, 4, 2):
        metrics.batch_size.observe(size)
    for seconds in (0.02, 0.02, 0.02, 0.7):
        metrics.end_to_end.observe(seconds)
    metrics.failures.labels("decode").inc(2)
    metrics.lag.labels("req", "0").set(5)
    metrics.lag.labels("req", "1").set(7)
    history.refresh(now=1002.0)

    view = history.view(window_s=60)
    assert view.throughput[url].iloc[-1] == pytest.approx(5.0)  # 10 images in 2 s
    assert view.batch_size[url].iloc[-1] == pytest.approx(10 / 3)
    p50 = view.latency["end-to-end p50"].iloc[-1]
    assert 0.01 < p50 <= 0.025 and view.latency["end-to-end p95"].iloc[-1] > 0.5
    assert view.lag[url].iloc[-1] == 12
    assert view.failures.loc["decode", "failures"] == 2
    rows = {row["worker"]: row for row in view.workers.to_dict("records")}
    assert rows[url]["up"] and rows[url]["model version"] == "v7"
    assert not rows[dead]["up"] and "did not answer" in rows[dead]["problem"]
    assert view.answered

    # A restarted worker's counters start again from zero: a drop is a reset (3 new images), never negative.
    restarted = Scrape(True, {("captionfleet_images_total", (("outcome", "captioned"),)): 3.0})
    history.rounds.append((1003.0, {url: restarted}))
    assert history.view(window_s=60).throughput[url].iloc[-1] == pytest.approx(3.0)


def test_the_page_says_so_when_no_worker_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHBOARD_PROMETHEUS__URL", raising=False)
    monkeypatch.setenv("DASHBOARD_SCRAPE__URLS", f"http://127.0.0.1:{free_port()}/metrics")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("No metrics source answered" in e.value for e in at.error)
    assert any("did not answer" in w for w in warnings(at))


def test_the_page_charts_a_scraped_worker(worker: tuple[WorkerMetrics, str], monkeypatch: pytest.MonkeyPatch) -> None:
    metrics, url = worker
    monkeypatch.delenv("DASHBOARD_PROMETHEUS__URL", raising=False)
    monkeypatch.setenv("DASHBOARD_SCRAPE__URLS", url)
    monkeypatch.setenv("DASHBOARD_FLEET__REFRESH_S", "0.5")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any(c.value == "No failures in the last 15 min" for c in at.caption)
    metrics.failures.labels("not_found").inc(3)
    time.sleep(0.3)  # past the minimum interval between scrape rounds (refresh_s / 2)
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    (table,) = [m.value for m in at.markdown if m.value.startswith("<table")]  # the workers, as HTML
    assert [["".join(td.itertext()) for td in tr] for tr in ElementTree.fromstring(table).iter("tr")][1:] == [
        [url, "yes", "v7", "/models/v7", ""]
    ]
    # Throughput (one interval so far), failures by kind, lag and workers per version are charts.
    assert len(at.get("vega_lite_chart")) == 4
    assert not any(c.value.startswith("No failures") for c in at.caption)


def test_the_page_says_so_when_prometheus_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHBOARD_PROMETHEUS__URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DASHBOARD_PROMETHEUS__TIMEOUT_S", "2")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("No metrics source answered" in e.value for e in at.error)
    assert any("check DASHBOARD_PROMETHEUS__URL" in w for w in warnings(at))


# -- failures over the window, and the workers' targets only ---------------------------------------


def test_failures_are_counted_over_the_window_across_restarts_and_scale_in() -> None:
    def round_(**by_kind: float) -> Scrape:
        return Scrape(True, {("captionfleet_failures_total", (("kind", k),)): n for k, n in by_kind.items()})

    history = ScrapeHistory(["a", "b"], timeout_s=1, history=10, min_interval_s=0)
    history.rounds.append((1000.0, {"a": round_(decode=50.0), "b": round_(decode=7.0)}))  # before: not counted
    history.rounds.append((1010.0, {"a": round_(decode=52.0), "b": round_(decode=9.0, empty=1.0)}))
    # a restarted (its counter dropped: 1 new failure), b scaled in: its earlier failures still count.
    history.rounds.append((1020.0, {"a": round_(decode=1.0), "b": Scrape(False, error="gone")}))
    assert history.view(window_s=60).failures["failures"].to_dict() == {"decode": 2 + 2 + 1, "empty": 1}
    # Once the rounds age out of the window, their failures do too.
    history.rounds.append((1100.0, {"a": round_(decode=1.0), "b": Scrape(False, error="gone")}))
    assert history.view(window_s=60).failures.empty


class FakePrometheus:
    """PrometheusClient's two calls: records every expression, answers from ``answers``
    (expression prefix -> result rows), nothing else."""

    def __init__(self, answers: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.url = "http://prometheus.test"
        self.answers = answers or {}
        self.queries: list[str] = []

    def query(self, expr: str) -> list[dict[str, Any]]:
        self.queries.append(expr)
        return next((rows for prefix, rows in self.answers.items() if expr.startswith(prefix)), [])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        self.queries.append(expr)
        return []


def test_prometheus_failures_are_an_increase_over_the_window() -> None:
    rows = [{"metric": {"kind": "decode"}, "value": [1000, "4"]}]
    client = FakePrometheus({"sum by (kind) (increase(captionfleet_failures_total[900s]))": rows})
    view = prometheus_view(client, window_s=900, rate_window_s=60, now=1000.0)  # type: ignore[arg-type]
    assert "sum by (kind) (increase(captionfleet_failures_total[900s])) > 0" in client.queries
    assert view.failures["failures"].to_dict() == {"decode": 4.0}


def test_only_the_workers_targets_are_listed_as_down() -> None:
    down = [{"metric": {"instance": "10.0.0.5:9400", "job": "kubernetes-pods"}, "value": [1000, "0"]}]
    client = FakePrometheus({"up{": down})
    view = prometheus_view(client, window_s=900, rate_window_s=60, now=1000.0)  # type: ignore[arg-type]
    (up,) = [q for q in client.queries if q.startswith("up")]
    # The labels Prometheus's kubernetes-pods job copies from the worker pods' labels.
    assert up == 'up{app_kubernetes_io_name="captionfleet",app_kubernetes_io_component="worker"} == 0'
    assert view.workers["worker"].tolist() == ["10.0.0.5:9400"] and not view.workers["up"].any()


def test_the_worker_selector_is_a_dashboard_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakePrometheus()
    monkeypatch.setattr("captionfleet.dashboard.fleet.PrometheusClient", lambda url, timeout_s: client)
    monkeypatch.setenv("DASHBOARD_PROMETHEUS__URL", client.url)
    monkeypatch.setenv("DASHBOARD_PROMETHEUS__WORKER_SELECTOR", 'job="captionfleet-worker"')
    assert fleet_view(load_dashboard_settings()) is not None
    assert 'up{job="captionfleet-worker"} == 0' in client.queries


def test_a_name_that_resolves_to_several_workers_is_scraped_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from captionfleet.dashboard import fleet as data

    def resolve(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        if host != "workers.svc":
            raise socket.gaierror("unknown host")
        return [(socket.AF_INET, type, 6, "", (ip, port)) for ip in ("10.0.0.2", "10.0.0.1", "10.0.0.2")]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert data.expand_url("http://workers.svc:9400/metrics") == [
        "http://10.0.0.1:9400/metrics",
        "http://10.0.0.2:9400/metrics",
    ]
    for single in ("http://10.0.0.9:9400/metrics", "http://elsewhere:9400/metrics", "https://workers.svc/metrics"):
        assert data.expand_url(single) == [single]

    # Two workers behind the name: each is charted on its own, so no counter seems to reset.
    totals = {"http://10.0.0.1:9400/metrics": [1000.0, 1010.0], "http://10.0.0.2:9400/metrics": [200.0, 205.0]}
    monkeypatch.setattr(
        data,
        "scrape",
        lambda url, timeout_s: Scrape(
            True, {("captionfleet_images_total", (("outcome", "captioned"),)): totals[url].pop(0)}
        ),
    )
    history = ScrapeHistory(["http://workers.svc:9400/metrics"], timeout_s=1, history=10, min_interval_s=0)
    history.refresh(now=1000.0)
    history.refresh(now=1010.0)
    view = history.view(window_s=900)
    assert sorted(view.workers["worker"]) == sorted(totals)
    assert view.throughput.iloc[-1].to_dict() == {
        "http://10.0.0.1:9400/metrics": 1.0,
        "http://10.0.0.2:9400/metrics": 0.5,
    }


# -- operator items (issue 18): down workers without pod labels, whole failures, aligned steps, causes ----


def test_a_stopped_worker_of_a_plain_scrape_config_stays_listed_as_down() -> None:
    """A static Prometheus job gives its targets no pod labels: the default selector finds nothing, but a
    target that served captionfleet metrics within the window and is down now is a stopped worker."""
    stopped = [{"metric": {"instance": "127.0.0.1:9400", "job": "captionfleet-worker"}, "value": [1000, "0"]}]
    client = FakePrometheus({"(up == 0) and on (instance, job) max_over_time(captionfleet_model_info[900s])": stopped})
    view = prometheus_view(client, window_s=900, rate_window_s=60, now=1000.0)  # type: ignore[arg-type]
    assert view.workers["worker"].tolist() == ["127.0.0.1:9400"] and not view.workers["up"].any()


def test_failures_are_whole_numbers_and_range_queries_are_aligned_to_their_step() -> None:
    rows = [{"metric": {"kind": "decode"}, "value": [1000, "3.07"]}]
    client = FakePrometheus({"sum by (kind) (increase(captionfleet_failures_total[900s]))": rows})
    ranges: list[tuple[float, float, float]] = []
    client.query_range = lambda expr, start, end, step: ranges.append((start, end, step)) or []  # type: ignore[method-assign]
    view = prometheus_view(client, window_s=900, rate_window_s=60, now=1000.7)  # type: ignore[arg-type]
    assert view.failures["failures"].to_dict() == {"decode": 3}
    again: list[tuple[float, float, float]] = []
    client.query_range = lambda expr, start, end, step: again.append((start, end, step)) or []  # type: ignore[method-assign]
    prometheus_view(client, window_s=900, rate_window_s=60, now=1001.9)  # type: ignore[arg-type]
    start, end, step = ranges[0]
    assert end % step == 0 and start % step == 0
    assert again[0] == ranges[0]  # a refresh within the same step evaluates the same instants


def test_the_down_notice_names_the_likely_cause() -> None:
    from captionfleet.dashboard.fleet import FleetView, down_notices, empty_frame

    def view(workers: list[dict[str, Any]]) -> FleetView:
        import pandas as pd

        frame = pd.DataFrame(workers, columns=["worker", "up", "model version", "model source", "problem"])
        empty = empty_frame()
        return FleetView("test", empty, empty, empty, empty, pd.DataFrame({"failures": []}), frame)

    (stopped,) = down_notices(view([{"worker": "w1:9400", "up": False, "problem": "x"}]))
    assert "w1:9400" in stopped and "stopped or crashed" in stopped
    (unknown,) = down_notices(view([]))
    assert "scrape configuration" in unknown and "DASHBOARD_PROMETHEUS__WORKER_SELECTOR" in unknown
    assert down_notices(view([{"worker": "w1:9400", "up": True, "problem": ""}])) == []
