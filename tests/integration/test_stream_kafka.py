"""The streaming worker as it runs in production (`python -m captionfleet.worker`), against the real broker and
the real S3 server: 500 requests over 4 partitions mixing captions, corrupt images, missing keys,
forbidden uris, malformed messages and S3 event notifications.

- a clean run answers every id exactly once, its metrics match, lag reaches zero, SIGTERM exits 0;
- SIGKILL mid-stream and a restart: every id answered (duplicates allowed, counted);
- two workers in one group, one SIGTERMed mid-stream: nothing lost, nothing redone of its work.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.stream_support import (
    GOOD,
    RESULT,
    AnswerReader,
    Answers,
    WorkerProcess,
    Workload,
    build_workload,
    make_topics,
    new_port,
    worker_env,
)
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3
from tests.unit.stream_fakes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Generous bounds for a loaded 2-core machine; a healthy run takes a fraction of them.
ALL_ANSWERED_S = 300


@pytest.fixture
def stream(
    kafka_broker: KafkaBroker,
    kafka_names: dict[str, str],
    s3_server: SeaweedS3,
    s3_bucket: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> Iterator[Any]:
    make_topics(kafka_broker, kafka_names)
    workload = build_workload(s3_server, s3_bucket, f"other-{uuid.uuid4().hex[:12]}")
    reader = AnswerReader(kafka_broker, kafka_names)
    workers: list[WorkerProcess] = []

    class Stream:
        broker = kafka_broker
        names = kafka_names
        load: Workload = workload
        answers = reader

        @staticmethod
        def produce() -> None:
            assert kafka_broker.produce(kafka_names["requests"], workload.messages) == len(workload.messages)

        @staticmethod
        def worker(name: str, **extra: str) -> WorkerProcess:
            env = worker_env(
                kafka_broker,
                kafka_names,
                s3_server,
                s3_bucket,
                tiny_checkpoint,
                tmp_path / "cache",
                name,
                new_port(),
                **extra,
            )
            process = WorkerProcess(env, tmp_path / f"{name}.log")
            workers.append(process)
            return process

    yield Stream
    for process in workers:
        process.close()
    reader.close()


def all_answered(workload: Workload) -> Any:
    expected = set(workload.expected)
    return lambda answers: expected <= set(answers.ids())


def check_outcomes(answers: Answers, workload: Workload) -> None:
    assert set(answers.ids()) == set(workload.expected), "unexpected ids in the output"
    for message in answers.results:
        assert workload.expected[message["id"]] == RESULT, message
        assert message["caption"] is not None and message["model_version"]
    for message in answers.dead:
        assert workload.expected[message["id"]] == message["kind"], message


def test_clean_run_answers_every_id_exactly_once(stream: Any) -> None:
    worker = stream.worker("solo")
    stream.produce()
    answers = stream.answers.wait(all_answered(stream.load), ALL_ANSWERED_S, worker)

    duplicates = {i: n for i, n in answers.ids().items() if n > 1}
    assert duplicates == {}
    check_outcomes(answers, stream.load)
    assert len(answers.results) == 350 and len(answers.dead) == 150
    good = next(m for m in answers.results if m["id"] == "good-7")
    assert good["metadata"] == {"n": 7} and good["uri"].endswith(f"objects/{GOOD[7]}")
    event = next(m for m in answers.results if m["id"].endswith("events/photo 3.jpg"))
    assert event["metadata"]["source"] == "s3-event"
    malformed = next(m for m in answers.dead if m["id"] == "malformed-0")
    assert malformed["request"] == "{this is not json" and malformed["source"]["topic"] == stream.names["requests"]

    # Lag reaches zero once the last commit lands (at most a commit interval after the last answer).
    lag_names = [
        ("captionfleet_consumer_lag", (("partition", str(p)), ("topic", stream.names["requests"]))) for p in range(4)
    ]

    def caught_up() -> bool:
        metrics = worker.metrics()
        return all(metrics.get(name) == 0 for name in lag_names)

    wait_for(caught_up, 30, what="lag zero on every partition")
    assert worker.get("/readyz") == (200, "ok\n")

    metrics = worker.metrics()
    load = stream.load

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("captionfleet_messages_consumed_total", topic=stream.names["requests"]) == len(load.messages)
    assert value("captionfleet_requests_total", source="request") == 420
    assert value("captionfleet_requests_total", source="s3_event") == 50
    assert value("captionfleet_images_total", outcome="captioned") == 350
    assert value("captionfleet_images_total", outcome="failed") == 120
    failures = {
        dict(labels)["kind"]: v for (name, labels), v in metrics.items() if name == "captionfleet_failures_total"
    }
    assert failures["malformed"] == 30 and failures["not_found"] == 40 and failures["forbidden"] == 40
    assert sum(failures.values()) == 150
    assert value("captionfleet_batch_size_sum") == 350
    assert value("captionfleet_end_to_end_latency_seconds_count") == 500
    assert value("captionfleet_rebalances_total") == 1
    assert value("captionfleet_in_flight_requests") == 0

    assert worker.terminate() == 0
    # Committed offsets = every message: a restart would redo nothing.
    committed = stream.broker.group_offsets(stream.names["group"])
    assert {tp.partition: offset for tp, offset in committed.items()} == dict(load.per_partition)

    # Structured logs name the id, topic, partition and offset of failed items.
    failed_lines = [line for line in worker.log_lines() if line.get("kind") == "not_found"]
    assert len(failed_lines) == 40
    assert {"id", "uri", "topic", "partition", "offset"} <= set(failed_lines[0])


def test_sigkill_mid_stream_then_restart_loses_nothing(stream: Any) -> None:
    first = stream.worker("doomed", WORKER_KAFKA__COMMIT_INTERVAL_MS="500")
    stream.produce()
    stream.answers.wait(lambda answers: len(answers.ids()) >= 120, ALL_ANSWERED_S, first)
    first.kill()  # no drain, no flush, no commit
    before = len(stream.answers.answers().ids())

    second = stream.worker("restarted")
    answers = stream.answers.wait(all_answered(stream.load), ALL_ANSWERED_S, second)
    assert before < len(stream.load.expected), "the kill came after the end: nothing was tested"
    check_outcomes(answers, stream.load)
    duplicates = sum(n - 1 for n in answers.ids().values())
    print(f"\nSIGKILL after {before} answers: {duplicates} duplicates among {sum(answers.ids().values())} answers")
    assert second.terminate() == 0


def test_two_workers_one_stopped_gracefully_loses_and_repeats_nothing(stream: Any) -> None:
    first = stream.worker("first")
    first.wait_ready()
    second = stream.worker("second")
    second.wait_ready()
    first.wait_ready()  # it was rebalanced when the second joined
    stream.produce()
    stream.answers.wait(lambda answers: len(answers.ids()) >= 100, ALL_ANSWERED_S, first)
    assert first.terminate() == 0  # stop fetching, finish the batch, flush, commit, leave the group
    answers = stream.answers.wait(all_answered(stream.load), ALL_ANSWERED_S, second)

    check_outcomes(answers, stream.load)
    counts = answers.ids()
    by_first = answers.by_worker("first")
    assert by_first, "the first worker answered nothing before it stopped"
    assert answers.by_worker("second"), "the second worker never got partitions"
    # Everything the graceful worker answered was committed: nobody answers it again.
    repeated = [i for i in by_first if counts[i] > 1]
    assert repeated == []
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\nfirst answered {len(by_first)}, second {len(answers.by_worker('second'))}; duplicates {duplicates}")
    assert second.terminate() == 0
