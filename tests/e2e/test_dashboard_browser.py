"""The dashboard end to end, in a real browser: `captionfleet dashboard` served by Streamlit, a
streaming worker (`python -m captionfleet.worker`) on the real Kafka-compatible broker serving the caption API
too, and a real Prometheus scraping that worker every second. Chromium (via Playwright) uploads an image
through the page, which sends it to the worker's caption API (DASHBOARD_FLEET__API_URL), and reads its caption
and the worker that answered, then watches the fleet tab chart the batches the worker captioned.

Screenshots of both views are saved under tests/artifacts/ (ignored by git) for people to look at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.fleet_shapes import HOSTILE, LONG_VERSIONS, NEW_WORKER, POD
from tests.hostile_images import jpeg_bytes
from tests.integration.stream_support import WorkerProcess
from tests.services.browser import chromium
from tests.services.kafka import FAST_GROUP, KafkaBroker, free_port
from tests.services.prometheus import PrometheusServer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
BATCHES, PER_BATCH = 4, 6


def _worker_env(
    broker: KafkaBroker, checkpoint: Path, images: Path, tmp: Path, port: int, http_port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "DASHBOARD_"))}
    env.update(
        {
            "WORKER_KAFKA__BOOTSTRAP": broker.bootstrap,
            "WORKER_KAFKA__REQUEST_TOPIC": "dash-requests",
            "WORKER_KAFKA__RESULT_TOPIC": "dash-results",
            "WORKER_KAFKA__DEAD_LETTER_TOPIC": "dash-dead",
            "WORKER_KAFKA__GROUP_ID": "dash-group",
            "WORKER_KAFKA__CLIENT_ID": "dash-worker",
            "WORKER_KAFKA__SESSION_TIMEOUT_MS": str(FAST_GROUP["session_timeout_ms"]),
            "WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": str(FAST_GROUP["heartbeat_interval_ms"]),
            # The built-in model, whose captions are words: the page's caption is the worker's.
            "WORKER_MODEL__REF": "builtin",
            "WORKER_MODEL__DEVICE": "cpu",
            "WORKER_MODEL__CACHE_DIR": str(tmp / "cache"),
            "WORKER_DECODING__NUM_BEAMS": "1",
            "WORKER_DECODING__MAX_NEW_TOKENS": "6",
            "WORKER_HTTP__ENABLED": "true",
            "WORKER_HTTP__PORT": str(http_port),
            "PYTHONPATH": str(REPO),  # this checkout's code, not another one installed in the venv
            "WORKER_FETCH__FILE_ROOT": str(images),
            "WORKER_METRICS__HOST": "127.0.0.1",
            "WORKER_METRICS__PORT": str(port),
            "WORKER_LOG_LEVEL": "WARNING",
            # Two shared cores: one torch thread per process keeps the worker and the dashboard from thrashing.
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    return env


@pytest.fixture
def fleet(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A broker, one worker fed by it, and Prometheus scraping the worker; torn down afterwards."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.jpg").write_bytes(jpeg_bytes())
    (images / "notes.txt").write_bytes(b"not a picture\n")
    with KafkaBroker() as broker:
        broker.create_topic("dash-requests", 1)
        broker.create_topic("dash-results", 1)
        broker.create_topic("dash-dead", 1)
        port, http_port, stopped = free_port(), free_port(), free_port()
        env = _worker_env(broker, tiny_checkpoint, images, tmp_path, port, http_port)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        try:
            worker.wait_ready(timeout_s=120)
            # A second target nothing listens on: a worker that stopped, which the fleet view lists as down
            # where the dashboard's worker selector matches it (the layout test's dashboard).
            targets = [f"127.0.0.1:{port}", f"127.0.0.1:{stopped}"]
            with PrometheusServer(targets, tmp_path / "prometheus") as prometheus:
                yield {
                    "broker": broker,
                    "worker": worker,
                    "prometheus": prometheus,
                    "images": images,
                    "api": f"http://127.0.0.1:{http_port}",
                }
        finally:
            worker.close()


@pytest.fixture
def dashboard(fleet: dict[str, object], tmp_path: Path) -> Iterator[str]:
    """`captionfleet dashboard` on a free port, reading the fleet from the Prometheus server."""
    with _dashboard_server(fleet, tmp_path) as url:
        yield url


@contextmanager
def _dashboard_server(
    fleet: dict[str, object], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    prometheus = fleet["prometheus"]
    assert isinstance(prometheus, PrometheusServer)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "DASHBOARD_"))}
    env.update(
        {
            "DASHBOARD_PROMETHEUS__URL": prometheus.url,
            "DASHBOARD_PROMETHEUS__RATE_WINDOW_S": "5",  # five 1 s scrapes per rate() window
            "DASHBOARD_FLEET__REFRESH_S": "2",
            "DASHBOARD_FLEET__WINDOW_S": "180",
            # "Generate caption" through the worker's caption API (loopback: no token).
            "DASHBOARD_FLEET__API_URL": str(fleet["api"]),
            "PYTHONPATH": str(REPO),
            "WORKER_MODEL__DEVICE": "cpu",
            "WORKER_DECODING__NUM_BEAMS": "1",
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            **(extra_env or {}),
        }
    )
    command = [sys.executable, "-m", "captionfleet.cli", "dashboard", "--host", "127.0.0.1", "--port", str(port)]
    # Not the repository as working directory: the command line alone must configure Streamlit.
    with streamlit_served(command, env, tmp_path, port) as url:
        yield url


def _images_done(worker: WorkerProcess) -> float:
    return sum(v for (name, _), v in worker.metrics().items() if name == "captionfleet_images_total")


def _send_batches(fleet: dict[str, object]) -> int:
    """BATCHES bursts of PER_BATCH requests, each answered before the next is sent."""
    broker, worker, images = fleet["broker"], fleet["worker"], fleet["images"]
    assert isinstance(broker, KafkaBroker) and isinstance(worker, WorkerProcess) and isinstance(images, Path)
    prometheus = fleet["prometheus"]
    assert isinstance(prometheus, PrometheusServer)
    deadline = time.monotonic() + 30
    while not [r for r in prometheus.query('up{job="captionfleet-worker"} == 1')]:
        assert time.monotonic() < deadline, f"Prometheus never scraped the worker:\n{prometheus.log_tail()}"
        time.sleep(0.5)
    sent = 0
    for burst in range(BATCHES):
        # One request per burst names a text file: the fleet view must chart it as a failure by kind.
        names = ["notes.txt"] + ["cat.jpg"] * (PER_BATCH - 1)
        messages = [
            (0, None, json.dumps({"id": f"b{burst}-{i}", "uri": f"file://{images}/{name}"}).encode())
            for i, name in enumerate(names)
        ]
        sent += broker.produce("dash-requests", messages)
        deadline = time.monotonic() + 60
        while _images_done(worker) < sent:
            assert time.monotonic() < deadline, (
                f"worker answered {_images_done(worker)} of {sent}:\n{worker.log_tail()}"
            )
            time.sleep(0.2)
        time.sleep(2)  # spread the bursts over several 1 s scrapes
    return sent


def _peak(page: Page) -> float:
    text = page.get_by_text(re.compile(r"Throughput peak: [\d.]+ images/s")).first.inner_text(timeout=1000)
    match = re.search(r"([\d.]+) images/s", text)
    return float(match.group(1)) if match else 0.0


def test_upload_caption_and_fleet_charts_in_a_real_browser(
    fleet: dict[str, object], dashboard: str, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dashboard-fleet-failed.png").unlink(missing_ok=True)  # only a failure of this run leaves one
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(jpeg_bytes())
    sent = _send_batches(fleet)
    prometheus = fleet["prometheus"]
    assert isinstance(prometheus, PrometheusServer)

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard, wait_until="domcontentloaded")
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(upload))
        page.get_by_role("button", name="Generate caption").click()
        expect(page.get_by_text("Captions come from the fleet")).to_be_visible(timeout=30_000)
        line = page.get_by_text(re.compile(r"^model \S+ · \d+ ms · worker dash-worker$")).first
        expect(line).to_be_visible(timeout=90_000)
        caption = page.locator('[data-testid="stMarkdownContainer"] h3').first.inner_text()
        # The built-in model names the shapes it sees: the test picture is coloured squares.
        assert re.fullmatch(r"[a-z]+( [a-z]+)+", caption.strip()), caption
        assert re.search(r"\b(square|rectangle|circle|triangle)s?\b", caption), caption
        assert "upload.jpg" in page.content()
        page.screenshot(path=str(ARTIFACTS / "dashboard-upload.png"), full_page=True)

        page.set_viewport_size({"width": 1400, "height": 2000})  # Streamlit scrolls inside; show all panels
        page.get_by_role("tab", name="Fleet").click()
        expect(page.get_by_text(f"Source: Prometheus at {prometheus.url}")).to_be_visible(timeout=30_000)
        # The fragment refreshes every 2 s; rate() needs a window of scrapes after the bursts.
        deadline = time.monotonic() + 90
        while True:
            try:
                if _peak(page) > 0:
                    break
            except Exception:  # not rendered yet (the throughput panel shows "no data" at first)
                pass
            if time.monotonic() > deadline:
                page.screenshot(path=str(ARTIFACTS / "dashboard-fleet-failed.png"), full_page=True)
                raise AssertionError(f"the throughput chart never showed the batches:\n{page.inner_text('body')}")
            page.wait_for_timeout(1000)
        # Throughput, batch size, latency, lag, failures by kind, workers per version: six charts.
        expect(page.locator('[data-testid="stVegaLiteChart"]')).to_have_count(6, timeout=30_000)
        assert "No failures in the last" not in page.inner_text("body")
        expect(page.get_by_text("127.0.0.1:", exact=False).first).to_be_visible()
        page.wait_for_timeout(2500)  # one more refresh, so the charts have drawn
        page.screenshot(path=str(ARTIFACTS / "dashboard-fleet.png"), full_page=True)
        browser_text = page.inner_text("body")
        assert "No metrics source answered" not in browser_text

    # What the chart showed is what Prometheus holds: every image the worker answered, the upload included.
    total = sum(float(r["value"][1]) for r in prometheus.query("sum(captionfleet_images_total)"))
    assert total == sent + 1
    uploads = prometheus.query('sum(captionfleet_http_requests_total{route="captions",code="200"})')
    assert [float(r["value"][1]) for r in uploads] == [1.0]
    failed = prometheus.query("sum by (kind) (captionfleet_failures_total) > 0")  # every kind is exported at 0
    assert {r["metric"]["kind"]: float(r["value"][1]) for r in failed} == {"not_an_image": BATCHES}


# ---- the fleet view's layout at common widths ------------------------------------------------------------

# Desktop (full HD, the most common laptop, a small laptop) and a tablet held upright. The sidebar is open at the
# first three and collapsed at 768 (Streamlit's default below its breakpoint).
VIEWPORTS = [(1920, 1080), (1366, 768), (1024, 768), (768, 1024)]
LATENCY_SERIES = ["end-to-end p50", "end-to-end p95", "model call p50", "model call p95"]
WORKER_COLUMNS = ["worker", "up", "model version", "model source", "problem"]

# What does not fit, as the browser laid it out: one line per problem. Charts are Vega-Lite SVGs (legends are
# `g.role-legend`, every label a `text`; Vega ends a label it cut at its labelLimit with "…", and a legend with
# more series than entries with "…N entries"); the workers table is a DOM table (headers are `th` with their own
# boxes): st.table's, or HTML in a Markdown element; or a glide canvas grid for st.dataframe, whose DOM has only
# an accessible copy of the columns in view and the scroller that pans the rest in.
LAYOUT_PROBLEMS = (Path(__file__).parent / "layout_problems.js").read_text()


FLEET_PAGE = {"charts": 6, "legend": LATENCY_SERIES, "tables": 1, "columns": WORKER_COLUMNS}


def _layout_problems(page: Page, expected: dict[str, object] = FLEET_PAGE, settle_s: float = 15.0) -> list[str]:
    """The layout's problems once it has settled: charts redraw at their new width after a resize, and the
    fragment redraws everything every 2 s; an empty list as soon as one check finds nothing wrong (the check
    also counts the charts, legends and headers that must be there, so a half-drawn page is not "clean")."""
    deadline = time.monotonic() + settle_s
    while True:
        page.wait_for_timeout(1000)
        problems: list[str] = page.evaluate(LAYOUT_PROBLEMS, expected)
        if not problems or time.monotonic() > deadline:
            return problems


def _problems_at_every_width(
    page: Page, expected: dict[str, object] = FLEET_PAGE, settle_s: float = 15.0, screenshots: str | None = None
) -> str:
    """The layout's problems at each of VIEWPORTS, one line each ("" when none); ``screenshots``: a name to save
    each width's page under in tests/artifacts."""
    found = []
    for width, height in VIEWPORTS:
        page.set_viewport_size({"width": width, "height": height})
        found += [f"{width} px: {problem}" for problem in _layout_problems(page, expected, settle_s)]
        if screenshots is not None:
            page.screenshot(path=str(ARTIFACTS / f"{screenshots}-{width}.png"), full_page=True)
    return "\n".join(found)


