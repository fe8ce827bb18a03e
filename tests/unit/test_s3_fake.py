"""An in-memory S3 implementing the calls the bulk job makes (``core.s3.ObjectStore``).

It raises the exceptions botocore raises (ClientError with S3's codes, ReadTimeoutError, ...), and
faults can be scripted per key, so the job's own logic (retries, error mapping, resume, compaction)
is tested without a server. The tests below keep the fake honest about the S3 behaviour relied on.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError


def client_error(code: str, status: int, operation: str = "GetObject", message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message or code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def slow_down() -> ClientError:
    return client_error("SlowDown", 503, message="Please reduce your request rate.")


def read_timeout() -> ReadTimeoutError:
    return ReadTimeoutError(endpoint_url="http://fake-s3/bucket/key")


class FlakyBody:
    """A response body whose first read fails: a timeout half-way through the stream."""

    def __init__(self, data: bytes, error: Exception | None) -> None:
        self._data = io.BytesIO(data)
        self._error = error

    def read(self, amt: int | None = None) -> bytes:  # botocore's StreamingBody.read(amt=None)
        if self._error is not None:
            raise self._error
        return self._data.read(amt)


@dataclass
class FakeS3:
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    buckets: set[str] = field(default_factory=set)
    # (operation, key) -> errors raised by the next calls, in order; "GetObject.body" fails the body read.
    faults: dict[tuple[str, str], list[Exception]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    denied_buckets: set[str] = field(default_factory=set)
    on_call: Callable[[str, dict[str, Any]], None] | None = None

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.buckets.add(bucket)
        self.objects[(bucket, key)] = data

    def fail(self, operation: str, key: str, *errors: Exception) -> None:
        self.faults.setdefault((operation, key), []).extend(errors)

    def etag(self, bucket: str, key: str) -> str:
        return '"' + hashlib.md5(self.objects[(bucket, key)]).hexdigest() + '"'

    def _enter(self, operation: str, bucket: str, key: str, kwargs: dict[str, Any]) -> None:
        self.calls[operation] += 1
        self.calls[f"{operation}:{key}"] += 1
        if self.on_call is not None:
            self.on_call(operation, kwargs)
        pending = self.faults.get((operation, key))
        if pending:
            raise pending.pop(0)
        if bucket not in self.buckets:
            raise client_error("NoSuchBucket", 404, operation)
        if bucket in self.denied_buckets:
            raise client_error("AccessDenied", 403, operation)

    # -- the ObjectStore protocol --------------------------------------------------------------------

    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        bucket, prefix = kwargs["Bucket"], kwargs.get("Prefix", "")
        self._enter("ListObjectsV2", bucket, prefix, kwargs)
        keys = sorted(key for (b, key) in self.objects if b == bucket and key.startswith(prefix))
        start = int(kwargs.get("ContinuationToken", "0"))
        delimiter = kwargs.get("Delimiter")
        if delimiter:
            common = sorted(
                {
                    prefix + k[len(prefix) :].split(delimiter)[0] + delimiter
                    for k in keys
                    if delimiter in k[len(prefix) :]
                }
            )
            keys = [k for k in keys if delimiter not in k[len(prefix) :]]
        else:
            common = []
        page = keys[start : start + kwargs.get("MaxKeys", 1000)]
        truncated = start + len(page) < len(keys)
        response: dict[str, Any] = {
            "Contents": [
                {"Key": key, "ETag": self.etag(bucket, key), "Size": len(self.objects[(bucket, key)])} for key in page
            ],
            "IsTruncated": truncated,
            "CommonPrefixes": [{"Prefix": p} for p in common],
        }
        if not page:
            del response["Contents"]  # as S3 does: no Contents at all for an empty page
        if truncated:
            response["NextContinuationToken"] = str(start + len(page))
        return response

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        self._enter("GetObject", bucket, key, kwargs)
        if (bucket, key) not in self.objects:
            raise client_error("NoSuchKey", 404)
        body_faults = self.faults.get(("GetObject.body", key))
        error = body_faults.pop(0) if body_faults else None
        return {"Body": FlakyBody(self.objects[(bucket, key)], error), "ETag": self.etag(bucket, key)}

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        self._enter("PutObject", bucket, key, kwargs)
        self.objects[(bucket, key)] = bytes(kwargs["Body"])
        return {"ETag": self.etag(bucket, key)}

    def delete_object(self, **kwargs: Any) -> dict[str, Any]:
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        self._enter("DeleteObject", bucket, key, kwargs)
        self.objects.pop((bucket, key), None)  # deleting a missing key succeeds, as in S3
        return {}


# -- the fake behaves like S3 where the job relies on it ------------------------------------------------


def test_listing_pages_with_continuation_tokens() -> None:
    s3 = FakeS3()
    for i in range(25):
        s3.put("b", f"p/{i:02d}", b"x")
    first = s3.list_objects_v2(Bucket="b", Prefix="p/", MaxKeys=10)
    assert len(first["Contents"]) == 10 and first["IsTruncated"]
    last = s3.list_objects_v2(Bucket="b", Prefix="p/", MaxKeys=10, ContinuationToken="20")
    assert [o["Key"] for o in last["Contents"]] == [f"p/{i}" for i in range(20, 25)]
    assert not last["IsTruncated"]
    assert "Contents" not in s3.list_objects_v2(Bucket="b", Prefix="nothing/")


def test_missing_key_bucket_and_denied_raise_s3_codes() -> None:
    s3 = FakeS3()
    s3.put("b", "k", b"x")
    s3.denied_buckets.add("b")
    with pytest.raises(ClientError) as denied:
        s3.get_object(Bucket="b", Key="k")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as no_bucket:
        s3.list_objects_v2(Bucket="other", Prefix="")
    assert no_bucket.value.response["Error"]["Code"] == "NoSuchBucket"
    s3.denied_buckets.clear()
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="b", Key="gone")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


def test_scripted_faults_come_first_then_success() -> None:
    s3 = FakeS3()
    s3.put("b", "k", b"data")
    s3.fail("GetObject", "k", slow_down())
    with pytest.raises(ClientError):
        s3.get_object(Bucket="b", Key="k")
    assert s3.get_object(Bucket="b", Key="k")["Body"].read() == b"data"
    assert s3.calls["GetObject:k"] == 2
