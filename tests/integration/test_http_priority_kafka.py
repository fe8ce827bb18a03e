"""Priority in one worker: an API request overtakes the Kafka backlog queued in the same model thread.

The stream worker runs in-process against the real broker with the caption API on a free port; its model's
batches wait at a gate the test opens one batch at a time, so what each batch held is decided by the
lanes, never by timing. The HTTP image must be answered within two batches (the one running when it came,
and the next) while the backlog of 40 waits; then the backlog is answered in full, each request once."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import httpx
import pytest

from captionfleet.core.failures import EXIT_OK
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.connectors.kafka import KafkaOutput, KafkaSource, make_producer
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.http.server import start_api
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.loop import StreamReport, StreamWorker
from tests.hostile_images import jpeg_bytes
from tests.integration.http_support import GatedModel, eventually, tiny_model
from tests.services.kafka import KafkaBroker, TopicReader

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

BACKLOG = 40


def _settings(kafka_broker: KafkaBroker, kafka_names: dict[str, str], tmp_path: Path) -> WorkerSettings:
    for topic in ("requests", "results", "dead"):
        kafka_broker.create_topic(kafka_names[topic], 1)
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes())
    return WorkerSettings.model_validate(
        {
            "kafka": {
                "bootstrap": kafka_broker.bootstrap,
                "request_topic": kafka_names["requests"],
                "result_topic": kafka_names["results"],
                "dead_letter_topic": kafka_names["dead"],
                "group_id": kafka_names["group"],
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "batch": {"max_items": 4, "max_wait_ms": 50},
            "fetch": {"file_root": str(tmp_path)},
            "http": {"enabled": True, "port": 0, "max_wait_ms": 5, "stream_share": 0.25},
        }
    )


def test_an_api_request_overtakes_the_queued_kafka_backlog(
    kafka_broker: KafkaBroker, kafka_names: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = _settings(kafka_broker, kafka_names, tmp_path)
    ids = [f"backlog-{i}" for i in range(BACKLOG)]
    gated = GatedModel(tiny_model(tiny_checkpoint))
    metrics = WorkerMetrics()
    source = KafkaSource(settings.kafka, "priority-worker")
    output = KafkaOutput(make_producer(settings.kafka, "priority-worker"), timeout_s=30)
    fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
    worker = StreamWorker(settings, gated, source, output, fetcher, metrics=metrics, name="priority-worker")
    api = start_api(settings, worker.offer, lambda: worker.model_version, fetcher, metrics, "priority-worker")
    reports: list[StreamReport] = []
    thread = threading.Thread(target=lambda: reports.append(worker.run()), daemon=True)
    thread.start()
    reader = TopicReader(kafka_broker, [kafka_names["results"], kafka_names["dead"]])
    answers: list[httpx.Response] = []
    try:
        kafka_broker.produce(
            kafka_names["requests"],
            [(0, None, json.dumps({"id": i, "uri": f"file://{tmp_path}/cat.jpg"}).encode()) for i in ids],
        )
        gated.wait_entered(1, timeout_s=60)  # the first batch holds the model; the backlog queues behind it
        eventually(lambda: metrics.sample("captionfleet_in_flight_requests") == BACKLOG, "the whole backlog taken")
        body = {"id": "interactive", "data": base64.b64encode(jpeg_bytes()).decode()}
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"http://127.0.0.1:{api.port}/v1/captions", json=body, timeout=120)
            )
        )
        client.start()
        eventually(lambda: metrics.sample("captionfleet_http_queued_images") == 1, "the API image offered")
        gated.step()  # the batch that was running ends
        gated.step()  # and the next one, which must hold the API image
        client.join(60)
        assert answers and answers[0].status_code == 200, answers
        assert answers[0].json()["results"][0]["id"] == "interactive"
        # Answered although the gate let only two batches through: at most 8 of the 40 were captioned.
        assert gated.entered <= 3
        assert len(gated.sizes) >= 2 and sum(gated.sizes[:2]) <= 8
        gated.open()
        assert reader.read_until(lambda view: len(view.ids(kafka_names["results"])) >= BACKLOG, timeout_s=120)
    finally:
        gated.open()
        worker.stop()
        thread.join(60)
        api.close()
        reader.close()
    assert reports and reports[0].exit_code == EXIT_OK
    results = [m["id"] for m in reader.messages[kafka_names["results"]]]
    assert sorted(results) == sorted(ids)  # the backlog: every request answered, once
    assert reader.messages[kafka_names["dead"]] == []


def test_a_stopping_worker_answers_the_api_requests_admitted_and_refuses_new_ones(
    kafka_broker: KafkaBroker, kafka_names: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """What `captionfleet worker --http` does on SIGTERM (its stop(): the API drains, the stream stops)."""
    settings = _settings(kafka_broker, kafka_names, tmp_path)
    gated = GatedModel(tiny_model(tiny_checkpoint))
    metrics = WorkerMetrics()
    source = KafkaSource(settings.kafka, "stopping-worker")
    output = KafkaOutput(make_producer(settings.kafka, "stopping-worker"), timeout_s=30)
    fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
    worker = StreamWorker(settings, gated, source, output, fetcher, metrics=metrics, name="stopping-worker")
    api = start_api(settings, worker.offer, lambda: worker.model_version, fetcher, metrics, "stopping-worker")
    reports: list[StreamReport] = []
    thread = threading.Thread(target=lambda: reports.append(worker.run()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{api.port}/v1/captions"
    body = {"id": "in-flight", "data": base64.b64encode(jpeg_bytes()).decode()}
    answers: list[httpx.Response] = []
    try:
        client = threading.Thread(target=lambda: answers.append(httpx.post(url, json=body, timeout=120)))
        client.start()
        gated.wait_entered(1, timeout_s=60)  # its batch is in the model
        queued = {**body, "id": "queued"}
        behind = threading.Thread(target=lambda: answers.append(httpx.post(url, json=queued, timeout=120)))
        behind.start()
        eventually(lambda: metrics.sample("captionfleet_http_queued_images") == 2, "one more image queued behind it")
        api.ctx.state.drain()  # the stop of worker/__main__.py: the API first, then the stream
        worker.stop()
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        gated.open()
        client.join(60)
        behind.join(60)
        thread.join(60)
    finally:
        gated.open()
        worker.stop()
        thread.join(60)
        api.close()
    assert sorted(a.json()["results"][0]["id"] for a in answers if a.status_code == 200) == ["in-flight", "queued"]
    assert reports and reports[0].exit_code == EXIT_OK
