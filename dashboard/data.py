"""Everything the dashboard's layout shows, fetched and cached here: app.py only lays it out.

- Uploads: the model is loaded once per process (``st.cache_resource``) and shared by every browser
  session behind a lock (a Captioner takes one call at a time); with a ``.../LATEST`` ref, LATEST is
  re-read as often as the workers poll it and a new version replaces the old. Each file is decoded
  on its own, so a corrupt or oversized file gets its own message and never costs the others their
  captions; only one batch of full-size images is alive at a time, and results keep thumbnails.
- Fleet: from Prometheus's HTTP API when a URL is set, else by scraping the workers' ``/metrics``
  directly and keeping the history in this process. Both give the same :class:`FleetView`.
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
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.dashboard.settings import DEFAULT_WORKER_SELECTOR, DashboardSettings
from captionfleet.worker.connectors.s3 import make_s3_client
from captionfleet.worker.models import LATEST, latest_root, load_version, read_latest

# -- uploads -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    captioner: Captioner
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        return self.captioner.version


# One entry: when LATEST moves, the new version's model replaces the old one instead of joining it.
@st.cache_resource(max_entries=1, show_spinner="Loading the model (once per dashboard process)...")
def _load_model(key: str, _settings: WorkerSettings, _version: str | None) -> LoadedModel:
    # Keyed by ref/device/cache dir (and the version LATEST names) only: the settings object holds
    # secrets and is not hashed.
    root = latest_root(_settings.model.ref)
    if root is not None and _version is not None:
        return LoadedModel(load_version(root, _version, _settings))
    from captionfleet.worker.bulk import load_captioner

    return LoadedModel(load_captioner(_settings))


class LatestReader:
    """The version a ``.../LATEST`` ref names, re-read at most every WORKER_MODEL__POLL_INTERVAL_S
    (as the workers poll it; 0 = read once), so uploads follow the workers to a new version."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str]] = {}  # root -> (when read, version)
        self._client: Any = None  # made once: a boto3 client costs more to build than a GET
        self._lock = threading.Lock()

    def version(self, root: str, settings: WorkerSettings, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        ttl = settings.model.poll_interval_s
        with self._lock:
            seen = self._seen.get(root)
            if seen is not None and (ttl <= 0 or now - seen[0] < ttl):
                return seen[1]
            try:
                if self._client is None:
                    self._client = make_s3_client(settings.s3, connect_timeout=5, read_timeout=10)
                version = read_latest(self._client, root)
            except (ClientError, BotoCoreError) as error:
                if seen is None:
                    raise ModelRefError(
                        f"could not read {root}/{LATEST}: {error}; check WORKER_MODEL__REF, "
                        "WORKER_S3__ENDPOINT_URL and the credentials"
                    ) from error
                version = None
            if version is None:
                if seen is None:
                    raise ModelRefError(
                        f"{root}/{LATEST} does not exist: publish a version first, or fix WORKER_MODEL__REF"
                    )
                # Unreadable or gone: keep the version in use, as a worker does, and try again a TTL later.
                version = seen[1]
            self._seen[root] = (now, version)
            return version


_LATEST_READER = LatestReader()


def load_model(settings: WorkerSettings, now: float | None = None) -> LoadedModel:
    """The model uploads are captioned with (raises when it cannot be loaded; the message says why)."""
    model = settings.model
    key = f"{model.ref}|{model.device}|{model.cache_dir}"
    root = latest_root(model.ref)
    version = None if root is None else _LATEST_READER.version(root, settings, now)
    return _load_model(f"{key}|{version or ''}", settings, version)


# Headlines per failure kind; the decoder's own message follows with the detail.
_HEADLINES = {
    "empty": "is empty",
    "not_an_image": "is not an image",
    "unsupported": "is in an unsupported format",
    "truncated": "is cut short (a corrupt or incomplete file)",
    "too_large": "is too large",
    "decode": "could not be decoded (a corrupt image)",
}


@dataclass
class UploadResult:
    name: str
    image: Image.Image | None = None
    caption: str | None = None
    model_version: str = ""
    seconds: float = 0.0  # the model call that captioned it
    batch: int = 0  # images in that call
    kind: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.caption is not None

    @property
    def problem(self) -> str:
        return f"{self.name} {_HEADLINES.get(self.kind or '', 'failed')}: {self.message}"


# The longest side of the picture a result keeps for the page (shown 200 px wide; 512 stays sharp on
# high-density screens). Results live in each session's state: a full 50-Mpx image would be ~150 MB.
THUMBNAIL_SIDE = 512


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A new image whose longest side is at most ``side`` (the image itself when it already fits)."""
    width, height = image.size
    if max(width, height) <= side:
        return image
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _decode(result: UploadResult, data: bytes, limits: ImageLimits, draft_size: tuple[int, int]) -> Image.Image | None:
    """The upload decoded at full size, or None with the reason recorded in ``result``."""
    try:
        return decode_image(data, limits=limits, draft_size=draft_size)
    except ImageError as error:
        result.kind, result.message = error.kind, error.message
        if error.kind == "too_large":
            result.message += "; the limits are WORKER_IMAGES__MAX_BYTES and WORKER_IMAGES__MAX_PIXELS"
        return None


def _caption_batch(
    model: LoadedModel, batch: list[tuple[UploadResult, Image.Image]], decoding: DecodingSettings, side: int
) -> None:
    """One model call for the batch; its results get their captions (or the failure) and thumbnails."""
    with model.lock:
        began = time.perf_counter()
        captions: list[str] | None = None
        failure = ""
        try:
            captions = model.captioner.caption([image for _, image in batch], decoding)
        except Exception as error:  # a model failure is shown per file, like any other
            failure = f"the model failed: {type(error).__name__}: {error}"
        seconds = time.perf_counter() - began
    for index, (result, image) in enumerate(batch):
        result.image = thumbnail(image, side)
        if captions is None:
            result.kind, result.message = "model", failure
        else:
            result.caption, result.model_version = captions[index], model.version
            result.seconds, result.batch = seconds, len(batch)


def caption_uploads(
    model: LoadedModel,
    files: Sequence[tuple[str, bytes]],
    decoding: DecodingSettings,
    limits: ImageLimits,
    batch_size: int,
    thumbnail_side: int = THUMBNAIL_SIDE,
) -> list[UploadResult]:
    """Caption (name, bytes) uploads; one result per file, in order, failures included.

    Files are decoded as their batch fills and dropped to thumbnails once it is captioned, so at most
    one batch of full-size images is in memory (ten 50-Mpx PNGs decoded up front would be ~1.5 GB).
    """
    results = [UploadResult(name) for name, _ in files]
    batch: list[tuple[UploadResult, Image.Image]] = []
    for result, (_, data) in zip(results, files, strict=True):
        image = _decode(result, data, limits, model.captioner.image_size)
        if image is None:
            continue
        batch.append((result, image))
        del image  # the batch holds the only reference: captioning it frees the full-size image
        if len(batch) == batch_size:
            _caption_batch(model, batch, decoding, thumbnail_side)
            batch = []
    if batch:
        _caption_batch(model, batch, decoding, thumbnail_side)
    return results


# -- the fleet view ------------------------------------------------------------------------------


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
    end = time.time() if now is None else now
    start = end - window_s
    step = max(1.0, window_s / 240)  # ~240 points per chart whatever the window
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
    failures = pd.DataFrame(
        {"failures": [float(r["value"][1]) for r in failures_rows]},
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
    # Targets Prometheus could not scrape: listed so a dead worker does not just vanish from the page.
    # Only the workers' targets (DASHBOARD_PROMETHEUS__WORKER_SELECTOR): a shared Prometheus has others.
    down = f"up{{{worker_selector}}} == 0" if worker_selector.strip() else "up == 0"
    rows += [
        {
            "worker": r["metric"].get("instance", "?"),
            "up": False,
            "model version": "",
            "model source": "",
            "problem": f"Prometheus cannot scrape it (job {r['metric'].get('job', '?')})",
        }
        for r in client.query(down)
    ]
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