def test_fleet_view_fits_common_widths(fleet: dict[str, object], tmp_path: Path) -> None:
    """The operators' fleet view at desktop and tablet widths: nothing wider than the window, every chart's
    legend and labels whole and inside the chart, every column header of the workers table in view. The
    fleet is the other test's (batches, failures by kind, a model version) plus a worker that stopped, which
    the table lists with its problem, so every column has something to show."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _send_batches(fleet)
    # The test's Prometheus gives its targets no Kubernetes labels: select the workers by the scrape job.
    selector = {"DASHBOARD_PROMETHEUS__WORKER_SELECTOR": 'job="captionfleet-worker"'}
    with _dashboard_server(fleet, tmp_path, selector) as url, chromium() as browser:
        width, height = VIEWPORTS[0]
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Fleet").click()
        expect(page.get_by_text(re.compile(r"1 worker\(s\) down"))).to_be_visible(timeout=60_000)
        expect(page.locator('[data-testid="stVegaLiteChart"]')).to_have_count(6, timeout=60_000)
        found = _problems_at_every_width(page, screenshots="dashboard-fleet")
    assert not found, "the fleet view does not fit:\n" + found


# ---- the fleet view's panels for made-up fleets (tests/e2e/fleet_page.py) ----------------------------------


@pytest.fixture(scope="module")
def fleet_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/e2e/fleet_page.py served by Streamlit: dashboard/app.py's fleet panels for a fleet made up there,
    ``?shape=`` picking which. No worker, broker or Prometheus: the page's layout and text are the point."""
    tmp = tmp_path_factory.mktemp("fleet-page")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "DASHBOARD_"))}
    env["PYTHONPATH"] = str(REPO)
    page = Path(__file__).with_name("fleet_page.py")
    command = [sys.executable, "-m", "streamlit", "run", str(page), "--server.address", "127.0.0.1"]
    command += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    with streamlit_served(command, env, tmp, port) as url:
        yield url


