"""Issue 16, items 1 and 2, against the real broker and S3 server: one S3 event notification with 2,000
records and a hundred requests nested around the interpreter's recursion limit (some do not parse, some may
parse but not encode: the poison) cannot stop the worker; every record and request gets exactly one answer,
and the request after them its caption."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile_images import jpeg_bytes
from tests.integration.stream_support import AnswerReader, WorkerProcess, make_topics, new_port, worker_env
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

RECORDS = 2000


@pytest.fixture(autouse=True)
def deep_enough_to_read_the_answers() -> Iterator[None]:
    # The answers carry the requests' nesting back: this test's reader decodes them deeper in its own stack.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    yield
    sys.setrecursionlimit(limit)


def test_a_huge_event_and_poison_answers_leave_the_worker_serving(
    kafka_broker: KafkaBroker,
    kafka_names: dict[str, str],
    s3_server: SeaweedS3,
    s3_bucket: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    make_topics(kafka_broker, kafka_names, partitions=1)
    s3_server.client().put_object(Bucket=s3_bucket, Key="good.jpg", Body=jpeg_bytes())
    good = f"s3://{s3_bucket}/good.jpg"
    # Another bucket, not on the allow-list: each record is answered (forbidden) without a GET.
    keys = [f"uploads/{i:05d}.jpg" for i in range(RECORDS)]
    created = "ObjectCreated:Put"
    records = [{"eventName": created, "s3": {"bucket": {"name": "elsewhere"}, "object": {"key": k}}} for k in keys]
    messages: list[tuple[int, bytes | None, bytes]] = [(0, b"event", json.dumps({"Records": records}).encode())]
    deep = {f"deep-{depth}": depth for depth in range(900, 1000)}
    for request_id, depth in deep.items():
        value = f'{{"id": "{request_id}", "uri": "{good}", "deep": {"[" * depth}"x"{"]" * depth}}}'
        messages.append((0, request_id.encode(), value.encode()))
    messages.append((0, b"after", json.dumps({"id": "after", "uri": good}).encode()))

    env = worker_env(
        kafka_broker, kafka_names, s3_server, s3_bucket, tiny_checkpoint, tmp_path / "cache", "solo", new_port()
    )
    worker = WorkerProcess({**env, "WORKER_KAFKA__MAX_IN_FLIGHT": "16"}, tmp_path / "worker.log")
    reader = AnswerReader(kafka_broker, kafka_names)
    try:
        assert kafka_broker.produce(kafka_names["requests"], messages) == len(messages)
        expected = {f"s3://elsewhere/{k}" for k in keys} | set(deep) | {"after"}
        answers = reader.wait(lambda a: expected <= set(a.ids()), 300, worker)

        assert worker.proc.poll() is None, "the worker stopped"
        assert {i: n for i, n in answers.ids().items() if n > 1} == {}
        assert set(answers.ids()) == expected
        assert [m["id"] for m in answers.results if m["id"] == "after"] == ["after"]
        assert {m["kind"] for m in answers.dead if m["id"].startswith("s3://")} == {"forbidden"}
        assert worker.terminate() == 0
    finally:
        worker.close()
        reader.close()
