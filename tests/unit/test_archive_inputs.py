"""Input files of the archive job: an S3 body that breaks half-way is read on from where it stopped."""

from __future__ import annotations

import io
from typing import Any

import pytest
from botocore.exceptions import ResponseStreamingError

from captionfleet.core.s3 import RetryPolicy
from captionfleet.worker.connectors.archive_inputs import InputFile, InputReader, InputReadError

DATA = bytes(range(256)) * 40


class BreakingBody:
    def __init__(self, data: bytes, break_after: int | None) -> None:
        self._data = io.BytesIO(data)
        self._left = break_after

    def read(self, size: int = -1) -> bytes:
        if self._left is not None and self._left <= 0:
            raise ResponseStreamingError(error="connection reset")
        chunk = self._data.read(size if self._left is None else min(size if size >= 0 else self._left, self._left))
        if self._left is not None:
            self._left -= len(chunk)
        return chunk

    def close(self) -> None:
        pass


class FlakyStore:
    """Every body breaks after ``break_after`` bytes, ``breaks`` times."""

    def __init__(self, breaks: int, break_after: int = 1000) -> None:
        self.breaks = breaks
        self.break_after = break_after
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        start = int(kwargs["Range"].split("=")[1].rstrip("-")) if "Range" in kwargs else 0
        breaking = len(self.calls) <= self.breaks
        return {"Body": BreakingBody(DATA[start:], self.break_after if breaking else None)}


def read_all(store: FlakyStore, attempts: int = 3) -> bytes:
    reader = InputReader(store, RetryPolicy(attempts=attempts, base_s=0, sleep=lambda _: None))  # type: ignore[arg-type]
    inp = InputFile("s3://bucket/shards/0.tar", "0.tar", len(DATA), '"etag-1"')
    chunks = []
    with reader.open(inp) as body:
        while chunk := body.read(700):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_cut_half_way_is_read_on_with_a_ranged_get_of_the_same_version() -> None:
    store = FlakyStore(breaks=2)
    assert read_all(store) == DATA
    assert [call.get("Range") for call in store.calls] == [None, "bytes=1000-", "bytes=2000-"]
    assert all(call["IfMatch"] == '"etag-1"' for call in store.calls)


def test_a_body_that_keeps_breaking_is_an_input_read_error_not_an_oserror() -> None:
    with pytest.raises(InputReadError, match="reading stopped at byte") as info:
        read_all(FlakyStore(breaks=99, break_after=0), attempts=2)
    assert not isinstance(info.value, OSError)  # never taken for a damaged tar
