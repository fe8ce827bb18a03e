"""core.s3: the one GET-with-retry reader and the one set of S3 error codes, as the stream's fetcher
and the bulk job's reader both use them (each maps the errors to its own failure kinds)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from botocore.exceptions import (
    CredentialRetrievalError,
    EndpointConnectionError,
    IncompleteReadError,
    ProxyConnectionError,
    SSLError,
)

from captionfleet.core.failures import FetchError
from captionfleet.core.s3 import ObjectTooLarge, RetryPolicy, is_not_found, object_failure, read_object
from captionfleet.core.settings import FetchSettings, S3Settings
from captionfleet.worker.connectors.s3_listing import S3Object
from captionfleet.worker.connectors.s3_reader import S3Reader
from captionfleet.worker.fetch import Fetcher
from tests.unit.test_s3_fake import FakeS3, client_error, slow_down


class Body(io.BytesIO):
    """A response body that remembers how much was asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []

    def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        self.asked.append(amt)
        return super().read(amt)


class OneObject:
    def __init__(self, data: bytes, declared: int | None = None) -> None:
        self.body = Body(data)
        self.declared = len(data) if declared is None else declared

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        return {"Body": self.body, "ContentLength": self.declared, "ETag": '"e"'}


def no_wait() -> RetryPolicy:
    return RetryPolicy(attempts=3, sleep=lambda _: None)


def test_reads_at_most_one_byte_over_the_limit_and_closes_the_body() -> None:
    store = OneObject(b"x" * 100, declared=10)  # the object grew past what was announced
    with pytest.raises(ObjectTooLarge) as info:
        read_object(store, "b", "k", retry=no_wait(), what="s3://b/k", max_bytes=50)  # type: ignore[arg-type]
    assert info.value.declared is None and info.value.limit == 50
    assert store.body.asked == [51] and store.body.closed


def test_an_announced_length_over_the_limit_is_refused_unread() -> None:
    store = OneObject(b"x" * 100)
    with pytest.raises(ObjectTooLarge) as info:
        read_object(store, "b", "k", retry=no_wait(), what="s3://b/k", max_bytes=50, refuse_declared=True)  # type: ignore[arg-type]
    assert info.value.declared == 100
    assert store.body.asked == []
    fetched = read_object(OneObject(b"abc"), "b", "k", retry=no_wait(), what="s3://b/k")  # type: ignore[arg-type]
    assert (fetched.data, fetched.etag, fetched.attempts) == (b"abc", '"e"', 1)


def test_retries_follow_the_policy_given() -> None:
    s3 = FakeS3()
    s3.put("b", "k", b"data")
    s3.fail("GetObject", "k", slow_down())
    assert read_object(s3, "b", "k", retry=no_wait(), what="s3://b/k").attempts == 2
    s3.fail("GetObject", "k", slow_down())
    never = RetryPolicy(attempts=3, sleep=lambda _: None, retryable=lambda _: False)
    with pytest.raises(Exception, match="SlowDown"):
        read_object(s3, "b", "k", retry=never, what="s3://b/k")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("NoSuchKey", 404, "not_found"),
        ("NoSuchBucket", 404, "not_found"),
        ("AccessDenied", 403, "forbidden"),
        ("ExpiredToken", 400, "forbidden"),
        ("InternalError", 500, "unavailable"),
        ("SlowDown", 503, "unavailable"),
        ("RequestTimeout", 400, "timeout"),
    ],
)
def test_the_fetcher_and_the_bulk_reader_read_the_same_codes_alike(code: str, status: int, kind: str) -> None:
    s3 = FakeS3()
    s3.put("images", "cat.jpg", b"jpeg")
    s3.fail("GetObject", "cat.jpg", *[client_error(code, status)] * 3)
    fetcher = Fetcher(
        FetchSettings(allowed_buckets=["images"], max_attempts=3),
        s3=S3Settings(),
        max_bytes=1000,
        s3_client=s3,  # type: ignore[arg-type]
        sleep=lambda _: None,
    )
    with pytest.raises(FetchError) as fetched:
        fetcher.fetch("s3://images/cat.jpg")
    assert fetched.value.kind == kind
    s3.faults.clear()
    s3.fail("GetObject", "cat.jpg", *[client_error(code, status)] * 3)
    with pytest.raises(FetchError) as read:
        S3Reader(s3, retry=no_wait()).get(S3Object("images", "cat.jpg", s3.etag("images", "cat.jpg"), 4))
    assert read.value.kind == kind


def test_not_found_is_the_key_not_the_bucket() -> None:
    assert is_not_found(client_error("NoSuchKey", 404))
    assert not is_not_found(client_error("NoSuchBucket", 404))
    assert not is_not_found(ValueError("not an S3 error"))


class DroppedBody(Body):
    def read(self, amt: int | None = None) -> bytes:
        raise IncompleteReadError(actual_bytes=1, expected_bytes=4)


class CutShort:
    """A store whose first responses end early (the connection dropped mid-body), then answer whole."""

    def __init__(self, data: bytes, failures: int) -> None:
        self.data, self.failures, self.calls = data, failures, 0

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        body = DroppedBody(b"") if self.calls <= self.failures else Body(self.data)
        return {"Body": body, "ContentLength": len(self.data)}


def _fetcher(client: Any, attempts: int = 3) -> Fetcher:
    return Fetcher(
        FetchSettings(allowed_buckets=["images"], max_attempts=attempts),
        s3=S3Settings(),
        max_bytes=1000,
        s3_client=client,
        sleep=lambda _: None,
    )


def test_the_fetcher_retries_a_body_cut_short_as_the_bulk_reader_does() -> None:
    # One S3 vocabulary for both readers (core/s3.py): a dropped connection is transient, not a bad object.
    store = CutShort(b"jpeg", failures=2)
    assert _fetcher(store).fetch("s3://images/cat.jpg") == b"jpeg"
    assert store.calls == 3
    with pytest.raises(FetchError) as fetched:
        _fetcher(CutShort(b"jpeg", failures=3)).fetch("s3://images/cat.jpg")
    assert fetched.value.kind == "unavailable" and "gave up after 3 attempts" in str(fetched.value)


@pytest.mark.parametrize("code", ["RequestThrottled", "TooManyRequests", "RequestTimeoutException"])
def test_the_fetcher_retries_throttling_codes_whatever_their_status(code: str) -> None:
    s3 = FakeS3()
    s3.put("images", "cat.jpg", b"jpeg")
    s3.fail("GetObject", "cat.jpg", *[client_error(code, 400)] * 2)
    assert _fetcher(s3).fetch("s3://images/cat.jpg") == b"jpeg"


@pytest.mark.parametrize(
    "error",
    [
        SSLError(endpoint_url="https://s3.example", error="EOF occurred in violation of protocol"),
        ProxyConnectionError(proxy_url="http://proxy:3128", error="refused"),
        EndpointConnectionError(endpoint_url="https://s3.example"),
        CredentialRetrievalError(provider="assume-role-with-web-identity", error_msg="STS unavailable"),
    ],
)
def test_a_broken_way_to_the_store_is_unavailable_not_the_objects_fault(error: Exception) -> None:
    # A restarting TLS load balancer, a proxy, STS hiccuping: waited out as an outage by the stream (and
    # named alike by the bulk reader), never dead-lettered at once as a plain fetch failure.
    failure = object_failure(error, "s3://images/cat.jpg")
    assert failure is not None and failure.kind == "unavailable"
