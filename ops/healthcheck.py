"""The image's HEALTHCHECK: asks whichever part runs as PID 1 whether it is alive.

One image runs several parts, so the check looks at PID 1's command line:
- ``captionfleet worker``: GET /healthz on WORKER_METRICS__PORT (9400 by default); liveness, not
  readiness, because Docker (like a liveness probe) should only flag a worker that is stuck;
- ``captionfleet dashboard``: Streamlit's own /_stcore/health on DASHBOARD_SERVER__PORT (8501 by default).
  That command execs ``python -m streamlit run .../dashboard/app.py --server.port N ...`` (so SIGTERM
  reaches Streamlit), which is what PID 1 then shows: recognised by the app's path, port from the flag;
- anything else (demo, train, caption): no server to ask, the exit code is the verdict: healthy.
Standard library only: it runs every 30 s and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def command_of_pid1() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def url_for(argv: list[str]) -> str | None:
    if "worker" in argv:
        if os.environ.get("WORKER_METRICS__ENABLED", "true").lower() in ("0", "false", "no", "off"):
            return None
        port = os.environ.get("WORKER_METRICS__PORT", "9400")
        if "--metrics-port" in argv[:-1]:
            port = argv[argv.index("--metrics-port") + 1]
        return None if port == "0" else f"http://127.0.0.1:{port}/healthz"
    if "dashboard" in argv or any(arg.endswith("dashboard/app.py") for arg in argv):
        port = os.environ.get("DASHBOARD_SERVER__PORT", "8501")
        if "--server.port" in argv[:-1]:
            port = argv[argv.index("--server.port") + 1]
        return f"http://127.0.0.1:{port}/_stcore/health"
    return None


def main() -> int:
    url = url_for(command_of_pid1())
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
