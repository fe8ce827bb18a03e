"""The fleet page's chart specs and workers table (dashboard/charts.py): what keeps them inside the page's
narrowest columns. How they look in a browser at common widths: tests/e2e/test_dashboard_browser.py."""

from __future__ import annotations

import pandas as pd

from captionfleet.dashboard.charts import line_chart, plain, versions_chart, workers_table


def _frame(**series: list[float]) -> pd.DataFrame:
    index = pd.DatetimeIndex(pd.to_datetime([0, 1, 2], unit="s"), name="time")
    return pd.DataFrame(series, index=index)


def test_line_legends_list_one_whole_label_a_row_below_the_plot() -> None:
    frame = _frame(**{"end-to-end p50": [0.1, 0.2, 0.1], "model call p95": [0.3, 0.2, 0.4]})
    spec = line_chart(frame, "seconds").to_dict()
    legend = spec["encoding"]["color"]["legend"]
    assert legend["orient"] == "bottom" and legend["columns"] == 1 and legend["labelLimit"] == 0
    assert spec["encoding"]["color"]["sort"] == ["end-to-end p50", "model call p95"]
    # Each series' legend row adds to the chart's height, so the plot keeps its own.
    assert spec["height"] > line_chart(frame[["end-to-end p50"]], "seconds").to_dict()["height"]


def test_an_all_zero_chart_keeps_a_readable_axis() -> None:
    assert line_chart(_frame(a=[0.0, 0.0, 0.0]), "messages").to_dict()["encoding"]["y"]["scale"]["domain"] == [0, 1]
    assert "scale" not in line_chart(_frame(a=[0.0, 3.0, 1.0]), "messages").to_dict()["encoding"]["y"]


def test_version_names_are_never_cut() -> None:
    spec = versions_chart(pd.Series({"builtin-shapes-9ceb04b92fba": 3, "v2": 1})).to_dict()
    assert spec["encoding"]["y"]["axis"]["labelLimit"] == 0
    assert spec["height"] == {"step": 28}  # grows with the versions, never squeezed by a fixed height


def test_workers_table_wraps_long_values_and_shows_text_verbatim() -> None:
    workers = pd.DataFrame(
        [
            {"worker": "10.0.0.7:9400", "up": True, "model version": "v_1", "model source": "s3://b/m/", "problem": ""},
            {"worker": "10.0.0.8:9400", "up": False, "model version": "", "model source": "", "problem": "<urlopen>"},
        ]
    )
    styler = workers_table(workers)
    shown = styler.data
    assert shown["up"].tolist() == ["yes", "no"]
    assert shown["model version"].tolist() == ["v\\_1", ""] and shown["problem"].tolist() == ["", "\\<urlopen\\>"]
    css = {style["selector"]: dict(style["props"]) for style in styler.table_styles}
    assert css["td.col0, td.col0 *"] == {"white-space": "nowrap"}  # addresses stay on one line
    assert css["td.col3, td.col3 *"] == {"overflow-wrap": "anywhere"}  # paths break anywhere


def test_plain_escapes_what_markdown_would_take() -> None:
    assert plain("__init__ # [x] `y` a*b ~z~ | \\") == "\\_\\_init\\_\\_ \\# \\[x\\] \\`y\\` a\\*b \\~z\\~ \\| \\\\"
    assert plain("s3://bucket/models/LATEST") == "s3://bucket/models/LATEST"
