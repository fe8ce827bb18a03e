"""Kafka message values -> caption requests: our JSON shape, S3 event notifications, and what is malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from captionfleet.worker.requests import MalformedMessage, parse_message, readable


def event(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


def created(bucket: str, key: str, name: str = "ObjectCreated:Put", **obj: Any) -> dict[str, Any]:
    return {
        "eventName": name,
        "eventTime": "2026-01-01T00:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, **obj}},
    }


def test_request_with_metadata_passed_through() -> None:
    value = {"id": "up-1", "uri": "s3://images/a.jpg", "tenant": "acme", "metadata": {"album": 7}}
    [request] = parse_message(json.dumps(value).encode()).requests
    assert (request.id, request.uri) == ("up-1", "s3://images/a.jpg")
    assert request.metadata == {"tenant": "acme", "album": 7}
    assert request.original == value


def test_numeric_id_is_text() -> None:
    [request] = parse_message(b'{"id": 42, "uri": "s3://b/k"}').requests
    assert request.id == "42"


def test_s3_event_gives_one_request_per_created_object() -> None:
    parsed = parse_message(
        event(
            created("photos", "a/cat+photo%281%29.jpg", eTag="abc", size=10),
            created("photos", "b.png"),
            created("photos", "gone.jpg", name="ObjectRemoved:Delete"),
        )
    )
    assert [r.uri for r in parsed.requests] == ["s3://photos/a/cat photo(1).jpg", "s3://photos/b.png"]
    # The object's uri is its id: a result says which upload it captions.
    assert [r.id for r in parsed.requests] == [r.uri for r in parsed.requests]
    first = parsed.requests[0]
    assert first.metadata["etag"] == "abc" and first.metadata["event_name"] == "ObjectCreated:Put"
    assert first.original["s3"]["object"]["key"] == "a/cat+photo%281%29.jpg"
    assert parsed.ignored == ["ObjectRemoved:Delete s3://photos/gone.jpg"]


def test_s3_test_event_is_ignored_not_failed() -> None:
    parsed = parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}).encode())
    assert parsed.requests == [] and parsed.ignored == ["s3:TestEvent"]


@pytest.mark.parametrize(
    ("value", "key", "expect_id", "words"),
    [
        (b"not json", b"k-1", "k-1", "not JSON"),
        (b"\xff\xfe\x00garbage", None, None, "not JSON"),
        (b"", b"k-2", "k-2", "empty"),
        (b"[1, 2]", None, None, "not an object"),
        (b'{"uri": "s3://b/k"}', b"k-3", "k-3", "no id"),
        (b'{"id": "x", "uri": ""}', None, "x", "no uri"),
        (b'{"id": "x", "uri": 5}', None, "x", "no uri"),
        (b'{"id": true, "uri": "s3://b/k"}', None, None, "no id"),
        (b'{"id": "x", "uri": "s3://b/k", "metadata": [1]}', None, "x", "metadata"),
        (b'{"Records": []}', None, None, "no Records"),
        (b'{"Records": [{"s3": {"bucket": {}}}]}', b"k-4", "k-4", "s3.bucket.name"),
    ],
)
def test_malformed_messages(value: bytes, key: bytes | None, expect_id: str | None, words: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_message(value, key)
    assert info.value.id == expect_id
    assert words in info.value.message


def test_malformed_message_keeps_what_was_sent() -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_message(b'{"id": "x"}')
    assert info.value.original == {"id": "x"}
    assert readable(b"\xffnot text") == "\\xffnot text"
    assert readable(b'{"a": 1}') == {"a": 1}


def test_a_request_prompt_is_its_own_field_not_metadata() -> None:
    value = {"id": "p-1", "uri": "s3://b/k", "prompt": "a photo of", "tenant": "acme"}
    [request] = parse_message(json.dumps(value).encode()).requests
    assert request.prompt == "a photo of" and request.metadata == {"tenant": "acme"}
    for absent in ({}, {"prompt": None}, {"prompt": ""}, {"prompt": "  "}):  # the model family's default
        [request] = parse_message(json.dumps({"id": "p", "uri": "s3://b/k", **absent}).encode()).requests
        assert request.prompt is None and "prompt" not in request.metadata
    [request] = parse_message(json.dumps({"id": "p", "uri": "s3://b/k", "prompt": "two\nlines\t"}).encode()).requests
    assert request.prompt == "two\nlines\t"
    # An S3 event carries none.
    [from_event] = parse_message(event(created("photos", "a.jpg"))).requests
    assert from_event.prompt is None


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        (["a", "list"], "the request's prompt must be a string, not list"),
        (7, "the request's prompt must be a string, not int"),
        ("x" * 1001, "the request's prompt is 1001 characters long, over the limit of 1000"),
        ("bell\u0007", "the request's prompt holds a control character (U+0007) at position 4"),
    ],
)
def test_a_bad_prompt_makes_the_request_malformed_naming_the_field(prompt: Any, words: str) -> None:
    value = {"id": "p-2", "uri": "s3://b/k", "prompt": prompt}
    with pytest.raises(MalformedMessage) as caught:
        parse_message(json.dumps(value).encode())
    assert caught.value.id == "p-2" and caught.value.original == value
    assert words in caught.value.message
