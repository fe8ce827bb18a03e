"""Issue 16, item 3, against the real S3 server and the real broker: the object store stopped for ~15 s
mid-stream, then the broker frozen for ~15 s (SIGSTOP: this broker keeps its topics in memory, so a restart
would lose them; a hung or partitioned broker looks the same to a client). During each outage the worker is
not ready and says why, its partitions are paused and the outage shows in its metrics; afterwards every
request is answered with its caption: nothing dead-lettered that succeeds seconds later, nothing lost.

Before this change the store outage dead-lettered most requests in flight as ``unavailable`` (4 quick
attempts within about a second) while /readyz stayed 200, and the broker's was invisible to /readyz."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hostile_images import jpeg_bytes
from tests.integration.stream_support import AnswerReader, WorkerProcess, make_topics, new_port, worker_env
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET = "outage-photos"
OUTAGE_S = 15


@pytest.fixture
def own_s3() -> Iterator[SeaweedS3]:
    """A server of its own: this test stops it."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def own_broker() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        try:
            yield broker
        finally:
            broker.thaw()  # a stopped process would hold its SIGTERM until the SIGKILL


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{worker.log_tail()}")
        time.sleep(0.2)


def not_ready_because(worker: WorkerProcess, what: str) -> bool:
    status, body = worker.get("/readyz")
    return status == 503 and what in body


def sample(worker: WorkerProcess, name: str, **labels: str) -> float:
    return worker.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def test_store_and_broker_outages_pause_the_worker_and_dead_letter_nothing(
    own_s3: SeaweedS3, own_broker: KafkaBroker, kafka_names: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    make_topics(own_broker, kafka_names, partitions=2)
    client = own_s3.client()
    client.create_bucket(Bucket=BUCKET)
    for i in range(120):
        client.put_object(Bucket=BUCKET, Key=f"img/{i}.jpg", Body=jpeg_bytes())
    env = worker_env(
        own_broker, kafka_names, own_s3, BUCKET, tiny_checkpoint, tmp_path / "cache", "outages", new_port()
    )
    env.update(
        {
            "WORKER_FETCH__MAX_ATTEMPTS": "2",
            "WORKER_FETCH__CONNECT_TIMEOUT_S": "1",
            "WORKER_FETCH__READ_TIMEOUT_S": "2",
            "WORKER_FETCH__OUTAGE_BUDGET_S": "120",
            "WORKER_FETCH__OUTAGE_RETRY_MAX_S": "2",
            "WORKER_KAFKA__MAX_IN_FLIGHT": "16",
            # Answers acknowledged but not yet committed when the broker freezes: the commit must not hold
            # the consumer thread for the request timeout and then fail the worker.
            "WORKER_KAFKA__COMMIT_INTERVAL_MS": "3000",
        }
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    reader = AnswerReader(own_broker, kafka_names)

    def ask(ids: range) -> None:
        messages = [
            (i % 2, str(i).encode(), json.dumps({"id": str(i), "uri": f"s3://{BUCKET}/img/{i}.jpg"}).encode())
            for i in ids
        ]
        assert own_broker.produce(kafka_names["requests"], messages) == len(messages)

    try:
        worker.wait_ready()
        # The store stops with requests in flight and more arriving.
        ask(range(0, 40))
        reader.wait(lambda a: len(a.ids()) >= 5, 120, worker)
        own_s3.halt()
        ask(range(40, 80))
        wait_until(lambda: not_ready_because(worker, "object_store unreachable"), 60, "not ready (store)", worker)
        assert sample(worker, "captionfleet_dependency_up", dependency="object_store") == 0
        assert sample(worker, "captionfleet_fetch_paused") == 1
        time.sleep(OUTAGE_S)
        assert not_ready_because(worker, "object_store unreachable")
        assert sample(worker, "captionfleet_outage_retries_total", dependency="object_store") > 0
        own_s3.resume()
        reader.wait(lambda a: set(a.ids()) >= {str(i) for i in range(80)}, 180, worker)
        wait_until(lambda: worker.get("/readyz")[0] == 200, 60, "ready after the store outage", worker)

        # The broker stops answering with requests in flight.
        ask(range(80, 120))
        reader.wait(lambda a: len(a.ids()) >= 82, 120, worker)
        own_broker.freeze()
        wait_until(lambda: not_ready_because(worker, "broker unreachable"), 60, "not ready (broker)", worker)
        assert sample(worker, "captionfleet_dependency_up", dependency="broker") == 0
        time.sleep(OUTAGE_S)
        assert worker.proc.poll() is None and worker.get("/healthz")[0] == 200  # alive: only not ready
        own_broker.thaw()
        answers = reader.wait(lambda a: set(a.ids()) >= {str(i) for i in range(120)}, 240, worker)
        wait_until(lambda: worker.get("/readyz")[0] == 200, 120, "ready after the broker outage", worker)

        assert answers.dead == [], f"dead-lettered: {[(m['id'], m['kind'], m['message']) for m in answers.dead]}"
        assert set(answers.ids()) == {str(i) for i in range(120)}
        assert all(m["caption"] for m in answers.results)
        assert worker.terminate() == 0
        committed = own_broker.group_offsets(kafka_names["group"])
        assert sum(committed.values()) == 120, f"committed offsets {committed}"
    finally:
        worker.close()
        reader.close()
