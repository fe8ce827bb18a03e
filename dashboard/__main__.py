"""`captionfleet dashboard` (or `python -m captionfleet.dashboard`): run the Streamlit app with the settings' port."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from captionfleet.core.failures import EXIT_OK, EXIT_USAGE
from captionfleet.core.settings import SettingsError
from captionfleet.dashboard.settings import DashboardSettings, load_dashboard_settings, load_model_settings

APP = Path(__file__).resolve().with_name("app.py")


def streamlit_command(settings: DashboardSettings, max_image_bytes: int) -> list[str]:
    """The `streamlit run` command line; options are given here too, not only in .streamlit/config.toml,
    which Streamlit reads from the current folder only."""
    # One MB over the image limit, so a slightly too large file reaches our clearer message.
    upload_mb = math.ceil(max_image_bytes / 2**20) + 1
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        settings.server.host,
        "--server.port",
        str(settings.server.port),
        "--server.headless",
        "true",
        "--server.maxUploadSize",
        str(upload_mb),
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="captionfleet dashboard",
        description="Serve the dashboard: caption uploads, and watch the fleet (DASHBOARD_* settings; the model "
        "is WORKER_MODEL__REF, 'builtin' when unset).",
    )
    parser.add_argument("--port", type=int, help="port to serve on (DASHBOARD_SERVER__PORT, default 8501)")
    parser.add_argument("--host", help="address to bind (DASHBOARD_SERVER__HOST, default 0.0.0.0)")
    args = parser.parse_args(argv)
    try:
        settings = load_dashboard_settings()
        model_settings = load_model_settings()
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    if args.port is not None:
        settings.server.port = args.port
    if args.host:
        settings.server.host = args.host
    command = streamlit_command(settings, model_settings.images.max_bytes)
    # exec, not a child: SIGTERM from Kubernetes then reaches Streamlit itself.
    os.execv(command[0], command)
    return EXIT_OK  # not reached


if __name__ == "__main__":
    sys.exit(main())
