"""Outages (issue 16, item 3) with an in-memory source and output and a store that can be switched off: while
the store or the broker is down the worker pauses its partitions, reports not ready and retries; nothing that
succeeds once it is back is dead-lettered; what stays failed past the budget is, and the worker then goes on;
a stop during an outage leaves the unread requests uncommitted. The real servers: test_stream_outages_kafka.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import EXIT_GRACE_EXCEEDED, EXIT_OK, UNAVAILABLE, FetchError
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.metrics import Health, WorkerMetrics
from captionfleet.worker.stream.items import StreamItem
from captionfleet.worker.stream.loop import StreamWorker
from captionfleet.worker.stream.outages import Dependency, is_store_outage, outage_wait_s
from tests.hostile_images import jpeg_bytes
from tests.unit.stream_fakes import MemoryOutput, MemorySource, wait_for
from tests.unit.test_stream_loop import DEAD, RESULTS, Running, all_committed, captioner, new_pair, request, root

__all__ = ["captioner", "root"]  # fixtures shared with test_stream_loop


class SwitchableStore(Fetcher):
    """s3:// reads answer with a picture, or fail as an unreachable store does while ``down`` is set (or
    always, for the uris in ``broken``)."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
        self.down = threading.Event()
        self.broken: set[str] = set()
        self.reads = 0

    def fetch(self, uri: str) -> bytes:
        if not uri.startswith("s3://"):
            return super().fetch(uri)
        self.check(uri)  # the policy, as the real one
        self.reads += 1
        if self.down.is_set() or uri in self.broken:
            raise FetchError(UNAVAILABLE, "connection failed: Connection refused (gave up after 4 attempts)")
        return jpeg_bytes()


def outage_settings(root: Path, **fetch: Any) -> WorkerSettings:
    return WorkerSettings(
        kafka={"bootstrap": "unused:9092", "request_topic": "requests", "commit_interval_ms": 0, "max_in_flight": 8},
        fetch={
            "file_root": root,
            "allowed_buckets": ["photos"],
            "outage_budget_s": 60,
            "outage_retry_max_s": 0.05,
            **fetch,
        },
        batch={"max_items": 4, "max_wait_ms": 20},
        shutdown={"grace_s": 20.0},
    )


class Started:
    def __init__(self, root: Path, captioner: Captioner, source: MemorySource, output: MemoryOutput, **fetch: Any):
        s = outage_settings(root, **fetch)
        self.store = SwitchableStore(s)
        self.health = Health()
        self.health.set(model_loaded=True)
        self.metrics = WorkerMetrics()
        self.worker = StreamWorker(
            s, captioner, source, output, self.store, metrics=self.metrics, health=self.health, name="test"
        )
        self.running = Running(self.worker)

    def up(self, dependency: str) -> float:
        return self.metrics.sample("captionfleet_dependency_up", {"dependency": dependency})


def not_ready_because(health: Health, what: str) -> bool:
    ready, why = health.ready()
    return not ready and what in why


def test_a_store_outage_pauses_the_worker_and_loses_nothing(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=2)
    started = Started(root, captioner, source, output)
    started.store.down.set()
    try:
        wait_for(lambda: started.health.ready()[0], 30, what="ready before the outage")
        ids = [f"r{i}" for i in range(6)]
        for i, request_id in enumerate(ids):
            source.append(i % 2, request(request_id, f"s3://photos/{request_id}.jpg"), answers=[request_id])
        wait_for(lambda: not_ready_because(started.health, "object_store unreachable"), 30, what="not ready")
        assert started.up("object_store") == 0
        wait_for(lambda: source.paused >= source.owned, 10, what="partitions paused")
        # Requests arriving during the outage wait in the topic: nothing new is taken.
        source.append(0, request("later", "s3://photos/later.jpg"), answers=["later"])
        reads = started.store.reads
        wait_for(lambda: started.store.reads > reads + 6, 10, what="retries going on")
        assert source.positions[TopicPartition("requests", 0)] == 3, "a request was taken during the outage"
        assert (
            output.sent == []
            and started.metrics.sample("captionfleet_outage_retries_total", {"dependency": "object_store"}) > 0
        )

        started.store.down.clear()  # the store is back
        wait_for(lambda: len(output.sent) == 7 and all_committed(source), 30, what="every answer after the outage")
        wait_for(lambda: started.health.ready()[0], 10, what="ready again")
        assert started.up("object_store") == 1 and not source.paused
    finally:
        report = started.running.stop()
        assert started.worker.join(30)
    assert report.exit_code == EXIT_OK and source.violations == []
    assert sorted(output.keys(RESULTS)) == sorted([*ids, "later"]) and output.keys(DEAD) == []


