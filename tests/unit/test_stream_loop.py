"""The stream loop's own logic with an in-memory source and output, the real tiny model and real files.

What is checked: every request gets exactly one answer (result or dead letter); an offset is
committed only once the answers of every message below it are acknowledged (MemorySource records
any violation); fetching pauses while the model is busy, and polling goes on; revocations finish
or give up in-flight work without duplicates; shutdown drains, commits and closes.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from captionfleet.core.captioner import Captioner, CaptionModel
from captionfleet.core.failures import EXIT_GRACE_EXCEEDED, EXIT_OK
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.pipeline import CaptionPipeline, Item, RunStats
from captionfleet.worker.stream.loop import StreamReport, StreamWorker
from tests.hostile_images import jpeg_bytes
from tests.unit.stream_fakes import GatedCaptioner, MemoryOutput, MemorySource, OutputFailedError, wait_for

TOPIC = "requests"
RESULTS = "caption-results"
DEAD = "caption-dead-letters"


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=4))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg_bytes())
    (folder / "bad.jpg").write_bytes(b"definitely not a picture")
    return folder


def settings(root: Path, **kafka: Any) -> WorkerSettings:
    batch = kafka.pop("batch", {"max_items": 4, "max_wait_ms": 20})
    grace = kafka.pop("grace_s", 20.0)
    return WorkerSettings(
        kafka={"bootstrap": "unused:9092", "request_topic": TOPIC, "commit_interval_ms": 0, **kafka},
        fetch={"file_root": root},
        batch=batch,
        shutdown={"grace_s": grace},
    )


def request(request_id: str, uri: str, **metadata: Any) -> bytes:
    return json.dumps({"id": request_id, "uri": uri, **metadata}).encode()


class Running:
    """A worker on its own thread, as __main__ runs it on the main one."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker
        self.report: StreamReport | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = self.worker.run()
        except BaseException as error:
            self.error = error

    def stop(self, timeout_s: float = 30) -> StreamReport:
        self.worker.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the worker did not stop"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


@pytest.fixture
def make(root: Path, captioner: Captioner) -> Iterator[Any]:
    started: list[Running] = []

    def start(
        source: MemorySource, output: MemoryOutput, model: CaptionModel | None = None, **kafka: Any
    ) -> tuple[Running, WorkerMetrics]:
        s = settings(root, **kafka)
        metrics = WorkerMetrics()
        fetcher = Fetcher(s.fetch, s3=s.s3, max_bytes=s.images.max_bytes)
        worker = StreamWorker(s, model or captioner, source, output, fetcher, metrics=metrics, name="test")
        running = Running(worker)
        started.append(running)
        return running, metrics

    yield start
    for running in started:  # never leave a loop spinning after a failed assertion
        running.worker.stop()
        running.thread.join(10)
        # A model thread still inside torch when the interpreter exits aborts the process.
        assert running.worker.join(30), "the model thread did not finish"


def new_pair(partitions: int = 4) -> tuple[MemorySource, MemoryOutput]:
    output = MemoryOutput()
    return MemorySource(TOPIC, partitions, output), output


def all_committed(source: MemorySource) -> bool:
    return all(source.committed.get(tp, 0) == len(source.logs[tp.partition]) for tp in source.owned)


