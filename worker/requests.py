"""Kafka message values -> caption requests.

Two shapes are accepted as they are:

- our own request: ``{"id": "...", "uri": "s3://bucket/key", "prompt": "...", ...}``; ``prompt`` is
  optional (absent, null or blank: the model family's default; else text, see core/prompt_input.py);
  every other field is request metadata, passed through to the result untouched (a ``"metadata"``
  object is passed as it is);
- an S3 event notification, as S3 and S3-compatible stores publish it: ``{"Records": [{"eventName":
  "ObjectCreated:Put", "s3": {"bucket": {"name": ...}, "object": {"key": ...}}}, ...]}``, one
  request per created object. Its id is the object's uri, so a result says which upload it captions.
  An event carries no prompt: the family's default applies.

Anything else raises :class:`MalformedMessage`, which the worker sends to the dead-letter topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from captionfleet.core.prompt_input import PromptRefused, check_prompt

# Longest id accepted: ids become Kafka keys and log fields.
MAX_ID_CHARS = 1024


class MalformedMessage(Exception):
    """The message is not a request; ``id`` is whatever identifies it (the Kafka key, or a JSON id)."""

    def __init__(self, message: str, *, id: str | None, original: Any) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.original = original


@dataclass(frozen=True)
class Request:
    id: str
    uri: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # What the request came from, for the dead-letter topic: the JSON object or the S3 event record.
    original: Any = None
    prompt: str | None = None  # None: the model family's default


@dataclass(frozen=True)
class Parsed:
    requests: list[Request]
    # S3 events that create nothing to caption (test events, deletions): counted and logged, not failures.
    ignored: list[str] = field(default_factory=list)


def _key_text(key: bytes | None) -> str | None:
    if not key:
        return None
    return key.decode("utf-8", errors="replace")[:MAX_ID_CHARS]


def readable(value: bytes | None) -> Any:
    """The raw value as dead letters carry it: JSON when it parses, else text (undecodable bytes escaped)."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value.decode("utf-8", errors="backslashreplace")


def parse_message(value: bytes | None, key: bytes | None = None) -> Parsed:
    """One Kafka message -> its requests; raises MalformedMessage when it holds none we understand."""
    key_id = _key_text(key)
    if value is None or not value.strip():
        raise MalformedMessage("empty message: send a JSON object with id and uri", id=key_id, original=None)
    try:
        body = json.loads(value)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError too
        raise MalformedMessage(
            f"not JSON ({error}): send a JSON object with id and uri", id=key_id, original=readable(value)
        ) from error
    if not isinstance(body, dict):
        raise MalformedMessage(
            f"a JSON {type(body).__name__}, not an object: send {{'id': ..., 'uri': ...}}", id=key_id, original=body
        )
    if "Records" in body or body.get("Event") == "s3:TestEvent":
        return _parse_s3_event(body, key_id)
    return Parsed([_parse_request(body, key_id)])


def _parse_request(body: dict[str, Any], key_id: str | None) -> Request:
    raw_id = body.get("id")
    # Numbers are fine as ids (they are unambiguous as text); anything else is not.
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id) == "":
        raise MalformedMessage(
            "no id: the request needs a non-empty string id, e.g. {'id': 'upload-123', 'uri': 's3://bucket/key'}",
            id=key_id,
            original=body,
        )
    request_id = str(raw_id)
    if len(request_id) > MAX_ID_CHARS:
        raise MalformedMessage(f"id longer than {MAX_ID_CHARS} characters", id=request_id[:MAX_ID_CHARS], original=body)
    uri = body.get("uri")
    if not isinstance(uri, str) or not uri.strip():
        raise MalformedMessage(
            "no uri: the request needs a uri string, e.g. s3://bucket/key", id=request_id, original=body
        )
    try:
        prompt = check_prompt(body.get("prompt"), field="the request's prompt")
    except PromptRefused as refused:
        raise MalformedMessage(str(refused), id=request_id, original=body) from None
    metadata = {name: value for name, value in body.items() if name not in ("id", "uri", "prompt")}
    nested = metadata.pop("metadata", None)
    if nested is not None and not isinstance(nested, dict):
        raise MalformedMessage("metadata must be a JSON object", id=request_id, original=body)
    # The nested object's fields are the request's metadata; other top-level fields join them.
    return Request(request_id, uri.strip(), {**metadata, **(nested or {})}, original=body, prompt=prompt)


def _parse_s3_event(body: dict[str, Any], key_id: str | None) -> Parsed:
    if body.get("Event") == "s3:TestEvent":  # sent once when a notification is configured
        return Parsed([], ignored=["s3:TestEvent"])
    records = body.get("Records")
    if not isinstance(records, list) or not records:
        raise MalformedMessage("S3 event with no Records", id=key_id, original=body)
    requests: list[Request] = []
    ignored: list[str] = []
    for index, record in enumerate(records):
        try:
            bucket = record["s3"]["bucket"]["name"]
            raw_key = record["s3"]["object"]["key"]
        except (KeyError, TypeError) as error:
            # One bad record spoils the message: the sender's notification format is not what we expect.
            raise MalformedMessage(
                f"S3 event record {index} has no s3.bucket.name / s3.object.key ({error!r})", id=key_id, original=body
            ) from error
        if not isinstance(bucket, str) or not isinstance(raw_key, str) or not bucket or not raw_key:
            raise MalformedMessage(f"S3 event record {index}: empty bucket or key", id=key_id, original=body)
        event_name = str(record.get("eventName", ""))
        # Keys are URL-encoded in notifications (a space arrives as "+").
        key = unquote_plus(raw_key)
        uri = f"s3://{bucket}/{key}"
        if event_name and "ObjectCreated" not in event_name:
            ignored.append(f"{event_name} {uri}")  # deletions and the like: nothing to caption
            continue
        obj = record["s3"]["object"]
        metadata = {
            "source": "s3-event",
            "event_name": event_name,
            "event_time": record.get("eventTime"),
            "etag": obj.get("eTag"),
            "size": obj.get("size"),
            "version_id": obj.get("versionId"),
            "sequencer": obj.get("sequencer"),
        }
        requests.append(Request(uri, uri, {k: v for k, v in metadata.items() if v is not None}, original=record))
    return Parsed(requests, ignored)
