"""The fleet page's chart specs and workers table (dashboard/charts.py): what keeps them inside the page's
narrowest columns. How they look in a browser at common widths: tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import html
import math
import re
from typing import Any, Literal
from xml.etree import ElementTree

import pandas as pd

from captionfleet.dashboard.charts import (
    SCRAPE_URL_LABEL,
    VERSION_LABEL_CHARS,
    line_chart,
    plain,
    version_labels,
    versions_chart,
    warning_html,
    workers_table,
)
from tests.e2e.fleet_shapes import HOSTILE


def _frame(**series: list[float]) -> pd.DataFrame:
    times = len(next(iter(series.values())))
    index = pd.DatetimeIndex(pd.to_datetime(list(range(times)), unit="s"), name="time")
    return pd.DataFrame(series, index=index)


def _lines(frame: pd.DataFrame, unit: str = "images/s", others: Literal["sum", "mean"] = "sum") -> dict[str, Any]:
    """The line chart's spec: its layers (the lines, then the lone samples' points) and its data's rows."""
    spec = line_chart(frame, unit, others).to_dict()
    (rows,) = spec.pop("datasets").values()
    return {**spec, "rows": rows}


def test_line_legends_list_one_label_a_row_below_the_plot() -> None:
    frame = _frame(**{"end-to-end p50": [0.1, 0.2, 0.1], "model call p95": [0.3, 0.2, 0.4]})
    spec = _lines(frame, "seconds")
    legend = spec["layer"][0]["encoding"]["color"]["legend"]
    assert legend["orient"] == "bottom" and legend["columns"] == 1
    # Cut only past what the narrowest column has room for (~270 px less the y axis and the entry's symbol).
    assert 100 <= legend["labelLimit"] <= 140
    assert spec["layer"][0]["encoding"]["color"]["sort"] == ["end-to-end p50", "model call p95"]
    assert spec["layer"][1]["encoding"]["color"]["legend"] is None  # the points' colours, the same legend
    # Each series' legend row adds to the chart's height, so the plot keeps its own.
    assert spec["height"] > line_chart(frame[["end-to-end p50"]], "seconds").to_dict()["height"]


def test_a_scraped_workers_url_is_its_host_and_port_in_the_legend() -> None:
    """Scraping the workers itself, the dashboard names each by its /metrics URL (fleet.py expand_url): the
    legend shows its host:port (the tooltip, the series' whole name). The label expression's JavaScript regular
    expression reads the same in Python."""
    (lines, _) = _lines(_frame(**{"http://10.0.0.7:9400/metrics": [1.0, 2.0, 3.0]}))["layer"]
    expr = lines["encoding"]["color"]["legend"]["labelExpr"]
    assert expr == SCRAPE_URL_LABEL
    assert {"field": "series", "type": "nominal"}.items() <= lines["encoding"]["tooltip"][1].items()
    match = re.fullmatch(r"replace\(datum\.label, /(.+)/, '\$1'\)", expr)
    assert match, expr
    pattern = re.compile(match.group(1).replace("\\/", "/"))
    label = {
        "http://10.0.0.7:9400/metrics": "10.0.0.7:9400",
        "http://[fd00::7]:9400/metrics": "[fd00::7]:9400",
        "http://worker-pods.captionfleet-dev.svc:9400/metrics": "worker-pods.captionfleet-dev.svc:9400",
        "https://w.example/metrics": "w.example",
        "http://w.example:9400/other": "http://w.example:9400/other",  # another shape: whole (and cut if long)
        "10.0.0.7:9400": "10.0.0.7:9400",  # Prometheus' instance label
        "end-to-end p50": "end-to-end p50",
    }
    assert {name: pattern.sub(r"\1", name) for name in label} == label


def test_an_all_zero_chart_keeps_a_readable_axis() -> None:
    assert _lines(_frame(a=[0.0, 0.0, 0.0]))["layer"][0]["encoding"]["y"]["scale"]["domain"] == [0, 1]
    assert "scale" not in _lines(_frame(a=[0.0, 3.0, 1.0]))["layer"][0]["encoding"]["y"]


def test_a_sample_with_no_neighbour_is_drawn_as_a_point() -> None:
    """A line through one point draws nothing: a worker's first sample, or one between gaps, would not show."""
    nan = math.nan
    spec = _lines(_frame(new=[nan, nan, nan, 4.0], gaps=[1.0, nan, 2.0, nan], steady=[1.0, 2.0, 3.0, 2.0]))
    (lines, points) = spec["layer"]
    assert lines["mark"]["type"] == "line" and points["mark"]["type"] == "point" and points["mark"]["filled"]
    assert points["transform"] == [{"filter": "datum.alone"}]
    alone = {(row["series"], row["value"]) for row in spec["rows"] if row["alone"]}
    assert alone == {("new", 4.0), ("gaps", 1.0), ("gaps", 2.0)}


def test_past_ten_series_the_busiest_are_charted_and_the_rest_as_one() -> None:
    """Ten colours tell ten lines apart, and Vega's legend lists 29 entries then "…N entries": 40 workers are
    their 9 busiest (by mean over the window) and one line for the other 31, summed, or averaged (batch sizes)."""
    workers = {f"w{i:02d}": [float(i), float(i) + 1.0] for i in range(40)}
    spec = _lines(_frame(**workers))
    busiest = [f"w{i:02d}" for i in range(39, 30, -1)]
    assert spec["layer"][0]["encoding"]["color"]["sort"] == [*busiest, "31 others (sum)"]
    others = [row["value"] for row in spec["rows"] if row["series"] == "31 others (sum)"]
    assert others == [sum(range(31)), sum(range(31)) + 31.0]
    averaged = _lines(_frame(**workers), others="mean")
    assert [row["value"] for row in averaged["rows"] if row["series"] == "31 others (mean)"] == [15.0, 16.0]
    assert spec["height"] == _lines(_frame(**dict(list(workers.items())[:10])))["height"]  # ten rows of legend


