"""Helpers for the streaming worker's integration tests: the mixed 500-request workload, the worker as
a real subprocess (`python -m captionfleet.worker`), and reading its answers back from the broker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from prometheus_client.parser import text_string_to_metric_families

from tests.hostile_images import hostile_corpus, jpeg_bytes
from tests.services.kafka import KafkaBroker, TopicReader, free_port
from tests.services.seaweedfs import SeaweedS3

REPO = Path(__file__).resolve().parents[2]
RESULT = "result"  # expected outcome of a request that must be captioned

GOOD = [
    "plain.jpg",
    "exif_rotated.jpg",
    "cmyk.jpg",
    "gray.jpg",
    "gray16.png",
    "rgba.png",
    "animated.gif",
    "plain.webp",
    "plain.bmp",
    "plain.tiff",
]
CORRUPT = ["half.jpg", "garbage.png", "notes.txt", "drawing.svg", "empty.jpg"]
FORBIDDEN = [
    "s3://{other}/cat.jpg",  # a real bucket, just not on the allow-list
    "file:///etc/passwd",  # file:// is refused when no root is set
    "http://169.254.169.254/latest/meta-data/",  # http(s) is refused without a host allow-list
    "https://example.com/cat.jpg",
]


@dataclass
class Workload:
    messages: list[tuple[int, bytes | None, bytes]]  # (partition, key, value)
    expected: dict[str, str]  # id -> RESULT or the failure kind
    per_partition: Counter[int] = field(default_factory=Counter)

    @property
    def results(self) -> set[str]:
        return {i for i, outcome in self.expected.items() if outcome == RESULT}

    def count(self, outcome: str) -> int:
        return sum(1 for value in self.expected.values() if value == outcome)


def build_workload(s3: SeaweedS3, bucket: str, other_bucket: str, partitions: int = 4) -> Workload:
    """500 request ids in 480 messages: captions, corrupt images, missing keys, forbidden uris,
    malformed messages and S3 event notifications (single and three-record)."""
    client = s3.client()
    corpus = {case.name: case for case in hostile_corpus()}
    for name in GOOD + CORRUPT:
        client.put_object(Bucket=bucket, Key=f"objects/{name}", Body=corpus[name].data)
    for i in range(50):
        client.put_object(Bucket=bucket, Key=f"events/photo {i}.jpg", Body=jpeg_bytes())
    client.create_bucket(Bucket=other_bucket)
    client.put_object(Bucket=other_bucket, Key="cat.jpg", Body=jpeg_bytes())

    expected: dict[str, str] = {}
    values: list[tuple[bytes | None, bytes]] = []

    def ask(request_id: str, uri: str, outcome: str, **metadata: Any) -> None:
        expected[request_id] = outcome
        values.append((None, json.dumps({"id": request_id, "uri": uri, **metadata}).encode()))

    for i in range(300):
        ask(f"good-{i}", f"s3://{bucket}/objects/{GOOD[i % len(GOOD)]}", RESULT, n=i)
    for i in range(40):
        name = CORRUPT[i % len(CORRUPT)]
        kind = corpus[name].expect_kind
        assert kind is not None
        ask(f"corrupt-{i}", f"s3://{bucket}/objects/{name}", kind)
    for i in range(40):
        ask(f"missing-{i}", f"s3://{bucket}/missing/{i}.jpg", "not_found")
    for i in range(40):
        ask(f"forbidden-{i}", FORBIDDEN[i % len(FORBIDDEN)].format(other=other_bucket), "forbidden")
    for i in range(30):
        request_id = f"malformed-{i}"
        expected[request_id] = "malformed"
        if i % 2:
            values.append((None, json.dumps({"id": request_id, "url": "s3://typo/field.jpg"}).encode()))
        else:  # not JSON: the Kafka key is all that identifies it
            values.append((request_id.encode(), b"{this is not json"))

    def record(i: int) -> dict[str, Any]:
        key = f"events/photo {i}.jpg"
        expected[f"s3://{bucket}/{key}"] = RESULT
        # As stores publish them: the key URL-encoded, spaces as '+'.
        return {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "eventTime": "2026-11-26T00:00:00.000Z",
            "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key, safe="/"), "size": 1}},
        }

    for i in range(20):
        values.append((None, json.dumps({"Records": [record(i)]}).encode()))
    for i in range(20, 50, 3):
        values.append((None, json.dumps({"Records": [record(i), record(i + 1), record(i + 2)]}).encode()))

    random.Random(20261126).shuffle(values)
    workload = Workload([], expected)
    for index, (key, value) in enumerate(values):
        partition = index % partitions
        workload.messages.append((partition, key, value))
        workload.per_partition[partition] += 1
    assert len(expected) == 500 and len(workload.messages) == 480
    return workload


def worker_env(
    broker: KafkaBroker,
    names: dict[str, str],
    s3: SeaweedS3,
    bucket: str,
    checkpoint: Path,
    cache_dir: Path,
    client_id: str,
    metrics_port: int,
    **extra: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(
        {
            "WORKER_KAFKA__BOOTSTRAP": broker.bootstrap,
            "WORKER_KAFKA__REQUEST_TOPIC": names["requests"],
            "WORKER_KAFKA__RESULT_TOPIC": names["results"],
            "WORKER_KAFKA__DEAD_LETTER_TOPIC": names["dead"],
            "WORKER_KAFKA__GROUP_ID": names["group"],
            "WORKER_KAFKA__CLIENT_ID": client_id,
            # Fast joins on the test broker (docs/testing.md): ~3 s instead of ~23 s.
            "WORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "WORKER_MODEL__REF": str(checkpoint),
            "WORKER_MODEL__DEVICE": "cpu",
            "WORKER_MODEL__CACHE_DIR": str(cache_dir),
            "WORKER_DECODING__NUM_BEAMS": "1",
            "WORKER_DECODING__MAX_NEW_TOKENS": "8",
            "WORKER_S3__ENDPOINT_URL": s3.endpoint_url,
            "WORKER_S3__ACCESS_KEY_ID": s3.access_key,
            "WORKER_S3__SECRET_ACCESS_KEY": s3.secret_key,
            "WORKER_FETCH__ALLOWED_BUCKETS": bucket,
            "WORKER_METRICS__HOST": "127.0.0.1",
            "WORKER_METRICS__PORT": str(metrics_port),
            "WORKER_SHUTDOWN__GRACE_S": "20",
            "WORKER_LOG_FORMAT": "json",
            "WORKER_LOG_LEVEL": "INFO",
            # Two shared cores: one torch thread per worker keeps parallel workers from thrashing.
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            **extra,
        }
    )
    return env


class WorkerProcess:
    """`python -m captionfleet.worker` with its log in a file; stopped (SIGKILL) at cleanup if still running."""

    def __init__(self, env: dict[str, str], log_path: Path, command: list[str] | None = None) -> None:
        self.log_path = log_path
        self.port = int(env["WORKER_METRICS__PORT"])
        self._log = log_path.open("ab")
        args = command or ["-m", "captionfleet.worker"]
        self.proc = subprocess.Popen(
            [sys.executable, *args], env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout_s}s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def terminate(self, timeout_s: float = 40) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def make_topics(broker: KafkaBroker, names: dict[str, str], partitions: int = 4) -> None:
    broker.create_topic(names["requests"], partitions)
    broker.create_topic(names["results"], 2)
    broker.create_topic(names["dead"], 2)


@dataclass
class Answers:
    results: list[dict[str, Any]]
    dead: list[dict[str, Any]]

    def ids(self) -> Counter[str]:
        return Counter([m["id"] for m in self.results] + [m["id"] for m in self.dead])

    def by_worker(self, worker: str) -> list[str]:
        return [m["id"] for m in self.results + self.dead if m.get("worker") == worker]


class AnswerReader:
    def __init__(self, broker: KafkaBroker, names: dict[str, str]) -> None:
        self.names = names
        self.reader = TopicReader(broker, [names["results"], names["dead"]])

    def answers(self) -> Answers:
        return Answers(self.reader.messages[self.names["results"]], self.reader.messages[self.names["dead"]])

    def wait(self, enough: Any, timeout_s: float, worker: WorkerProcess | None = None) -> Answers:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.reader.read(0.3)
            if enough(self.answers()):
                return self.answers()
            if worker is not None and worker.proc.poll() is not None:
                raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        answers = self.answers()
        raise AssertionError(
            f"timed out after {timeout_s}s with {len(answers.ids())} ids answered"
            + (f":\n{worker.log_tail()}" if worker else "")
        )

    def close(self) -> None:
        self.reader.close()


def new_port() -> int:
    return free_port()


SEND_EVERY_S = 0.1  # steady traffic: ten requests a second


class Traffic:
    """Sends one request every SEND_EVERY_S until stopped, cycling over the pictures; remembers the ids in order."""

    def __init__(self, broker: KafkaBroker, topic: str, uris: list[str]) -> None:
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._producer = broker.producer(linger_ms=0)
        self._topic, self._uris = topic, uris
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(SEND_EVERY_S):
            request_id = f"r-{i:05d}"
            value = {"id": request_id, "uri": self._uris[i % len(self._uris)]}
            self._producer.send(self._topic, value=json.dumps(value).encode(), partition=0).get(timeout=30)
            self.sent.append(request_id)
            i += 1

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=60)
        self._producer.close(timeout=10)
        return list(self.sent)
