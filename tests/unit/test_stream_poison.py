"""A request whose answer cannot be encoded (issue 16's poison message): its dead letter, never a fatal error.

JSON parses nesting that, one level deeper and further down the consumer thread's stack, no longer
encodes; before, the RecursionError stopped the worker at that offset, and every restart (and every
worker taking the partition over) died on it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captionfleet.core.failures import EXIT_OK
from captionfleet.worker.messages import encode_json, fit_value
from tests.unit.stream_fakes import wait_for
from tests.unit.test_stream_loop import DEAD, RESULTS, all_committed, captioner, make, new_pair, request, root

__all__ = ["captioner", "make", "root"]  # fixtures shared with test_stream_loop


def test_a_field_that_cannot_be_encoded_is_summarised() -> None:
    circular: dict[str, Any] = {"id": "a"}
    circular["self"] = circular  # stands for any value the encoder refuses
    fitted = fit_value({"id": "a", "request": circular, "metadata": {"album": 7}}, 10_000)
    assert fitted["request"] == {"truncated": True, "unencodable": "ValueError: Circular reference detected"}
    assert fitted["metadata"] == {"album": 7}
    assert json.loads(encode_json(fitted))["id"] == "a"


def nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


def test_a_poison_answer_becomes_its_dead_letter_and_the_worker_goes_on(make: Any, root: Path) -> None:
    source, output = new_pair(partitions=1)
    good = f"file://{root}/good.jpg"
    # Depths around the interpreter's recursion limit: some do not parse (malformed), some parse but their
    # answer does not encode (the poison), the rest are answered as usual. Each gets exactly one answer.
    ids = [f"deep-{depth}" for depth in range(900, 1000)]
    for depth, request_id in zip(range(900, 1000), ids, strict=True):
        value = f'{{"id": "{request_id}", "uri": "{good}", "deep": {nested(depth)}}}'.encode()
        source.append(0, value, key=request_id.encode(), answers=[request_id])
    source.append(0, request("after", good), answers=["after"])
    running, metrics = make(source, output)

    wait_for(lambda: len(output.sent) == len(ids) + 1 and all_committed(source), 120, what="every answer")
    report = running.stop()

    assert report.exit_code == EXIT_OK and source.violations == []
    assert sorted(output.keys()) == sorted([*ids, "after"])
    assert "after" in output.keys(RESULTS)
    dead = {key: value for topic, key, value in output.sent if topic == DEAD}
    poison = {key: value for key, value in dead.items() if "could not be encoded" in value["message"]}
    assert poison, "no depth between parsing and encoding was tried: widen the range"
    for letter in poison.values():
        assert letter["kind"] == "malformed"
        assert letter["request"]["unencodable"].startswith("RecursionError")
        assert letter["metadata"]["unencodable"].startswith("RecursionError")
    assert metrics.sample("captionfleet_failures_total", {"kind": "malformed"}) == len(dead)


def test_ids_uris_and_keys_with_lone_surrogates_are_answered(make: Any, root: Path) -> None:
    # "\ud800" is valid JSON but has no UTF-8 form: its answers carry it escaped instead of failing the send.
    source, output = new_pair(partitions=1)
    good = f"file://{root}/good.jpg"
    created = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": {"key": "k\\ud800"}}}
    messages = {
        "a\ud800": f'{{"id": "a\\ud800", "uri": "{good}"}}',
        "b": f'{{"id": "b", "uri": "{good}\\ud800"}}',
        "s3://photos/k\ud800": json.dumps({"Records": [created]}).replace("\\\\ud800", "\\ud800"),
    }
    for answer, value in messages.items():
        source.append(0, value.encode(), answers=[answer])
    source.append(0, request("after", good), answers=["after"])
    running, _ = make(source, output)

    wait_for(lambda: len(output.sent) == 4 and all_committed(source), 60, what="every answer")
    report = running.stop()

    assert report.exit_code == EXIT_OK and source.violations == []
    assert sorted(output.keys()) == sorted([*messages, "after"])
    assert {json.loads(encode_json(value))["id"] for _, _, value in output.sent} == {*messages, "after"}
