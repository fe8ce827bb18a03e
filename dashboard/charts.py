"""The fleet page's charts and table, shaped to fit the narrowest place the page gives them.

On a 1024 px laptop with the sidebar open each of the page's two columns is ~270 px wide, and Streamlit's own
``st.line_chart`` lays a legend out in one row however many series there are: four latency series ran ~480 px
wide and were cut off by their chart; its bar chart cut version names to 17 characters ("builtin-shapes-9c…");
``st.dataframe``'s grid hid the workers' last columns off to the side. So the charts are Altair specs with their
legends below the plot, one entry a row, and no label truncated; the workers are a table that wraps.
``tests/e2e/test_dashboard_browser.py`` checks the page at 1920, 1366, 1024 and 768 px in a real browser.
"""

from __future__ import annotations

import re
from typing import Any

import altair as alt
import pandas as pd

# Streamlit fits the whole chart, legend included, into its height: the plot keeps its height and each legend
# row (one per series) adds its own.
PLOT_HEIGHT = 260
LEGEND_ROW = 20


def _legend() -> alt.Legend:
    # One entry per row: a row of entries runs out of a 270 px column with three or four of them. labelLimit 0:
    # no limit, a label is never cut to "…" (the default cuts at 160 px).
    return alt.Legend(orient="bottom", title=None, direction="vertical", columns=1, labelLimit=0)


def line_chart(frame: pd.DataFrame, unit: str) -> alt.Chart:
    """One line per column of ``frame`` (indexed by time), named in a legend below the plot."""
    long = frame.rename_axis("time").reset_index().melt(id_vars="time", var_name="series", value_name="value")
    labels = [str(column) for column in frame.columns]
    # Every series here is >= 0. All zero (no lag at all), the scale's domain would be [0, 0]: one grid line,
    # labelled "0.000000"; [0, 1] keeps an axis to read.
    top = frame.max(numeric_only=True).max()
    scale = alt.Scale(domain=[0, 1]) if not top > 0 else alt.Undefined
    return (
        alt.Chart(long, height=PLOT_HEIGHT + LEGEND_ROW * len(labels))
        .mark_line()
        .encode(
            x=alt.X("time:T", title="time"),
            y=alt.Y("value:Q", title=unit, scale=scale),
            color=alt.Color("series:N", title=None, sort=labels, legend=_legend()),
            tooltip=[alt.Tooltip("time:T"), alt.Tooltip("series:N"), alt.Tooltip("value:Q", title=unit)],
        )
    )


def versions_chart(per_version: pd.Series) -> alt.Chart:
    """Workers per model version, one bar each (a rollout shows as two), the version names whole beside them:
    Streamlit's bar chart cut them to 17 characters, which drops the part that tells versions apart."""
    frame = per_version.rename("workers").rename_axis("model version").reset_index()
    labels = [str(version) for version in frame["model version"]]
    return (
        # 28 px a bar; the chart's height follows (a fixed height is shared with the axis, and squeezed it flat).
        alt.Chart(frame, height=alt.Step(28))
        .mark_bar()
        .encode(
            x=alt.X("workers:Q", title="workers", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("model version:N", title=None, sort=labels, axis=alt.Axis(labelLimit=0)),
            tooltip=["model version:N", "workers:Q"],
        )
    )


# Addresses and yes/no stay on one line; the long values (version names, S3 paths, problems) break anywhere
# rather than push the table wider than the page: paths have no spaces to break at. Their text sits in Streamlit's
# markdown containers, which set overflow-wrap themselves: the rules name what is inside the cells.
_NO_WRAP = ["worker", "up"]


def _cell_styles(columns: list[str]) -> list[dict[str, Any]]:
    styles = []
    for i, column in enumerate(columns):
        props = [("white-space", "nowrap")] if column in _NO_WRAP else [("overflow-wrap", "anywhere")]
        styles.append({"selector": f"td.col{i}, td.col{i} *", "props": props})
    return styles


def plain(text: object) -> str:
    """``text`` as st.table shows it verbatim: its cells are Markdown, which would take ``__init__`` for bold,
    ``<urlopen error ...>`` in a scrape error for HTML and a leading ``#`` for a heading."""
    return re.sub(r"([\\`*_\[\]<>~#|])", r"\\\1", str(text))


def workers_table(workers: pd.DataFrame) -> Any:
    """The workers as a DOM table (``st.table``): it wraps its text to the page's width, where ``st.dataframe``'s
    canvas grid keeps each column as wide as its longest value and hides the last ones off to the side."""
    shown = workers.assign(up=workers["up"].map({True: "yes", False: "no"})).map(plain)
    return shown.style.hide(axis="index").set_table_styles(_cell_styles(list(shown.columns)))
