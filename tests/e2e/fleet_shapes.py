"""Made-up fleets for the fleet view's panels, which tests/e2e/fleet_page.py draws and
tests/e2e/test_dashboard_browser.py reads in a real browser, by name (``VIEWS``):

- ``scrape``: the dev overlay's shape, the dashboard scraping the workers itself
  (DASHBOARD_SCRAPE__URLS=http://captionfleet-worker-pods.captionfleet-dev.svc:9400/metrics), so each worker is
  named by a whole /metrics URL (fleet.py ``expand_url``): in every chart's legend and in the workers table;
- ``hostile``: workers whose names, versions, sources and problems hold text that Markdown, HTML or Streamlit's
  own shortcodes would take for something else (``HOSTILE``), which the table must show as it is;
- ``many``: more workers (``MANY``) than a chart's legend has room for.
"""

from __future__ import annotations

import math

import pandas as pd

from captionfleet.dashboard.fleet import FleetView, empty_frame

DEV_SERVICE = "http://captionfleet-worker-pods.captionfleet-dev.svc:9400/metrics"
POD = "http://10.244.1.16:9400/metrics"  # a pod's own URL: the Service's name resolves to several (expand_url)
DOWN_POD = "http://10.244.1.17:9400/metrics"
LATENCY = ["end-to-end p50", "end-to-end p95", "model call p50", "model call p95"]
MANY = 40
NEW_WORKER = "10.244.0.10:9400"  # the first of them, one sample of lag (the page charts its throughput from 0)

# Each a value the workers table must show verbatim: what Markdown (GFM, math, Streamlit's directives and
# shortcodes) or HTML would turn into a link, a list, a heading, a formula, an icon, an emoji, an entity's
# character, an arrow, or swallow (newlines, leading spaces).
HOSTILE = [
    "http://10.0.0.8:9400/metrics did not answer: <urlopen error [Errno 111] Connection refused>",
    "http://my_host:9400/metrics",
    "see www.evil.example/x_y",
    "mail admin@evil.example",
    "cost $1 and $2, price $x$, $$a+b$$",
    "rocket :rocket: :smile: :material/home: :material_home: :streamlit: here",
    "x:red[red]y models/captioner:blue[1] :small[s]",
    "- a list item",
    "1. ordered",
    "line1\n\nline2",
    "line1\n===",
    "    four spaces code",
    "---",
    "trailing two spaces  \nnext",
    "&lt;b&gt; &amp; &copy; &#65;",
    "<img src=x onerror=alert(1)> <b>bold</b> <!-- c -->",
    "![img](http://evil.example/p.png) [click](http://evil.example) <http://evil.example>",
    "__init__ *star* `code` ~strike~ # head | pipe \\ back a\\_b",
    "a -> b <- c -- d >= e <= f ~= g <-> h",
    "tab\there, [fd00::1]:9400, héllo 日本 😀",
]


def _times(n: int = 20) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime([1_700_000_000 + 15 * i for i in range(n)], unit="s"), name="time")


def _frame(columns: list[str], scale: float = 1.0) -> pd.DataFrame:
    times = _times()
    return pd.DataFrame(
        {name: [scale * (1 + (i + j) % 3) for j in range(len(times))] for i, name in enumerate(columns)}, index=times
    )


def _worker(name: str, up: bool, version: str = "", source: str = "", problem: str = "") -> dict[str, object]:
    return {"worker": name, "up": up, "model version": version, "model source": source, "problem": problem}


def scrape_view() -> FleetView:
    version = "builtin-shapes-9ceb04b92fba"
    source = "s3://captionfleet-models-dev/models/captioner/versions/captioner-9ceb04b92fba/"
    problem = f"{DOWN_POD} did not answer: <urlopen error [Errno 111] Connection refused>"
    return FleetView(
        source="scraping 3 worker(s) directly (history since this dashboard started)",
        # Both names a scrape-mode dashboard gives a worker: the Service's URL (one pod) and a pod's (several).
        throughput=_frame([DEV_SERVICE, POD]),
        batch_size=_frame([DEV_SERVICE, POD], 2.0),
        latency=_frame(LATENCY, 0.1),
        lag=_frame([DEV_SERVICE, POD], 400_000.0),  # a backlog: axis labels up to "1,200,000", the legend after them
        failures=pd.DataFrame({"failures": [4.0]}, index=pd.Index(["not_an_image"], name="kind")),
        workers=pd.DataFrame(
            [
                _worker(DEV_SERVICE, True, version, source),
                _worker(POD, True, version, source),
                _worker(DOWN_POD, False, problem=problem),
            ]
        ),
        problems=[problem],
    )


def hostile_view() -> FleetView:
    workers = [_worker(value, i % 2 == 0, value, value, value) for i, value in enumerate(HOSTILE)]
    return FleetView(
        source="made up",
        throughput=empty_frame(),
        batch_size=empty_frame(),
        latency=empty_frame(),
        lag=empty_frame(),
        failures=pd.DataFrame({"failures": []}, index=pd.Index([], name="kind")),
        workers=pd.DataFrame(workers),
        problems=list(HOSTILE),  # the warnings above the charts show them (and the down workers' names)
    )


def many_view() -> FleetView:
    names = [f"10.244.{i // 8}.{i % 8 + 10}:9400" for i in range(MANY)]
    assert names[0] == NEW_WORKER
    lag = _frame(names, 5.0)
    lag.iloc[:, 0] = [math.nan] * 19 + [900.0]  # a worker that just started: one sample so far
    return FleetView(
        source="made up",
        throughput=_frame(names),
        batch_size=_frame(names, 2.0),
        latency=_frame(LATENCY, 0.1),
        lag=lag,
        failures=pd.DataFrame({"failures": []}, index=pd.Index([], name="kind")),
        workers=pd.DataFrame([_worker(name, True, "v1") for name in names]),
    )


# A rollout between two versions named as a trainer's runs may be: long, and told apart only by their ends.
LONG_VERSIONS = [
    "captioner-finetune-shapes-lr1.5e-3-5000-steps-nightly-2026-12-05-9ceb04b92fba",
    "captioner-finetune-shapes-lr1.5e-3-5000-steps-nightly-2026-12-05-020ccef62f22",
]


def rollout_view() -> FleetView:
    view = scrape_view()
    view.workers = pd.DataFrame(
        [
            _worker(DEV_SERVICE, True, LONG_VERSIONS[0], "s3://models/captioner/LATEST"),
            _worker(POD, True, LONG_VERSIONS[1], "s3://models/captioner/LATEST"),
        ]
    )
    view.problems = []
    return view


VIEWS = {"scrape": scrape_view, "hostile": hostile_view, "many": many_view, "rollout": rollout_view}
