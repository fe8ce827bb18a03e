"""A private Docker engine for ops/image_test.py: its own data root, exec root and socket (no bridge, no
iptables), so building and running the image never meets another engine or the host's network set-up;
with the helpers the test's steps share (running a command with a time limit, the log line, the failure)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKER = "/usr/bin/docker"  # Debian's client, matching its dockerd (another `docker` may be first on PATH)


class Failed(Exception):
    pass


def log(message: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, **kwargs: object) -> str:
    """Run to completion; output is returned and also shown on failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as error:
        raise Failed(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from error
    if proc.returncode != 0:
        raise Failed(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


class Engine:
    """A private dockerd: its own data root, exec root and socket, so it never meets another engine."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        # Unix socket paths are limited to 108 bytes: keep the exec root short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="cf-dockerd-", dir="/run"))
        self.socket = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "dockerd.log"

    def start(self, timeout: float = 60) -> None:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root", str(self.workdir / "data"),
                    "--exec-root", str(self.run_dir / "exec"),
                    "--pidfile", str(self.run_dir / "dockerd.pid"),
                    "--host", f"unix://{self.socket}",
                    # No bridge and no iptables rules: containers use --network host or none,
                    # and the host's network configuration is left alone.
                    "--iptables=false", "--ip6tables=false", "--bridge=none",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if subprocess.run([DOCKER, "info"], env=self.env, capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise Failed(f"dockerd did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def docker(self, *args: str, timeout: float = 120, **kwargs: object) -> str:
        return run([DOCKER, *args], timeout=timeout, env=self.env, **kwargs)

    def logs(self, container: str, lines: int = 60) -> str:
        proc = subprocess.run(
            [DOCKER, "logs", "--tail", str(lines), container],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30, check=False,
        )  # fmt: skip
        return proc.stdout

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Overlay mounts left by a killed engine would keep the data root from being removed.
        for root in (self.workdir, self.run_dir):
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for mount in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        shutil.rmtree(self.run_dir, ignore_errors=True)