def test_what_stays_failed_past_the_budget_is_dead_lettered_and_the_worker_goes_on(
    root: Path, captioner: Captioner
) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output, outage_budget_s=0.5)
    started.store.down.set()
    try:
        for i in range(3):
            source.append(0, request(f"d{i}", f"s3://photos/d{i}.jpg"), answers=[f"d{i}"])
        wait_for(lambda: len(output.keys(DEAD)) == 3, 30, what="dead letters past the budget")
        letter = output.values(DEAD)[0]
        assert letter["kind"] == UNAVAILABLE and "WORKER_FETCH__OUTAGE_BUDGET_S" in letter["message"]
        # Nothing left in flight: the worker does not stay paused on a verdict nobody can renew.
        started.store.down.clear()
        source.append(0, request("after", "s3://photos/after.jpg"), answers=["after"])
        wait_for(lambda: output.keys(RESULTS) == ["after"] and all_committed(source), 30, what="the next request")
    finally:
        report = started.running.stop()
        assert started.worker.join(30)
    assert report.exit_code == EXIT_OK and source.violations == []


def test_a_stop_during_an_outage_leaves_the_unread_requests_uncommitted(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output)
    started.store.down.set()
    source.append(0, request("first", f"file://{root}/good.jpg"), answers=["first"])
    wait_for(lambda: output.keys(RESULTS) == ["first"] and all_committed(source), 30, what="the first answer")
    for i in range(3):
        source.append(0, request(f"stuck{i}", f"s3://photos/stuck{i}.jpg"), answers=[f"stuck{i}"])
    wait_for(lambda: not_ready_because(started.health, "object_store"), 30, what="the outage")
    report = started.running.stop(timeout_s=10)  # not the 60 s budget, nor the 20 s grace period
    assert started.worker.join(30)
    assert report.exit_code == EXIT_GRACE_EXCEEDED and report.abandoned == 3
    assert output.keys() == ["first"] and source.violations == []
    assert source.committed[TopicPartition("requests", 0)] == 1  # the stuck ones are read again


def test_a_silent_broker_pauses_the_worker_and_holds_the_commits(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output)
    try:
        source.append(0, request("before", f"file://{root}/good.jpg"), answers=["before"])
        wait_for(lambda: source.committed.get(TopicPartition("requests", 0)) == 1, 30, what="the first commit")
        source.silence_s = 60.0  # no heartbeat answered for a minute
        wait_for(lambda: not_ready_because(started.health, "broker unreachable"), 10, what="not ready")
        assert started.up("broker") == 0
        wait_for(lambda: source.paused >= source.owned, 10, what="partitions paused")
        flushes = output.flushes
        wait_for(lambda: source.polls > 50, 10, what="the loop turning")
        assert output.flushes == flushes, "a commit (and its flush) was tried while the broker was down"

        source.silence_s = 0.5
        source.append(0, request("after", f"file://{root}/good.jpg"), answers=["after"])
        wait_for(lambda: output.keys(RESULTS) == ["before", "after"] and all_committed(source), 30, what="after")
        assert started.health.ready()[0] and started.up("broker") == 1
    finally:
        report = started.running.stop()
        assert started.worker.join(30)
    assert report.exit_code == EXIT_OK and source.violations == []


def test_one_object_that_keeps_failing_does_not_pause_the_worker(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output, outage_budget_s=3)
    started.store.broken.add("s3://photos/hot.jpg")
    try:
        source.append(0, request("hot", "s3://photos/hot.jpg"), answers=["hot"])
        wait_for(lambda: started.store.reads >= 4, 30, what="its retries")
        # Its own retries are one object failing, not the store: still ready, nothing paused.
        assert started.health.ready()[0] and not source.paused
        source.append(0, request("fine", "s3://photos/fine.jpg"), answers=["fine"])
        wait_for(lambda: output.keys(RESULTS) == ["fine"], 30, what="the other request answered meanwhile")
        wait_for(lambda: output.keys(DEAD) == ["hot"] and all_committed(source), 30, what="its dead letter")
    finally:
        report = started.running.stop()
        assert started.worker.join(30)
    assert report.exit_code == EXIT_OK


