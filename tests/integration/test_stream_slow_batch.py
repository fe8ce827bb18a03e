"""A batch slower than max_poll_interval_ms must not make the worker leave its group.

A consumer that ran the model on its polling thread would miss poll() for the whole batch, leave the
group when the poll interval expired, rejoin, get the same uncommitted messages back, run the same
slow batch again, and so on. Our loop pauses fetching and keeps polling instead, so the member
stays in the group for as long as the batch takes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from captionfleet.core.captioner import Captioner, ModelInput, ModelWrapper
from captionfleet.core.failures import EXIT_OK
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.worker.connectors.kafka import KafkaOutput, KafkaSource, make_producer
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.loop import StreamReport, StreamWorker
from tests.hostile_images import jpeg_bytes
from tests.services.kafka import KafkaBroker, TopicReader
from tests.unit.stream_fakes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

POLL_INTERVAL_MS = 2000
BATCH_S = 3.0  # every batch takes longer than the poll interval


class SlowCaptioner(ModelWrapper):
    def __init__(self, inner: Captioner, seconds: float) -> None:
        self._inner = inner
        self.seconds = seconds

    @property
    def wrapped(self) -> Captioner:
        return self._inner

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        time.sleep(self.seconds)
        return self._inner.caption_inputs(inputs, decoding)


class CountingSource(KafkaSource):
    pauses = 0

    def pause(self, partitions: Any) -> None:
        self.pauses += 1
        super().pause(partitions)


def test_batches_slower_than_the_poll_interval_cause_no_rebalance(
    kafka_broker: KafkaBroker, kafka_names: dict[str, str], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    for topic, partitions in (("requests", 2), ("results", 1), ("dead", 1)):
        kafka_broker.create_topic(kafka_names[topic], partitions)
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes())
    ids = [f"slow-{i}" for i in range(6)]
    kafka_broker.produce(
        kafka_names["requests"],
        [
            (i % 2, None, json.dumps({"id": rid, "uri": f"file://{tmp_path}/cat.jpg"}).encode())
            for i, rid in enumerate(ids)
        ],
    )
    settings = WorkerSettings(
        kafka={
            "bootstrap": kafka_broker.bootstrap,
            "request_topic": kafka_names["requests"],
            "result_topic": kafka_names["results"],
            "dead_letter_topic": kafka_names["dead"],
            "group_id": kafka_names["group"],
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "max_poll_interval_ms": POLL_INTERVAL_MS,
            "max_in_flight": 2,
        },
        batch={"max_items": 2, "max_wait_ms": 0},
        fetch={"file_root": tmp_path},
    )
    inner = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=4))
    metrics = WorkerMetrics()
    source = CountingSource(settings.kafka, "slow-worker")
    output = KafkaOutput(make_producer(settings.kafka, "slow-worker"), timeout_s=30)
    fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
    worker = StreamWorker(settings, SlowCaptioner(inner, BATCH_S), source, output, fetcher, metrics=metrics)
    reports: list[StreamReport] = []
    thread = threading.Thread(target=lambda: reports.append(worker.run()), daemon=True)
    thread.start()
    reader = TopicReader(kafka_broker, [kafka_names["results"], kafka_names["dead"]])
    try:
        assert reader.read_until(lambda view: len(view.ids(kafka_names["results"])) >= len(ids), timeout_s=120)
        # Past the last answer, the commit lands and the member is still the only one, never rejoined.
        wait_for(lambda: len(kafka_broker.group_offsets(kafka_names["group"])) == 2, 30, "offsets committed")
    finally:
        worker.stop()
        thread.join(60)
        worker.join(30)
        reader.close()

    assert reports and reports[0].exit_code == EXIT_OK
    assert sorted(reader.messages[kafka_names["results"]][i]["id"] for i in range(len(ids))) == sorted(ids)
    assert len(reader.messages[kafka_names["results"]]) == len(ids)  # no batch was redone
    assert reader.messages[kafka_names["dead"]] == []
    assert metrics.sample("captionfleet_rebalances_total") == 1  # one join, no rebalance since
    assert metrics.sample("captionfleet_inference_seconds_sum") >= len(ids) / 2 * BATCH_S  # the batches were slow
    assert source.pauses >= 1  # fetching was paused while the model was busy
    offsets = kafka_broker.group_offsets(kafka_names["group"])
    assert offsets == {TopicPartition(kafka_names["requests"], p): 3 for p in range(2)}
