"""max_in_flight bounds what one message can put in flight (issue 16, item 2): an S3 event notification with
many records waits for room record by record, and its offset commits only when every record is answered."""

from __future__ import annotations

import json
from pathlib import Path

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import EXIT_OK
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.stream.items import StreamItem
from captionfleet.worker.stream.loop import StreamWorker
from tests.unit.stream_fakes import wait_for
from tests.unit.test_stream_loop import (
    DEAD,
    RESULTS,
    Running,
    all_committed,
    captioner,
    new_pair,
    request,
    root,
    settings,
)

__all__ = ["captioner", "root"]  # fixtures shared with test_stream_loop

RECORDS = 60
MAX_IN_FLIGHT = 4


def event(keys: list[str]) -> bytes:
    records = [
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": {"key": k}}} for k in keys
    ]
    return json.dumps({"Records": records}).encode()


def test_one_message_with_many_records_keeps_the_in_flight_bound(root: Path, captioner: Captioner) -> None:
    source, output = new_pair(partitions=1)
    keys = [f"k{i:03d}" for i in range(RECORDS)]
    source.append(0, event(keys), answers=[f"s3://photos/{k}" for k in keys])
    source.append(0, request("after", f"file://{root}/good.jpg"), answers=["after"])
    s = settings(root, max_in_flight=MAX_IN_FLIGHT)
    worker = StreamWorker(s, captioner, source, output, Fetcher(s.fetch, s3=s.s3, max_bytes=1000), name="test")
    seen: list[int] = []  # requests in flight as each one is handed to the fetch threads
    submit = worker._stages.submit

    def counting_submit(item: StreamItem) -> None:
        seen.append(worker.in_flight)
        submit(item)

    worker._stages.submit = counting_submit  # type: ignore[method-assign]
    running = Running(worker)
    try:
        wait_for(lambda: len(output.sent) == RECORDS + 1 and all_committed(source), 60, what="every answer")
    finally:
        report = running.stop()
        assert worker.join(30)

    assert report.exit_code == EXIT_OK and source.violations == []
    assert len(seen) == RECORDS + 1 and max(seen) <= MAX_IN_FLIGHT, f"in flight when submitting: {max(seen)}"
    # Not an allow-listed bucket: each record answered (forbidden), none lost, and the next message after them.
    assert sorted(output.keys(DEAD)) == sorted(f"s3://photos/{k}" for k in keys)
    assert output.keys(RESULTS) == ["after"]
