"""The fleet page's charts and table, shaped to fit the narrowest place the page gives them.

On a 1024 px laptop with the sidebar open each of the page's two columns is ~270 px wide, and Streamlit's own
``st.line_chart`` lays a legend out in one row however many series there are: four latency series ran ~480 px
wide and were cut off by their chart; its bar chart cut version names to 17 characters ("builtin-shapes-9c…");
``st.dataframe``'s grid hid the workers' last columns off to the side. So the charts are Altair specs with their
legends below the plot, one entry a row, a scraped worker's /metrics URL as its host:port, and a label cut only past
what the narrowest column has room for; at most ten lines (the busiest workers and the others as one), a lone
sample drawn as a point; the workers are an HTML table that wraps and shows its text verbatim.
``tests/e2e/test_dashboard_browser.py`` checks the page at 1920, 1366, 1024 and 768 px in a real browser.
"""

from __future__ import annotations

from typing import Literal

import altair as alt
import pandas as pd

# Streamlit fits the whole chart, legend included, into its height: the plot keeps its height and each legend
# row (one per series) adds its own.
PLOT_HEIGHT = 260
LEGEND_ROW = 20


# A worker the dashboard scrapes itself (the dev overlay's DASHBOARD_SCRAPE__URLS) is named by its /metrics URL
# (fleet.py expand_url), ~65 characters that ran ~400 px past a 270 px column: its legend label is the URL's
# host:port, as Prometheus names its targets; the line's tooltip and the workers table give the whole URL.
SCRAPE_URL_LABEL = r"replace(datum.label, /^https?:\/\/([^\/]+)\/metrics$/, '$1')"
# Whatever is still longer (a Service's DNS name, a URL of another shape) is cut ("…") at LEGEND_LABEL_LIMIT px,
# which fits the narrowest column: ~270 px (1024 px, sidebar open), less the y axis the legend starts after (~95 px
# with labels up to "1,000,000") and the entry's symbol and gaps (32 px). A limit following the plot's width (an
# expression of `width`) fed back into the chart's fit to its column: the legend's box sometimes outgrew the chart.
LEGEND_LABEL_LIMIT = 140


def _legend() -> alt.Legend:
    # One entry per row: a row of entries runs out of a 270 px column with three or four of them.
    return alt.Legend(
        orient="bottom",
        title=None,
        direction="vertical",
        columns=1,
        labelExpr=SCRAPE_URL_LABEL,
        labelLimit=LEGEND_LABEL_LIMIT,
    )


# Lines a chart tells apart: its palette's colours (Vega's tableau10). Past that, lines share colours, and past 30
# Vega's legend ends in "…N entries" and names none of them. A fleet of more workers is charted as its busiest
# MAX_SERIES - 1 (by their mean over the window) and one line for all the others.
MAX_SERIES = 10


def _fewer_series(frame: pd.DataFrame, others: Literal["sum", "mean"]) -> pd.DataFrame:
    """``frame`` with at most MAX_SERIES columns: the ones with the highest mean, then the rest as one, their
    sum or mean at each time (throughput and lag add up over workers; a batch size is a mean)."""
    if len(frame.columns) <= MAX_SERIES:
        return frame
    kept = list(frame.mean().sort_values(ascending=False, kind="stable").index[: MAX_SERIES - 1])
    rest = frame.drop(columns=kept)
    combined = rest.sum(axis=1, min_count=1) if others == "sum" else rest.mean(axis=1)
    return frame[kept].assign(**{f"{len(rest.columns)} others ({others})": combined})


def line_chart(frame: pd.DataFrame, unit: str, others: Literal["sum", "mean"] = "sum") -> alt.LayerChart:
    """One line per column of ``frame`` (indexed by time), named in a legend below the plot; past MAX_SERIES
    columns, the rest as one line (``others``: how they combine). A sample with no sample beside it in its
    series (a worker's first, or one between gaps) is a point too: a line through one point draws nothing."""
    frame = _fewer_series(frame, others)
    present = frame.notna()
    alone = present & ~present.shift(1, fill_value=False) & ~present.shift(-1, fill_value=False)
    long = frame.rename_axis("time").reset_index().melt(id_vars="time", var_name="series", value_name="value")
    long["alone"] = alone.to_numpy().flatten(order="F")  # melt's order: column by column
    labels = [str(column) for column in frame.columns]
    # Every series here is >= 0. All zero (no lag at all), the scale's domain would be [0, 0]: one grid line,
    # labelled "0.000000"; [0, 1] keeps an axis to read.
    top = frame.max(numeric_only=True).max()
    scale = alt.Scale(domain=[0, 1]) if not top > 0 else alt.Undefined
    base = alt.Chart(long).encode(
        x=alt.X("time:T", title="time"),
        y=alt.Y("value:Q", title=unit, scale=scale),
        tooltip=[alt.Tooltip("time:T"), alt.Tooltip("series:N"), alt.Tooltip("value:Q", title=unit)],
    )
    lines = base.mark_line().encode(color=alt.Color("series:N", title=None, sort=labels, legend=_legend()))
    # The points' colours are the lines' (one scale); a legend of their own would draw each entry's symbol as a
    # circle over the line's, and a third taller (the rows then took the plot's height).
    points = (
        base.mark_point(filled=True, size=40, opacity=1)
        .encode(color=alt.Color("series:N", sort=labels, legend=None))
        .transform_filter(alt.datum.alone)
    )
    return alt.LayerChart(layer=[lines, points], height=PLOT_HEIGHT + LEGEND_ROW * len(labels))


# The most characters of a version name the versions chart draws: half of a 1024 px page (~270 px, the sidebar
# open) leaves room for ~24 of them beside the bars.
VERSION_LABEL_CHARS = 24