def test_a_revoked_partition_stops_its_retries_and_its_next_owner_answers_once(
    root: Path, captioner: Captioner
) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output)
    started.store.down.set()
    submitted: list[StreamItem] = []
    submit = started.worker._stages.submit

    def recording_submit(item: StreamItem) -> None:
        submitted.append(item)
        submit(item)

    started.worker._stages.submit = recording_submit  # type: ignore[method-assign]
    try:
        for i in range(3):
            source.append(0, request(f"x{i}", f"s3://photos/x{i}.jpg"), answers=[f"x{i}"])
        wait_for(lambda: not_ready_because(started.health, "object_store"), 30, what="the outage")
        first_reads = list(submitted)
        source.rebalance()  # revoked and assigned again: the in-flight retries end, the messages are read again
        wait_for(lambda: source.revoking_s != [], 30, what="the revocation")
        # The revoked reads are told to stop retrying (their answers would be dropped).
        wait_for(lambda: all(item.cancelled for item in first_reads), 10, what="the revoked retries cancelled")
        started.store.down.clear()
        wait_for(lambda: len(output.sent) >= 3 and all_committed(source), 30, what="the answers")
    finally:
        report = started.running.stop()
        assert started.worker.join(30)
    assert report.exit_code == EXIT_OK and source.violations == []
    assert sorted(output.keys(RESULTS)) == ["x0", "x1", "x2"], output.keys()


def test_a_stop_during_a_broker_outage_commits_nothing_and_says_so(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    started = Started(root, captioner, source, output)
    source.append(0, request("first", f"file://{root}/good.jpg"), answers=["first"])
    wait_for(lambda: source.committed.get(TopicPartition("requests", 0)) == 1, 30, what="the first commit")
    source.silence_s = 60.0
    wait_for(lambda: not_ready_because(started.health, "broker"), 10, what="the broker outage")
    source.append(0, request("second", f"file://{root}/good.jpg"), answers=["second"])
    flushes = output.flushes
    report = started.running.stop()
    assert started.worker.join(30)
    # The shutdown's flush (which waits out the producer's timeout on a real broker) and commit are not tried.
    assert output.flushes == flushes and source.committed[TopicPartition("requests", 0)] == 1
    assert report.exit_code == EXIT_GRACE_EXCEEDED


def test_heartbeats_at_their_normal_pace_are_no_outage(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    s = outage_settings(root)
    s.kafka.session_timeout_ms, s.kafka.heartbeat_interval_ms = 6000, 3500
    health = Health()
    health.set(model_loaded=True)
    worker = StreamWorker(s, captioner, source, output, SwitchableStore(s), health=health, name="test")
    running = Running(worker)
    try:
        # Longer than half the session and than a heartbeat interval, shorter than the session: a client
        # starved of CPU sees such gaps; only a silence as long as the session is the broker's.
        source.silence_s = 5.5
        wait_for(lambda: source.polls > 50, 10, what="the loop turning")
        assert health.ready()[0] and not source.paused
    finally:
        running.stop()
        assert worker.join(30)


def test_only_store_failures_of_s3_uris_are_outages() -> None:
    assert is_store_outage("s3://photos/a.jpg", UNAVAILABLE) and is_store_outage("S3://photos/a.jpg", "timeout")
    assert not is_store_outage("s3://photos/a.jpg", "not_found")
    # An http host is someone else's server: one of them down must not pause the worker.
    assert not is_store_outage("https://cdn.example.com/a.jpg", UNAVAILABLE)


def test_a_dependency_is_down_after_failures_in_a_row_and_up_at_the_first_success() -> None:
    now = [100.0]
    store = Dependency("object_store", clock=lambda: now[0])
    for _ in range(5):  # one object's retries: that object's problem
        store.failed("refused", what="s3://b/a", down_after=3)
    store.failed("refused", what="s3://b/b", down_after=3)
    assert store.down() is None
    store.failed("refused", what="s3://b/c", down_after=3)
    now[0] += 12
    assert store.down() == "object_store unreachable for 12s (refused)"
    store.succeeded()
    assert store.down() is None


def test_outage_waits_double_up_to_their_cap_with_jitter() -> None:
    assert [outage_wait_s(n, 15, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 15, 15]
    assert outage_wait_s(3, 15, rand=lambda: 0.0) == 2