def test_every_request_answered_once_and_committed_only_after_ack(make: Any, root: Path) -> None:
    source, output = new_pair()
    good, bad = f"file://{root}/good.jpg", f"file://{root}/bad.jpg"
    source.append(0, request("g0", good, album=7), answers=["g0"])
    source.append(0, request("b0", bad), answers=["b0"])
    source.append(0, b"not json at all", key=b"m0", answers=["m0"])
    source.append(1, request("g1", good), answers=["g1"])
    source.append(1, request("f1", "file:///etc/passwd"), answers=["f1"])
    source.append(1, request("n1", f"file://{root}/missing.jpg"), answers=["n1"])
    records = [
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": {"key": k}}} for k in "xy"
    ]
    source.append(2, json.dumps({"Records": records}).encode(), answers=["s3://photos/x", "s3://photos/y"])
    source.append(2, json.dumps({"Event": "s3:TestEvent"}).encode())  # nothing to answer
    for i in range(3):
        source.append(3, request(f"g3-{i}", good), answers=[f"g3-{i}"])
    running, metrics = make(source, output)

    wait_for(lambda: len(output.sent) == 11 and all_committed(source), what="all answers and commits")
    report = running.stop()

    assert report.exit_code == EXIT_OK and report.messages == 11
    assert source.violations == []
    assert Counter(output.keys()) == Counter(
        ["g0", "b0", "m0", "g1", "f1", "n1", "s3://photos/x", "s3://photos/y", "g3-0", "g3-1", "g3-2"]
    )
    assert sorted(output.keys(RESULTS)) == ["g0", "g1", "g3-0", "g3-1", "g3-2"]
    results = {v["id"]: v for v in output.values(RESULTS)}
    assert results["g0"]["metadata"] == {"album": 7} and results["g0"]["caption"] is not None
    assert results["g0"]["model_version"] and results["g0"]["worker"] == "test"
    assert results["g0"]["mean_logprob"] <= 0 and results["g0"]["tokens"] >= 1  # the caption's confidence
    dead = {key: value for topic, key, value in output.sent if topic == DEAD}
    assert {k: v["kind"] for k, v in dead.items()} == {
        "b0": "not_an_image",
        "m0": "malformed",
        "f1": "forbidden",
        "n1": "not_found",
        "s3://photos/x": "forbidden",
        "s3://photos/y": "forbidden",
    }
    assert dead["m0"]["request"] == "not json at all"
    assert dead["m0"]["source"] == {
        "topic": TOPIC,
        "partition": 0,
        "offset": 2,
        "timestamp_ms": pytest.approx(0, abs=1e13),
    }
    assert dead["f1"]["request"] == {"id": "f1", "uri": "file:///etc/passwd"}
    assert source.closed and output.closed

    sample = metrics.sample
    assert sample("captionfleet_messages_consumed_total", {"topic": TOPIC}) == 11
    assert sample("captionfleet_images_total", {"outcome": "captioned"}) == 5
    assert sample("captionfleet_images_total", {"outcome": "failed"}) == 5
    assert sample("captionfleet_failures_total", {"kind": "malformed"}) == 1
    assert sample("captionfleet_ignored_events_total") == 1
    assert sample("captionfleet_requests_total", {"source": "s3_event"}) == 2
    assert sample("captionfleet_fetch_seconds_count") == 10  # failed reads (4 of them) included
    for partition in range(4):
        assert sample("captionfleet_consumer_lag", {"topic": TOPIC, "partition": str(partition)}) == 0


def test_messages_too_large_to_answer_whole_are_answered_with_summaries(make: Any, root: Path) -> None:
    # A binary value escapes to ~5x its size in its dead letter, and metadata comes back in the result:
    # both would exceed the producer's limit, fail the send and stop the worker at the same offset forever.
    source, output = new_pair(partitions=1)
    output.max_bytes = 64 * 1024
    good = f"file://{root}/good.jpg"
    source.append(0, bytes(range(128, 256)) * 400, key=b"blob", answers=["blob"])  # 51 KB, not UTF-8
    source.append(0, request("big", good, notes="x" * 60_000), answers=["big"])
    source.append(0, request("after", good), answers=["after"])
    running, _ = make(source, output, max_message_bytes=64 * 1024)

    wait_for(lambda: len(output.sent) == 3 and all_committed(source), what="all answered and committed")
    assert running.stop().exit_code == EXIT_OK
    assert source.violations == []
    dead = dict((key, value) for topic, key, value in output.sent if topic == DEAD)
    assert dead["blob"]["kind"] == "malformed" and dead["blob"]["request"]["truncated"] is True
    assert dead["blob"]["request"]["bytes"] > 64 * 1024 and len(dead["blob"]["request"]["sha256"]) == 64
    results = {value["id"]: value for value in output.values(RESULTS)}
    assert results["big"]["caption"] and results["big"]["metadata"]["truncated"] is True
    assert results["after"]["metadata"] == {}  # small messages pass whole


