"""A real Prometheus server for tests: Debian's ``prometheus`` binary (``make system-deps`` installs it).

``with PrometheusServer(["127.0.0.1:9400"], tmp_path) as prom: prom.query("up")``. It listens on a
free loopback port, keeps its TSDB under the given folder, and scrapes the targets every second, so
``rate(x[5s])`` is meaningful a few seconds after a target starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.services.kafka import free_port
from tests.services.process import terminate

BINARY = "prometheus"


def prometheus_binary() -> str:
    path = shutil.which(BINARY)
    if path is None:
        raise RuntimeError("the prometheus binary is missing: run `make system-deps` (apt-get install prometheus)")
    return path


class PrometheusServer:
    def __init__(self, targets: list[str], workdir: Path, scrape_interval_s: int = 1, start_timeout_s: float = 60):
        self.targets = targets
        self.workdir = workdir
        self.scrape_interval_s = scrape_interval_s
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        interval = f"{self.scrape_interval_s}s"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "scrape_configs": [
                        {
                            "job_name": "captionfleet-worker",
                            "scrape_timeout": interval,
                            "static_configs": [{"targets": self.targets}],
                        }
                    ],
                }
            )
        )
        self.port = free_port()
        self._log = (self.workdir / "prometheus.log").open("ab")
        self._proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc, grace_s=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