def version_labels(versions: list[str], limit: int = VERSION_LABEL_CHARS) -> list[str]:
    """Each version's label, at most ``limit`` characters: its name, or "…" and its end where longer (a
    trainer's versions end in their run's hash: the end tells them apart, the start is their common prefix).
    Names alike at their ends keep their starts too ("start…end"); any still alike are numbered, so no two
    versions share a bar (the chart's tooltip has each whole name)."""
    limit = max(limit, 8)

    def end(name: str) -> str:
        return name if len(name) <= limit else "…" + name[-(limit - 1) :]

    def both_ends(name: str) -> str:
        return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2) :]

    labels = [end(name) for name in versions]
    labels = [
        both_ends(name) if labels.count(label) > 1 else label for name, label in zip(versions, labels, strict=True)
    ]
    seen: dict[str, int] = {}
    numbered = []
    for label in labels:
        if labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            suffix = f" #{seen[label]}"
            label = label[: limit - len(suffix)] + suffix
        numbered.append(label)
    return numbered


def versions_chart(per_version: pd.Series) -> alt.Chart:
    """Workers per model version, one bar each (a rollout shows as two), labelled by ``version_labels``:
    Streamlit's bar chart cut names to their first 17 characters, which dropped the part that tells versions
    apart, and whole long names squeezed the bars to nothing in a half-page column. The tooltip has the name."""
    frame = per_version.rename("workers").rename_axis("model version").reset_index()
    frame["version"] = version_labels([str(version) for version in frame["model version"]])
    return (
        # 28 px a bar; the chart's height follows (a fixed height is shared with the axis, and squeezed it flat).
        alt.Chart(frame, height=alt.Step(28))
        .mark_bar()
        .encode(
            x=alt.X("workers:Q", title="workers", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("version:N", title=None, sort=list(frame["version"]), axis=alt.Axis(labelLimit=0)),
            tooltip=["model version:N", "workers:Q"],
        )
    )


# Addresses and yes/no stay on one line; the long values (version names, S3 paths, problems) break anywhere
# rather than push the table wider than the page: paths have no spaces to break at. So does a worker named by a
# URL: scraping the workers itself (the dev overlay's DASHBOARD_SCRAPE__URLS), the dashboard names each by its
# /metrics URL (fleet.py expand_url), ~65 characters that pushed the table 45 px past a 1024 px page. Every cell
# keeps its text's spaces and newlines (pre): a value is shown as it is.
_NO_WRAP = ["worker", "up"]
_ONE_LINE = "white-space:pre"
_WRAPS = "white-space:pre-wrap;overflow-wrap:anywhere"


def plain(text: object) -> str:
    """``text`` as HTML that shows it verbatim: every character but an ASCII letter or digit as a numeric
    character reference (``<`` as ``&#60;``, a space as ``&#32;``).

    Why all of them: the table is HTML inside Streamlit's Markdown (``workers_table``), whose source is read
    before it is parsed (``:material/`` rewritten, ``$`` looked for to load KaTeX), and whose parsed text is
    rewritten (URLs, ``www.`` names and e-mail addresses made links, ``:rocket:`` an emoji, ``->`` an arrow).
    Only letters and digits, the markup reads as markup and nothing else; the browser decodes the references
    into the text itself, which none of that touches."""
    return "".join(c if c.isascii() and c.isalnum() else f"&#{ord(c)};" for c in str(text))


def _cell_style(column: str, value: object) -> str:
    return _ONE_LINE if column in _NO_WRAP and "/" not in str(value) else _WRAPS


def workers_table(workers: pd.DataFrame) -> str:
    """The workers as an HTML table, for ``st.markdown(..., unsafe_allow_html=True)``: a DOM table wraps its
    text to the page's width, where ``st.dataframe``'s canvas grid keeps each column as wide as its longest value
    and hides the last ones off to the side; and its text is shown verbatim (``plain``), where ``st.table``'s
    cells are Markdown: a scrape error's URL became a link and ``my_host`` lost its ``_`` to an escape, ``$x$``
    a formula, ``- a`` a list, ``:red[x]`` coloured text, ``a -> b`` an arrow, whatever the escaping.
    Streamlit styles a table in Markdown as it styles ``st.table``."""
    shown = workers.assign(up=workers["up"].map({True: "yes", False: "no"}))
    columns = [str(column) for column in shown.columns]
    head = "".join(f"<th>{plain(column)}</th>" for column in columns)
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td style="{_cell_style(column, value)}">{plain(value)}</td>'
            for column, value in zip(columns, row, strict=True)
        )
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    # The page's width, as st.table's. One line, no blank one: Markdown ends an HTML block at a blank line.
    table = '<table class="captionfleet-workers" style="width:100%">'
    return f"{table}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


# An amber box and bar, the text in the theme's own colour (readable on the light and the dark theme alike);
# the text's spaces and newlines kept (pre-wrap: a problem may quote a multi-line exception), long words broken.
_WARNING_STYLE = (
    "background-color:rgba(255,189,69,0.15);border-left:0.25rem solid rgb(255,189,69);color:inherit;"
    "border-radius:0.5rem;padding:1rem;margin-bottom:1rem;white-space:pre-wrap;overflow-wrap:anywhere"
)


def warning_html(text: str) -> str:
    """A warning box whose text is ``text`` verbatim, for ``st.markdown(..., unsafe_allow_html=True)``. Why not
    ``st.warning``: its body is Markdown, and a problem quoting a URL or an exception, or a notice naming
    workers by their URLs, came out as links, an e-mail link, a formula, emphasis, whatever the escaping (even
    character references: the links are made after they are decoded); inside an HTML block nothing is."""
    return f'<div class="captionfleet-warning" role="status" style="{_WARNING_STYLE}">{plain(text)}</div>'
