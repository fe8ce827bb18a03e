"""Listing an S3 prefix: ``S3Object`` (what one listed object is) and ``list_pages`` (lazy, paginated,
each page retried)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from captionfleet.core.s3 import DEFAULT_RETRY, ObjectStore, RetryPolicy, S3AccessError


@dataclass(frozen=True)
class S3Object:
    """One listed object. ``etag`` is as S3 sends it (quoted); it changes whenever the content does."""

    bucket: str
    key: str
    etag: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def list_pages(
    client: ObjectStore, bucket: str, prefix: str, *, page_size: int = 1000, retry: RetryPolicy = DEFAULT_RETRY
) -> Iterator[list[S3Object]]:
    """Every object under ``prefix``, one list per page of ``list_objects_v2`` (in key order).

    Lazy: the first page comes back before the rest is listed, so work can start at once.
    """
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page, _ = retry.call(partial(client.list_objects_v2, **kwargs), what=f"list s3://{bucket}/{prefix}")
        yield [
            S3Object(bucket, str(obj["Key"]), str(obj.get("ETag", "")), int(obj.get("Size", 0)))
            for obj in page.get("Contents", [])
        ]
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
        if not token:
            raise S3AccessError(f"listing s3://{bucket}/{prefix} was cut short without a continuation token: retry")
