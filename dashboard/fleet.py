"""The fleet page's data: throughput, batch sizes, latency, lag, failures and the workers' models.

From Prometheus's HTTP API when a URL is set, else by scraping the workers' ``/metrics`` directly and
keeping the history in this process. Both give the same :class:`FleetView`; app.py only lays it out.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st
from prometheus_client.parser import text_string_to_metric_families

from captionfleet.dashboard.settings import DEFAULT_WORKER_SELECTOR, DashboardSettings


@dataclass
class FleetView:
    """What the fleet page charts. Frames are indexed by time; columns are workers unless noted."""

    source: str
    throughput: pd.DataFrame  # images finished per second (captioned + failed)
    batch_size: pd.DataFrame  # mean images per model call
    latency: pd.DataFrame  # seconds; columns: end-to-end p50/p95, model call p50/p95 (fleet-wide)
    lag: pd.DataFrame  # messages not yet committed, summed over each worker's partitions
    failures: pd.DataFrame  # index: kind; column "failures" (increase over the window, all workers)
    workers: pd.DataFrame  # columns: worker, up, model version, model source, problem
    problems: list[str] = field(default_factory=list)  # sources that did not answer

    @property
    def answered(self) -> bool:
        return bool(len(self.workers)) and bool(self.workers["up"].any())


class SourceError(Exception):
    """A metrics source did not answer; the message says which and what to check."""


def empty_frame(columns: Sequence[str] = ()) -> pd.DataFrame:
    return pd.DataFrame(columns=list(columns), index=pd.DatetimeIndex([], name="time"), dtype=float)


def _empty_workers() -> pd.DataFrame:
    return pd.DataFrame(columns=["worker", "up", "model version", "model source", "problem"])


def _get_json(url: str, timeout_s: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")[:300]
        raise SourceError(f"{url.split('?')[0]} answered {error.code}: {body}") from error
    except (OSError, ValueError) as error:
        raise SourceError(f"{url.split('?')[0]} did not answer: {error}") from error


class PrometheusClient:
    """The two calls of Prometheus's HTTP API the dashboard needs."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        body = _get_json(f"{self.url}{path}?{urllib.parse.urlencode(params)}", self.timeout_s)
        if body.get("status") != "success":
            raise SourceError(f"Prometheus at {self.url} refused a query: {body.get('error', body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._call("/api/v1/query", {"query": expr})

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        return self._call("/api/v1/query_range", params)


def _matrix_frame(result: list[dict[str, Any]], label: str | None, name: str = "") -> pd.DataFrame:
    """A query_range matrix as a frame: one column per value of ``label`` (or ``name``)."""
    columns: dict[str, pd.Series] = {}
    for series in result:
        column = series["metric"].get(label, "?") if label else name
        times = pd.to_datetime([float(t) for t, _ in series["values"]], unit="s")
        values = [float(v) for _, v in series["values"]]
        columns[column] = pd.Series(values, index=times)
    if not columns:
        return empty_frame()
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "time"
    return frame.replace([math.inf, -math.inf], math.nan)


def prometheus_view(
    client: PrometheusClient,
    window_s: int,
    rate_window_s: int,
    now: float | None = None,
    worker_selector: str = DEFAULT_WORKER_SELECTOR,
) -> FleetView:
    step = float(max(1, round(window_s / 240)))  # ~240 points per chart whatever the window, whole seconds
    # Aligned to the step: each refresh then evaluates the same instants, so the same traffic draws the same
    # peak (unaligned, each refresh samples the rates at other instants and the peak wobbles).
    end = math.floor((time.time() if now is None else now) / step) * step
    start = end - window_s
    w = f"{rate_window_s}s"

    def matrix(expr: str, label: str | None, name: str = "") -> pd.DataFrame:
        return _matrix_frame(client.query_range(expr, start, end, step), label, name)

    throughput = matrix(f"sum by (instance) (rate(captionfleet_images_total[{w}]))", "instance")
    batch = matrix(
        f"sum by (instance) (rate(captionfleet_batch_size_sum[{w}]))"
        f" / sum by (instance) (rate(captionfleet_batch_size_count[{w}]))",
        "instance",
    )
    latency_parts = []
    for metric, what in (("end_to_end_latency", "end-to-end"), ("inference", "model call")):
        for q in (0.5, 0.95):
            expr = f"histogram_quantile({q}, sum by (le) (rate(captionfleet_{metric}_seconds_bucket[{w}])))"
            latency_parts.append(matrix(expr, None, f"{what} p{round(q * 100)}"))
    latency = pd.concat(latency_parts, axis=1).sort_index() if any(len(p) for p in latency_parts) else empty_frame()
    lag = matrix("sum by (instance) (captionfleet_consumer_lag)", "instance")

    # Over the window, like the other charts: raw totals would drop whenever a worker scales in or
    # restarts (increase() handles counter resets). Workers export every kind at 0 from the start;
    # chart only the kinds that happened.
    failures_rows = client.query(f"sum by (kind) (increase(captionfleet_failures_total[{window_s}s])) > 0")
    # increase() extrapolates to the window's edges (3.07 failures): the page counts whole failures.
    failures = pd.DataFrame(
        {"failures": [round(float(r["value"][1])) for r in failures_rows]},
        index=pd.Index([r["metric"].get("kind", "?") for r in failures_rows], name="kind"),
    )
    rows = [
        {
            "worker": r["metric"].get("instance", "?"),
            "up": True,
            "model version": r["metric"].get("version", ""),
            "model source": r["metric"].get("source", ""),
            "problem": "",
        }
        for r in client.query("captionfleet_model_info")
    ]
    # Targets Prometheus could not scrape: listed so a dead worker does not just vanish from the page. Two
    # ways to know a target is a worker: DASHBOARD_PROMETHEUS__WORKER_SELECTOR (its labels, as the Kubernetes
    # scrape job gives them), or having served captionfleet metrics within the window (a plain static scrape
    # config, whose targets carry no such labels: a stopped worker is still listed, as down).
    down = f"up{{{worker_selector}}} == 0" if worker_selector.strip() else "up == 0"
    seen = f"(up == 0) and on (instance, job) max_over_time(captionfleet_model_info[{window_s}s])"
    listed = {row["worker"] for row in rows}
    for r in client.query(down) + client.query(seen):
        instance = r["metric"].get("instance", "?")
        if instance in listed:
            continue
        listed.add(instance)
        rows.append(
            {
                "worker": instance,
                "up": False,
                "model version": "",
                "model source": "",
                "problem": f"Prometheus cannot scrape it (job {r['metric'].get('job', '?')})",
            }
        )
    workers = pd.DataFrame(rows) if rows else _empty_workers()
    return FleetView(f"Prometheus at {client.url}", throughput, batch, latency, lag, failures, workers)


# -- scraping workers directly -------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    ok: bool
    samples: Samples = field(default_factory=dict)
    error: str = ""

    def total(self, name: str, **match: str) -> float:
        return sum(v for (n, labels), v in self.samples.items() if n == name and set(match.items()) <= set(labels))

    def grew(self, before: Scrape, name: str) -> float:
        return _increase(self.total(name), before.total(name))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (n, labels), value in self.samples.items():
            if n == name:
                key = dict(labels).get(label, "?")
                out[key] = out.get(key, 0.0) + value
        return out


def expand_url(url: str) -> list[str]:
    """One http URL per address its host name resolves to, else ``[url]``.

    Why: behind a Service name each request reaches one worker, and counters taken from different
    workers in turn look like resets (invented rates). A headless Service's name resolves to every
    worker pod, so each is scraped, and charted, on its own."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or host is None:
        return [url]  # https: the certificate names the host, not its addresses
    try:
        ipaddress.ip_address(host)
        return [url]
    except ValueError:
        pass
    port = parts.port or 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]  # scraping it reports the error
    addresses = sorted({str(info[4][0]) for info in infos})
    if len(addresses) < 2:
        return [url]
    hosts = [f"[{a}]" if ":" in a else a for a in addresses]  # IPv6 literals are bracketed in URLs
    return [urllib.parse.urlunsplit(parts._replace(netloc=f"{h}:{port}")) for h in hosts]


def scrape(url: str, timeout_s: float) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    except (OSError, ValueError) as error:
        return Scrape(False, error=f"{url} did not answer: {error}")
    if not any(name.startswith("captionfleet_") for name, _ in samples):
        return Scrape(False, error=f"{url} answered, but with no captionfleet_ metrics: is it a worker's /metrics?")
    return Scrape(True, samples)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts keyed by upper bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # the answer is above the largest finite bound: report that bound
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def _increase(new: float, old: float) -> float:
    return new if new < old else new - old  # a smaller counter means the worker restarted


class ScrapeHistory:
    """Scrape rounds of every worker, kept in this process and shared by all sessions."""

    def __init__(self, urls: Sequence[str], timeout_s: float, history: int, min_interval_s: float) -> None:
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.rounds: deque[tuple[float, dict[str, Scrape]]] = deque(maxlen=history)
        self._lock = threading.Lock()

    def refresh(self, now: float | None = None) -> None:
        """Scrape every worker, unless the last round is younger than the refresh interval."""
        with self._lock:
            now = time.time() if now is None else now
            if self.rounds and now - self.rounds[-1][0] < self.min_interval_s:
                return
            targets = [target for url in self.urls for target in expand_url(url)]
            self.rounds.append((now, {target: scrape(target, self.timeout_s) for target in targets}))

    def view(self, window_s: float) -> FleetView:
        with self._lock:
            rounds = list(self.rounds)
        if rounds:
            rounds = [r for r in rounds if r[0] >= rounds[-1][0] - window_s]
        throughput: dict[str, dict[pd.Timestamp, float]] = {}
        batch: dict[str, dict[pd.Timestamp, float]] = {}
        lag: dict[str, dict[pd.Timestamp, float]] = {}
        latency: dict[str, dict[pd.Timestamp, float]] = {}
        failures: dict[str, float] = {}  # by kind, grown over the window (scaled-in workers included)
        for (t0, before), (t1, after) in itertools.pairwise(rounds):
            at = pd.Timestamp(t1, unit="s")
            pooled: dict[str, dict[float, float]] = {"end_to_end_latency": {}, "inference": {}}
            for url, new in after.items():
                old = before.get(url)
                if not (new.ok and old is not None and old.ok):
                    continue
                throughput.setdefault(url, {})[at] = new.grew(old, "captionfleet_images_total") / (t1 - t0)
                calls = new.grew(old, "captionfleet_batch_size_count")
                sizes = new.grew(old, "captionfleet_batch_size_sum")
                batch.setdefault(url, {})[at] = sizes / calls if calls else math.nan
                old_failures = old.by_label("captionfleet_failures_total", "kind")
                for kind, n in new.by_label("captionfleet_failures_total", "kind").items():
                    failures[kind] = failures.get(kind, 0.0) + _increase(n, old_failures.get(kind, 0.0))
                for metric, pool in pooled.items():
                    name = f"captionfleet_{metric}_seconds_bucket"
                    for le, count in new.by_label(name, "le").items():
                        grew = _increase(count, old.by_label(name, "le").get(le, 0.0))
                        pool[float(le)] = pool.get(float(le), 0.0) + grew
            for metric, what in (("end_to_end_latency", "end-to-end"), ("inference", "model call")):
                for q in (0.5, 0.95):
                    latency.setdefault(f"{what} p{round(q * 100)}", {})[at] = histogram_quantile(q, pooled[metric])
        for t, scrapes in rounds:
            for url, s in scrapes.items():
                if s.ok:
                    lag.setdefault(url, {})[pd.Timestamp(t, unit="s")] = s.total("captionfleet_consumer_lag")

        # Every kind is exported at 0 from the start; chart the ones that happened.
        failures = {kind: n for kind, n in failures.items() if n > 0}
        latest = rounds[-1][1] if rounds else {}
        rows = []
        for url in latest or self.urls:  # what the last round scraped: one row per worker pod
            found = latest.get(url)
            if found is not None and found.ok:
                s = found
                info = next((dict(labels) for n, labels in s.samples if n == "captionfleet_model_info"), {})
                rows.append(
                    {
                        "worker": url,
                        "up": True,
                        "model version": info.get("version", "(loading)"),
                        "model source": info.get("source", ""),
                        "problem": "",
                    }
                )
            else:
                error = found.error if found is not None else "not scraped yet"
                rows.append({"worker": url, "up": False, "model version": "", "model source": "", "problem": error})
        return FleetView(
            source=f"scraping {len(rows)} worker(s) directly (history since this dashboard started)",
            throughput=_frame(throughput),
            batch_size=_frame(batch),
            latency=_frame(latency),
            lag=_frame(lag),
            failures=pd.DataFrame({"failures": list(failures.values())}, index=pd.Index(list(failures), name="kind")),
            workers=pd.DataFrame(rows) if rows else _empty_workers(),
            problems=[str(r["problem"]) for r in rows if r["problem"]],
        )


def _frame(columns: dict[str, dict[pd.Timestamp, float]]) -> pd.DataFrame:
    if not columns:
        return empty_frame()
    frame = pd.DataFrame({name: pd.Series(points, dtype=float) for name, points in columns.items()}).sort_index()
    frame.index.name = "time"
    return frame


def down_notices(view: FleetView) -> list[str]:
    """What the page says when workers are missing, naming the likely cause: a worker Prometheus (or the
    dashboard) still has a target for but gets no answer from has most likely stopped; no worker at all in an
    answering source points at the scrape configuration."""
    down = view.workers[~view.workers["up"]] if len(view.workers) else view.workers
    notices = []
    if len(down):
        names = ", ".join(str(name) for name in down["worker"][:5])
        notices.append(
            f"{len(down)} worker(s) down ({names}): their targets are known but do not answer, so the workers "
            "are most likely stopped or crashed (check their pods or processes); a worker removed on purpose "
            "leaves this list once it is out of the window."
        )
    if view.workers.empty and not view.problems:
        notices.append(
            "The source answered, but it knows no captionfleet worker: its scrape configuration has no target "
            "for the workers' /metrics (WORKER_METRICS__PORT), or DASHBOARD_PROMETHEUS__WORKER_SELECTOR does not "
            "match the labels it gives them."
        )
    return notices


@st.cache_resource
def _scrape_history(urls: tuple[str, ...], timeout_s: float, history: int, min_interval_s: float) -> ScrapeHistory:
    return ScrapeHistory(urls, timeout_s, history, min_interval_s)


def fleet_view(settings: DashboardSettings) -> FleetView | None:
    """The fleet as the configured source sees it; None when no source is configured."""
    if settings.prometheus.url:
        client = PrometheusClient(settings.prometheus.url, settings.prometheus.timeout_s)
        try:
            return prometheus_view(
                client,
                settings.fleet.window_s,
                settings.prometheus.rate_window_s,
                worker_selector=settings.prometheus.worker_selector,
            )
        except SourceError as error:
            empty = empty_frame()
            return FleetView(
                f"Prometheus at {client.url}",
                empty,
                empty,
                empty,
                empty,
                pd.DataFrame({"failures": []}),
                _empty_workers(),
                [f"{error}; check DASHBOARD_PROMETHEUS__URL"],
            )
    if settings.scrape.urls:
        scraping = settings.scrape
        # Half the refresh interval: every session's refresh then finds a fresh round, yet N open
        # browsers do not mean N scrapes per interval.
        history = _scrape_history(
            tuple(scraping.urls), scraping.timeout_s, scraping.history, settings.fleet.refresh_s / 2
        )
        history.refresh()
        return history.view(settings.fleet.window_s)
    return None
