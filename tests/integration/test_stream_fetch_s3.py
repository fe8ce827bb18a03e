"""The worker's fetcher against the real S3 server (SeaweedFS): reads, missing keys, the store's own
refusal, the size limit, and refused buckets that never cause a request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from captionfleet.core.failures import FetchError
from captionfleet.core.settings import FetchSettings, S3Settings
from captionfleet.worker.fetch import Fetcher
from tests.hostile_images import jpeg_bytes
from tests.services.seaweedfs import SeaweedS3

pytestmark = pytest.mark.integration


def fetcher(server: SeaweedS3, buckets: list[str], *, readonly: bool = False, max_bytes: int = 1_000_000) -> Fetcher:
    keys = (
        (server.readonly_access_key, server.readonly_secret_key) if readonly else (server.access_key, server.secret_key)
    )
    s3 = S3Settings(endpoint_url=server.endpoint_url, access_key_id=keys[0], secret_access_key=keys[1])
    return Fetcher(FetchSettings(allowed_buckets=buckets, concurrency=4, max_attempts=2), s3=s3, max_bytes=max_bytes)


def count_requests(f: Fetcher) -> list[str]:
    """Every HTTP request the fetcher's client sends, by operation name."""
    seen: list[str] = []
    client: Any = f._client()
    client.meta.events.register("before-send.s3", lambda request, **_: seen.append(request.url))
    return seen


def test_reads_objects_with_bounded_concurrency(s3_server: SeaweedS3, s3_bucket: str) -> None:
    data = jpeg_bytes()
    for i in range(12):
        s3_server.client().put_object(Bucket=s3_bucket, Key=f"in/{i} cat.jpg", Body=data)
    f = fetcher(s3_server, [s3_bucket])
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(f.fetch, [f"s3://{s3_bucket}/in/{i} cat.jpg" for i in range(12)]))
    assert got == [data] * 12


def test_missing_key_is_not_found(s3_server: SeaweedS3, s3_bucket: str) -> None:
    with pytest.raises(FetchError) as info:
        fetcher(s3_server, [s3_bucket]).fetch(f"s3://{s3_bucket}/nope.jpg")
    assert info.value.kind == "not_found"


def test_store_refusal_is_forbidden(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="cat.jpg", Body=jpeg_bytes())
    # Allowed by our policy, but the read-only identity may not read this bucket: the store says no.
    with pytest.raises(FetchError) as info:
        fetcher(s3_server, [s3_bucket], readonly=True).fetch(f"s3://{s3_bucket}/cat.jpg")
    assert info.value.kind == "forbidden"
    assert "grant" in info.value.message


def test_object_over_the_limit_is_too_large(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="big.jpg", Body=b"\xff" * 5000)
    with pytest.raises(FetchError) as info:
        fetcher(s3_server, [s3_bucket], max_bytes=1000).fetch(f"s3://{s3_bucket}/big.jpg")
    assert info.value.kind == "too_large"


def test_bucket_off_the_list_is_refused_without_a_request(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="cat.jpg", Body=jpeg_bytes())
    f = fetcher(s3_server, ["some-other-bucket"])
    sent = count_requests(f)
    with pytest.raises(FetchError) as info:
        f.fetch(f"s3://{s3_bucket}/cat.jpg")
    assert info.value.kind == "forbidden"
    assert sent == []
    allowed = fetcher(s3_server, [s3_bucket])
    sent = count_requests(allowed)
    allowed.fetch(f"s3://{s3_bucket}/cat.jpg")
    assert len(sent) == 1  # the counter does see requests