def test_batches_span_partitions(make: Any, root: Path) -> None:
    source, output = new_pair()
    for i in range(8):
        source.append(i % 4, request(f"g{i}", f"file://{root}/good.jpg"), answers=[f"g{i}"])
    # One poll brings all eight; a long wait lets the batcher fill up to max_items from every partition.
    running, metrics = make(source, output, batch={"max_items": 8, "max_wait_ms": 10_000})
    wait_for(lambda: len(output.sent) == 8, what="8 results")
    running.stop()
    assert metrics.sample("captionfleet_batch_size_count") == 1
    assert metrics.sample("captionfleet_batch_size_sum") == 8


def test_a_busy_model_pauses_fetching_and_polling_goes_on(make: Any, root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=2)
    for i in range(10):
        source.append(i % 2, request(f"g{i}", f"file://{root}/good.jpg"), answers=[f"g{i}"])
    model = GatedCaptioner(captioner)
    running, _ = make(source, output, model=model, max_in_flight=2, batch={"max_items": 2, "max_wait_ms": 0})
    wait_for(model.entered.is_set, what="the first batch")
    wait_for(lambda: source.paused == source.owned, what="fetching paused")
    polls = source.polls_while_paused
    # The batch is stuck, yet the loop keeps polling (what keeps a real member in its group).
    wait_for(lambda: source.polls_while_paused >= polls + 20, what="polls while paused")
    assert running.worker.in_flight == 2
    model.gate.set()
    wait_for(lambda: len(output.sent) == 10 and all_committed(source), what="all answered")
    running.stop()
    assert Counter(output.keys()) == Counter(f"g{i}" for i in range(10))
    assert source.violations == []
    assert max(model.batches) <= 2


def test_revocation_finishes_in_flight_work_then_commits(make: Any, root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=2)
    for i in range(4):
        source.append(i % 2, request(f"g{i}", f"file://{root}/good.jpg"), answers=[f"g{i}"])
    model = GatedCaptioner(captioner)
    running, metrics = make(source, output, model=model)
    wait_for(model.entered.is_set, what="a batch in the model")
    source.rebalance()
    # The revocation waits for the batch (well inside its bound); open the gate while it waits.
    threading.Timer(0.2, model.gate.set).start()
    wait_for(lambda: metrics.sample("captionfleet_rebalances_total") == 2, what="reassignment")
    wait_for(lambda: len(output.sent) == 4 and all_committed(source), what="all answered")
    running.stop()
    assert Counter(output.keys()) == Counter(f"g{i}" for i in range(4))  # nothing redone after the rebalance
    assert source.violations == []


def test_revocation_gives_up_unfinished_work_without_duplicates(make: Any, root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=2)
    for i in range(4):
        source.append(i % 2, request(f"g{i}", f"file://{root}/good.jpg"), answers=[f"g{i}"])
    model = GatedCaptioner(captioner)
    # session 1.5 s -> the revocation waits 0.5 s for in-flight work, then leaves it to the next owner.
    running, metrics = make(source, output, model=model, session_timeout_ms=1500, heartbeat_interval_ms=500)
    wait_for(model.entered.is_set, what="a batch in the model")
    source.rebalance()
    wait_for(lambda: metrics.sample("captionfleet_rebalances_total") == 2, what="reassignment")
    model.gate.set()  # the old batch finishes now: its answers are stale and dropped; the redelivered run answers
    wait_for(lambda: len(output.sent) >= 4 and all_committed(source), what="all answered")
    running.stop()
    assert Counter(output.keys()) == Counter(f"g{i}" for i in range(4))
    assert source.violations == []


def test_unacknowledged_output_stops_the_worker_without_committing(make: Any, root: Path) -> None:
    source, output = new_pair(partitions=1)
    output.fail_flush = True
    source.append(0, request("g0", f"file://{root}/good.jpg"), answers=["g0"])
    running, _ = make(source, output)
    running.thread.join(30)
    assert isinstance(running.error, OutputFailedError)
    assert source.committed == {}  # the answer was sent but never acknowledged: the message is read again
    assert source.closed