def test_version_labels_keep_the_end_that_tells_versions_apart() -> None:
    spec = versions_chart(pd.Series({"builtin-shapes-9ceb04b92fba": 3, "v2": 1})).to_dict()
    assert spec["encoding"]["y"]["field"] == "version"  # the bars are labelled by version_labels...
    assert spec["encoding"]["y"]["axis"]["labelLimit"] == 0  # ...drawn whole
    assert spec["height"] == {"step": 28}  # grows with the versions, never squeezed by a fixed height
    assert spec["encoding"]["tooltip"][0]["field"] == "model version"  # the whole name
    (rows,) = spec["datasets"].values()
    assert [row["version"] for row in rows] == ["…tin-shapes-9ceb04b92fba", "v2"]
    nightly = "captioner-finetune-shapes-nightly-2026-12-05-"
    versions = ["v2", "builtin-9ceb04b92fba", nightly + "9ceb04b92fba", nightly + "020ccef62f22"]
    labels = version_labels(versions)
    assert labels[:2] == versions[:2]  # short names as they are
    assert labels[2:] == ["…2026-12-05-9ceb04b92fba", "…2026-12-05-020ccef62f22"]  # the ends, 24 characters
    # Names alike at their ends keep their starts too; names alike at both ends are numbered. Never one bar for
    # two versions, never a label longer than the limit (long ones squeezed the bars to nothing).
    twins = ["team-a-" + nightly + "9ceb04b92fba", "team-b-" + nightly + "9ceb04b92fba", nightly + "020ccef62f22"]
    assert version_labels(twins) == ["team-a-capt…9ceb04b92fba", "team-b-capt…9ceb04b92fba", labels[3]]
    same_ends = ["x" * 200 + "1", "x" * 100 + "y" + "x" * 99 + "1"]
    for case in (versions, twins, same_ends):
        made = version_labels(case)
        assert len(set(made)) == len(case) and max(len(label) for label in made) <= VERSION_LABEL_CHARS, made


def test_a_warning_box_shows_its_text_verbatim_in_the_theme_s_colour() -> None:
    for value in HOSTILE:
        box = warning_html(value)
        root = ElementTree.fromstring(box)  # well-formed: nothing in the text ends the box or adds to it
        assert "".join(root.itertext()) == value and list(root) == [] and set(root.attrib) == {"class", "role", "style"}
    style = warning_html("x")
    assert "white-space:pre-wrap" in style and "color:inherit" in style  # newlines kept; dark theme readable


def _cells(table: str) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """An HTML table's headers, and each row's cells as (text, style): the text as a browser shows it."""
    root = ElementTree.fromstring(table)  # well-formed: numeric references, every tag closed
    headers = ["".join(th.itertext()) for th in root.iter("th")]
    body = root.find("tbody")
    assert body is not None
    return headers, [[("".join(td.itertext()), td.get("style", "")) for td in tr.iter("td")] for tr in body]


def test_workers_table_wraps_long_values_and_shows_text_verbatim() -> None:
    workers = pd.DataFrame(
        [
            {"worker": "10.0.0.7:9400", "up": True, "model version": "v_1", "model source": "s3://b/m/", "problem": ""},
            {"worker": "10.0.0.8:9400", "up": False, "model version": "", "model source": "", "problem": "<urlopen>"},
        ]
    )
    headers, rows = _cells(workers_table(workers))
    assert headers == ["worker", "up", "model version", "model source", "problem"]
    assert [[text for text, _ in row] for row in rows] == [
        ["10.0.0.7:9400", "yes", "v_1", "s3://b/m/", ""],
        ["10.0.0.8:9400", "no", "", "", "<urlopen>"],
    ]
    (address, up, _, source, _) = [style for _, style in rows[0]]
    assert "white-space:pre;" in address + ";" and "white-space:pre;" in up + ";"  # addresses stay on one line
    assert "overflow-wrap:anywhere" in source and "white-space:pre-wrap" in source  # paths break anywhere
    assert "\n\n" not in workers_table(workers)  # Markdown ends an HTML block at a blank line
    # A worker named by its /metrics URL (scrape mode) breaks anywhere too: no space in ~65 characters.
    scraped = workers.assign(worker=["http://captionfleet-worker-pods.captionfleet-dev.svc:9400/metrics", "w"])
    _, rows = _cells(workers_table(scraped))
    assert "overflow-wrap:anywhere" in rows[0][0][1] and "white-space:pre;" in rows[1][0][1] + ";"


def test_plain_leaves_markdown_nothing_but_letters_and_digits() -> None:
    """Streamlit's Markdown rewrites the source (``:material/``) and the parsed text (links, emoji, arrows)
    whatever is escaped for Markdown: only letters, digits and numeric references, which the browser decodes."""
    assert plain("a<b> c") == "a&#60;b&#62;&#32;c"
    assert plain("s3://bucket/models/LATEST") == "s3&#58;&#47;&#47;bucket&#47;models&#47;LATEST"
    for value in [*HOSTILE, "", 7, "\u00e9\u65e5\U0001f600"]:
        escaped = plain(value)
        assert re.fullmatch(r"(?:[A-Za-z0-9]|&#[0-9]+;)*", escaped), escaped
        assert html.unescape(escaped) == str(value)
