"""The fleet view's panels alone (dashboard/app.py ``fleet_panels``) for a fleet made up in
tests/e2e/fleet_shapes.py: a Streamlit script that tests/e2e/test_dashboard_browser.py serves and reads in a real
browser; ``?shape=`` picks the fleet. The page around the panels is the dashboard's: wide layout, a title, the
sidebar open (at 1024 px it leaves the panels' two columns ~270 px each), the panels in a tab.
"""

from __future__ import annotations

import streamlit as st

from captionfleet.dashboard.app import fleet_panels
from tests.e2e.fleet_shapes import VIEWS

st.set_page_config(page_title="captionfleet", layout="wide")
st.title("captionfleet")
st.sidebar.header("Decoding")
st.sidebar.slider("Beams", 1, 8, 4)
(fleet,) = st.tabs(["Fleet"])
with fleet:
    fleet_panels(VIEWS[st.query_params.get("shape", "scrape")](), 900)