def _open_fleet_page(browser: Browser, url: str, shape: str, width: int, height: int) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("dialog", lambda dialog: pytest.fail(f"the page opened a dialog: {dialog.message}"))
    page.goto(f"{url}/?shape={shape}", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Workers")).to_be_visible(timeout=60_000)
    expect(page.locator("table")).to_have_count(1, timeout=30_000)
    return page


def test_scrape_mode_fleet_fits_common_widths(fleet_page: str) -> None:
    """The dev overlay's dashboard scrapes the workers itself and names each by its whole /metrics URL
    (http://captionfleet-worker-pods.captionfleet-dev.svc:9400/metrics): the charts' legends and the workers
    table must still fit at every common width, a worker's name included. A pod's URL is shown by its
    host:port in the legends, whole; a longer name may be cut there (its line's tooltip and the table have it)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expected = {**FLEET_PAGE, "legend": [*LATENCY_SERIES, urllib.parse.urlsplit(POD).netloc]}
    with chromium() as browser:
        width, height = VIEWPORTS[0]
        page = _open_fleet_page(browser, fleet_page, "scrape", width, height)
        expect(page.locator('[data-testid="stVegaLiteChart"]')).to_have_count(6, timeout=60_000)
        found = _problems_at_every_width(page, expected, settle_s=8, screenshots="dashboard-fleet-scrape")
    assert not found, "the scrape-mode fleet view does not fit:\n" + found


# The versions chart's axis labels, as drawn.
_VERSION_LABELS = """() => {
  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
  const chart = charts.find((c) => [...c.querySelectorAll('.role-axis-title text')]
    .some((t) => t.textContent === 'workers'));
  return chart ? [...chart.querySelectorAll('.role-axis-label text')].map((t) => t.textContent) : [];
}"""


def test_a_rollout_between_long_version_names_fits_and_tells_them_apart(fleet_page: str) -> None:
    """Two versions with long names that differ only at their ends (a rollout of a trainer's nightly run): the
    versions chart fits its column at every width, and its labels keep the ends that tell the versions apart."""
    with chromium() as browser:
        page = _open_fleet_page(browser, fleet_page, "rollout", *VIEWPORTS[0])
        expect(page.locator('[data-testid="stVegaLiteChart"]')).to_have_count(6, timeout=60_000)
        expected = {**FLEET_PAGE, "legend": [*LATENCY_SERIES, urllib.parse.urlsplit(POD).netloc]}
        found = _problems_at_every_width(page, expected, settle_s=8)
        labels = page.evaluate(_VERSION_LABELS)
    assert not found, "the fleet view with long version names does not fit:\n" + found
    for version in LONG_VERSIONS:
        assert any(version[-12:] in label for label in labels), f"{version[-12:]} not in the labels {labels}"


# Per chart, the legend's labels and how many points (symbols) are drawn.
_LEGENDS_AND_POINTS = """() => Object.fromEntries(
  [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map((chart) => {
  let item = chart.closest('[data-testid="stElementContainer"]');
  while (item && !item.querySelector('h1, h2, h3')) item = item.previousElementSibling;
  const svg = chart.querySelector('svg');
  return [item ? item.querySelector('h1, h2, h3').textContent.trim() : '?', {
    legend: [...svg.querySelectorAll('.role-legend-label text')].map((text) => text.textContent),
    points: svg.querySelectorAll('.mark-symbol.role-mark path').length,
  }];
  }))"""


def test_a_fleet_of_many_workers_and_a_new_one(fleet_page: str) -> None:
    """40 workers: each chart's legend still names every line it draws (Vega lists 29 entries and "…11 entries";
    ten colours tell ten lines apart), and it fits. A worker that has just started has one sample in the
    window: a line of one point draws nothing, so it must be drawn as a point."""
    expected = {**FLEET_PAGE, "charts": 5}  # no failures: no failures chart
    with chromium() as browser:
        page = _open_fleet_page(browser, fleet_page, "many", *VIEWPORTS[0])
        expect(page.locator('[data-testid="stVegaLiteChart"]')).to_have_count(5, timeout=60_000)
        found = _problems_at_every_width(page, expected, settle_s=8)
        charts = page.evaluate(_LEGENDS_AND_POINTS)
    assert not found, "the fleet view of many workers does not fit:\n" + found
    for name in ("Throughput", "Batch size", "Consumer lag"):
        assert len(charts[name]["legend"]) <= 10, f"{name}: {len(charts[name]['legend'])} legend entries"
    assert NEW_WORKER in charts["Consumer lag"]["legend"], charts["Consumer lag"]["legend"]
    assert charts["Consumer lag"]["points"] >= 1, "the worker with one sample is not drawn"


# Each cell's text as the browser shows it, and the elements in it that Markdown or HTML would have made (a link,
# an image, a list, a heading, code, emphasis, a formula, an icon or emoji): none may be there.
_CELLS = """() => [...document.querySelector('[data-testid="stMain"] table').querySelectorAll('tbody tr')].map(
  (tr) => [...tr.querySelectorAll('td')].map((td) => ({
    text: td.innerText,
    made: [...td.querySelectorAll('a, img, svg, code, pre, ul, ol, li, h1, h2, h3, h4, h5, h6, hr, blockquote, '
      + 'em, strong, del, b, span, br, input')].map((el) => el.outerHTML.slice(0, 80)),
  })))"""


def test_the_workers_table_shows_every_value_verbatim(fleet_page: str) -> None:
    """Names, versions, sources and problems come from the workers and the network (a scrape error quotes the
    URL and the exception): the table shows each exactly as it is, nothing turned into a link or markup."""
    with chromium() as browser:
        page = _open_fleet_page(browser, fleet_page, "hostile", 1366, 900)
        page.wait_for_timeout(1000)
        rows = page.evaluate(_CELLS)
    assert len(rows) == len(HOSTILE)
    wrong = []
    for i, (value, cells) in enumerate(zip(HOSTILE, rows, strict=True)):
        shown = [cell["text"] for cell in cells]
        wanted = [value, "yes" if i % 2 == 0 else "no", value, value, value]
        if shown != wanted:
            wrong.append(f"{value!r} shown as {[text for text in shown if text != value]}")
        made = [element for cell in cells for element in cell["made"]]
        if made:
            wrong.append(f"{value!r} made {made}")
    assert not wrong, "the workers table does not show its values verbatim:\n" + "\n".join(wrong)


_ALERTS = """() => [...document.querySelectorAll('[data-testid="stMain"] [data-testid="stAlert"], '
  + '[data-testid="stMain"] .captionfleet-warning')].map((alert) => ({
  text: alert.innerText,
  made: [...alert.querySelectorAll('a, img, code, pre, ul, ol, li, h1, h2, h3, h4, h5, h6, hr, blockquote, '
    + 'em, strong, del, b, input, .katex')].map((el) => el.outerHTML.slice(0, 80)),
}))"""


def test_the_warnings_show_every_value_verbatim(fleet_page: str) -> None:
    """The warnings above the charts quote what the network and the workers said (a source that did not
    answer, the names of workers down): each shown as it is, nothing made a link, emphasis or a formula."""
    with chromium() as browser:
        page = _open_fleet_page(browser, fleet_page, "hostile", 1366, 900)
        page.wait_for_timeout(1000)
        alerts = page.evaluate(_ALERTS)
    made = [element for alert in alerts for element in alert["made"]]
    assert not made, f"the warnings made markup of their text: {made}"
    texts = [alert["text"] for alert in alerts]  # as the browser shows them: spaces, tabs and newlines kept
    missing = [value for value in HOSTILE if value not in texts]
    assert not missing, f"not shown verbatim in a warning: {missing}\nwarnings: {texts}"
    down = [value for i, value in enumerate(HOSTILE) if i % 2][:5]
    assert any(all(name in text for name in down) for text in texts)  # the down notice


@contextmanager
def streamlit_served(command: list[str], env: dict[str, str], cwd: Path, port: int) -> Iterator[str]:
    """Run a Streamlit ``command`` in ``cwd`` (its output in ``cwd/streamlit.log``) and give its URL once it
    answers its health check; stopped after."""
    log_path = cwd / "streamlit.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "streamlit not healthy after 90 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
