"""What flows through the stream loop: a request with the message it came from, on its way through the
fetch threads and the model thread and back to the consumer thread as a finished answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from captionfleet.worker.messages import Result
from captionfleet.worker.requests import Request


@dataclass(frozen=True)
class Origin:
    """Where a request came from: named in every log line and dead letter about it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def fields(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(eq=False)
class StreamItem:
    """One request on its way through fetch and the pipeline (a ``pipeline.Item``)."""

    request: Request
    origin: Origin
    epoch: int  # the partition assignment it belongs to; a stale one's result is dropped
    data: bytes = b""
    fetch_ms: float | None = None
    # Set by the consumer thread when its partition is revoked or lost: a read retrying through an outage
    # stops there (its answer would be dropped anyway).
    cancelled: bool = False

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def uri(self) -> str:
        return self.request.uri

    @property
    def prompt(self) -> str | None:
        """The request's prompt (None: the serving model family's default); the pipeline reads it."""
        return self.request.prompt

    def read(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Finished:
    """A request done with: its answer, or None when it was given up unanswered (the worker stopping during an
    outage), which leaves its offset uncommitted so that it is redone."""

    item: StreamItem
    result: Result | None


def where(origin: Origin) -> str:
    """A message's coordinates as log lines write them."""
    return f"{origin.topic}[{origin.partition}]@{origin.offset}"


def names(partitions: Iterable[TopicPartition]) -> str:
    """Partitions as log lines write them."""
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