def test_stop_finishes_the_batch_in_flight_then_commits(make: Any, root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    for i in range(3):
        source.append(0, request(f"g{i}", f"file://{root}/good.jpg"), answers=[f"g{i}"])
    model = GatedCaptioner(captioner)
    running, _ = make(source, output, model=model, batch={"max_items": 8, "max_wait_ms": 0})
    wait_for(model.entered.is_set, what="a batch in the model")
    threading.Timer(0.2, model.gate.set).start()
    report = running.stop()
    assert report.exit_code == EXIT_OK and report.abandoned == 0
    assert sorted(output.acked_keys()) == ["g0", "g1", "g2"]
    assert list(source.committed.values()) == [3]
    assert source.violations == [] and source.closed


def test_grace_period_over_leaves_unfinished_work_uncommitted(make: Any, root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    source.append(0, request("g0", f"file://{root}/good.jpg"), answers=["g0"])
    source.append(0, request("g1", f"file://{root}/good.jpg"), answers=["g1"])
    model = GatedCaptioner(captioner)
    running, _ = make(source, output, model=model, grace_s=1.0)
    wait_for(model.entered.is_set, what="a batch in the model")
    try:
        report = running.stop()
    finally:
        model.gate.set()
    assert report.exit_code == EXIT_GRACE_EXCEEDED and report.abandoned == 2
    assert all(offset == 0 for offset in source.committed.values())  # redone by the next owner
    assert source.violations == [] and source.closed


def test_revocation_gives_up_the_commit_when_the_broker_is_slow_to_acknowledge(make: Any, root: Path) -> None:
    # A revocation holds up the member's heartbeats (kafka-python's IO thread runs it), and a flush may
    # wait up to produce_timeout_s: past the session timeout, the member would be evicted.
    source, output = new_pair(partitions=1)
    source.append(0, request("g0", f"file://{root}/good.jpg"), answers=["g0"])
    # session 1.5 s -> the revocation is bounded at 0.5 s; no periodic commit, so only it could commit.
    running, _ = make(source, output, session_timeout_ms=1500, heartbeat_interval_ms=500, commit_interval_ms=600_000)
    wait_for(lambda: output.keys() == ["g0"], what="the answer sent")
    output.ack_delay_s = 10.0
    source.rebalance()
    wait_for(lambda: len(source.revoking_s) == 1, timeout_s=5, what="the revocation to return")
    assert source.revoking_s[0] < 0.5 + 1.0
    assert source.committed == {}  # never acknowledged: the next owner (here, us again) redoes it
    output.ack_delay_s = 0.0
    wait_for(lambda: output.keys() == ["g0", "g0"], what="the message answered again")
    assert running.stop().exit_code == EXIT_OK
    assert source.committed == {TopicPartition(TOPIC, 0): 1}
    assert source.violations == []


def test_a_new_group_reading_from_the_end_commits_where_it_started(make: Any, root: Path, captioner: Captioner) -> None:
    # With auto_offset_reset=latest and no committed offset, a crash while the first message is in flight
    # would restart at the end, past it and the answered ones after it, unless its offset was committed.
    output = MemoryOutput()
    source = MemorySource(TOPIC, 1, output, reset="latest")
    good = f"file://{root}/good.jpg"
    for i in range(2):
        source.append(0, request(f"old{i}", good))  # sent before the group existed: never read
    model = GatedCaptioner(captioner)
    running, metrics = make(source, output, model=model, auto_offset_reset="latest")
    wait_for(lambda: metrics.sample("captionfleet_rebalances_total") == 1, what="the assignment")
    first = source.append(0, request("g2", good), answers=["g2"])
    source.append(0, request("f3", "file:///etc/passwd"), answers=["f3"])
    wait_for(lambda: model.entered.is_set() and output.keys() == ["f3"], what="g2 in the model, f3 answered")
    tp = TopicPartition(TOPIC, 0)
    try:
        wait_for(lambda: source.committed.get(tp) == first, timeout_s=5, what="the first offset committed")
    finally:
        model.gate.set()
    wait_for(lambda: source.committed.get(tp) == 4, what="everything committed")
    assert running.stop().exit_code == EXIT_OK
    assert sorted(output.keys()) == ["f3", "g2"] and source.violations == []


@pytest.fixture
def dying_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The model thread takes one request, then dies (a CUDA error, say) once the test sets ``die``."""
    took, die = threading.Event(), threading.Event()

    def run(self: CaptionPipeline, items: Iterable[Item]) -> RunStats:
        next(iter(items))
        took.set()
        die.wait(timeout=30)
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(CaptionPipeline, "run", run)
    yield took, die
    die.set()  # never leave the model thread waiting


def test_a_dead_model_during_shutdown_fails_the_worker_at_once(
    make: Any, root: Path, dying_model: tuple[threading.Event, threading.Event]
) -> None:
    took, die = dying_model
    source, output = new_pair(partitions=1)
    source.append(0, request("g0", f"file://{root}/good.jpg"), answers=["g0"])
    running, _ = make(source, output, grace_s=20.0)
    wait_for(took.is_set, what="a request in the model")
    running.worker.stop()
    wait_for(lambda: running.worker.health.stopping, what="the shutdown drain")
    die.set()
    running.thread.join(5)  # waiting out the grace period would take 16 s
    assert not running.thread.is_alive(), "a dead model was waited for until the grace period ran out"
    assert isinstance(running.error, RuntimeError) and "model thread failed" in str(running.error)
    assert all(offset == 0 for offset in source.committed.values())  # redone by the next owner
    assert source.closed and output.keys() == []


def test_a_dead_model_during_a_revocation_fails_the_worker_at_once(
    make: Any, root: Path, dying_model: tuple[threading.Event, threading.Event]
) -> None:
    took, die = dying_model
    source, output = new_pair(partitions=1)
    source.append(0, request("g0", f"file://{root}/good.jpg"), answers=["g0"])
    # session 30 s -> a revocation waits up to 10 s for in-flight work.
    running, _ = make(source, output, session_timeout_ms=30_000)
    wait_for(took.is_set, what="a request in the model")
    source.rebalance()
    wait_for(source.revoking_started.is_set, what="the revocation")
    die.set()
    running.thread.join(5)
    assert not running.thread.is_alive(), "a dead model was waited for until the revocation's bound"
    assert isinstance(running.error, RuntimeError) and "model thread failed" in str(running.error)
    assert all(offset == 0 for offset in source.committed.values())
    assert source.closed


def test_prompts_are_echoed_in_results_and_dead_letters(make: Any, root: Path) -> None:
    """The tiny model is a ViT-GPT2: it takes no prompt, so a request with one is malformed (its dead letter
    names the prompt); one without is captioned, its result saying no prompt was used; a prompt that is not
    text is refused when the message is read."""
    source, output = new_pair(partitions=1)
    good = f"file://{root}/good.jpg"
    source.append(0, request("plain", good), answers=["plain"])
    source.append(0, request("asked", good, prompt="a photo of"), answers=["asked"])
    source.append(0, request("bad", good, prompt="nul\u0000"), answers=["bad"])
    running, _ = make(source, output)
    wait_for(lambda: len(output.sent) == 3 and all_committed(source), what="all answered and committed")
    running.stop()
    results = {value["id"]: value for value in output.values(RESULTS)}
    assert list(results) == ["plain"] and results["plain"]["caption"] and results["plain"]["prompt"] is None
    dead = {key: value for topic, key, value in output.sent if topic == DEAD}
    assert dead["asked"]["kind"] == "malformed" and "takes no prompt" in dead["asked"]["message"]
    assert dead["asked"]["prompt"] == "a photo of" and dead["asked"]["request"]["prompt"] == "a photo of"
    assert (
        dead["bad"]["kind"] == "malformed"
        and "the request's prompt holds a control character" in dead["bad"]["message"]
    )
