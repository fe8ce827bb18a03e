"""Retries, backoff and error mapping of the S3 source, against the in-memory fake (no server).

What matters: throttling (503 SlowDown), 5xx and timeouts are retried with growing, capped waits;
missing and forbidden objects are not; whatever remains becomes the exception the pipeline turns
into the right failure kind, and a whole run keeps going past every bad object.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
from PIL import Image

from captionfleet.core.captioner import KeptImage, ModelInput
from captionfleet.core.failures import FetchError, ImageError
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.s3 import RetryPolicy, access_error, is_retryable
from captionfleet.core.settings import BatchSettings
from captionfleet.worker.connectors.s3_listing import S3Object, list_pages
from captionfleet.worker.connectors.s3_reader import Prefetcher, S3Reader
from captionfleet.worker.fetch import _s3_failure
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline
from tests.unit.test_s3_fake import FakeS3, client_error, read_timeout, slow_down


def png(red: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


class Recorder:
    """RetryPolicy's sleep and random, recorded: no real waiting, and the waits can be checked."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def policy(self, attempts: int = 5, base_s: float = 0.1, max_s: float = 1.0) -> RetryPolicy:
        return RetryPolicy(attempts=attempts, base_s=base_s, max_s=max_s, sleep=self.sleeps.append, random=lambda: 1.0)


def obj(s3: FakeS3, key: str, bucket: str = "b") -> S3Object:
    return S3Object(bucket, key, s3.etag(bucket, key), len(s3.objects[(bucket, key)]))


@pytest.fixture
def s3() -> FakeS3:
    fake = FakeS3()
    fake.put("b", "ok.png", png())
    return fake


def test_backoff_doubles_up_to_the_cap_with_full_jitter() -> None:
    waits = [RetryPolicy(base_s=0.1, max_s=1.0, random=lambda: 1.0).backoff(n) for n in range(1, 7)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    # Full jitter: the wait is a uniform fraction of the ceiling, so throttled workers spread out.
    assert RetryPolicy(base_s=0.1, max_s=1.0, random=lambda: 0.25).backoff(3) == pytest.approx(0.1)


def test_slow_down_is_retried_with_backoff_until_it_succeeds(s3: FakeS3) -> None:
    rec = Recorder()
    s3.fail("GetObject", "ok.png", slow_down(), slow_down(), client_error("InternalError", 500))
    fetched = S3Reader(s3, retry=rec.policy()).get(obj(s3, "ok.png"))
    assert fetched.data == png()
    assert fetched.attempts == 4
    assert rec.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert fetched.etag == s3.etag("b", "ok.png")


def test_a_timeout_while_reading_the_body_is_retried(s3: FakeS3) -> None:
    rec = Recorder()
    s3.fail("GetObject.body", "ok.png", read_timeout())
    fetched = S3Reader(s3, retry=rec.policy()).get(obj(s3, "ok.png"))
    assert fetched.data == png() and fetched.attempts == 2


@pytest.mark.parametrize(
    ("errors", "kind", "calls"),
    [
        ([read_timeout()] * 3, "timeout", 3),  # still timing out after every attempt
        ([ConnectTimeoutError(endpoint_url="x")] * 3, "timeout", 3),
        # Still throttled or failing: the kind the streaming fetcher names too, worth --retry-failed later.
        ([slow_down()] * 3, "unavailable", 3),
        ([client_error("InternalError", 500)] * 3, "unavailable", 3),
        ([client_error("NoSuchKey", 404)], "not_found", 1),  # deleted since listing: no retry
        ([client_error("NoSuchBucket", 404)], "not_found", 1),  # as the streaming fetcher names it
        ([client_error("AccessDenied", 403)], "forbidden", 1),  # no retry either
    ],
)
def test_final_errors_map_to_the_failure_kinds_the_stream_names(
    s3: FakeS3, errors: list[Exception], kind: str, calls: int
) -> None:
    rec = Recorder()
    s3.fail("GetObject", "ok.png", *errors)
    with pytest.raises(FetchError) as raised:
        S3Reader(s3, retry=rec.policy(attempts=3)).get(obj(s3, "ok.png"))
    assert raised.value.kind == kind
    assert "s3://b/ok.png" in str(raised.value)  # the message names the object
    assert s3.calls["GetObject:ok.png"] == calls
    assert len(rec.sleeps) == calls - 1
    # The same store answer read by the streaming fetcher is the same kind.
    streamed = _s3_failure(errors[-1], "s3://b/ok.png")
    assert getattr(streamed, "kind", None) == kind


def test_too_large_objects_and_empty_ones_are_not_downloaded(s3: FakeS3) -> None:
    s3.put("b", "huge.jpg", b"\xff" * 2000)
    s3.put("b", "empty.jpg", b"")
    reader = S3Reader(s3, max_bytes=1000)
    with pytest.raises(ImageError) as too_large:
        reader.get(obj(s3, "huge.jpg"))
    assert too_large.value.kind == "too_large"
    assert reader.get(obj(s3, "empty.jpg")).data == b""
    assert s3.calls["GetObject"] == 0


def test_retryable_errors() -> None:
    assert is_retryable(slow_down())
    assert is_retryable(client_error("Whatever", 502))
    assert is_retryable(client_error("TooManyRequests", 429))
    assert is_retryable(read_timeout())
    assert is_retryable(EndpointConnectionError(endpoint_url="x"))
    assert not is_retryable(client_error("NoSuchKey", 404))
    assert not is_retryable(client_error("AccessDenied", 403))
    assert not is_retryable(ValueError("a bug, not the network"))


def test_listing_follows_pages_and_retries_a_throttled_page() -> None:
    s3 = FakeS3()
    for i in range(25):
        s3.put("b", f"imgs/{i:02d}.png", b"x" * i)
    s3.put("b", "other/x.png", b"x")
    s3.fail("ListObjectsV2", "imgs/", slow_down())
    rec = Recorder()
    pages = list(list_pages(s3, "b", "imgs/", page_size=10, retry=rec.policy()))
    assert [len(page) for page in pages] == [10, 10, 5]
    keys = [o.key for page in pages for o in page]
    assert keys == [f"imgs/{i:02d}.png" for i in range(25)]
    assert pages[2][4].size == 24 and pages[0][0].etag.startswith('"')
    assert len(rec.sleeps) == 1


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "WORKER_S3__ENDPOINT_URL"),
        (client_error("NoSuchBucket", 404, "ListObjectsV2"), "bucket does not exist"),
        (client_error("AccessDenied", 403, "ListObjectsV2"), "WORKER_S3__ACCESS_KEY_ID"),
        (client_error("InvalidAccessKeyId", 403, "ListObjectsV2"), "rejected the credentials"),
    ],
)
def test_job_level_errors_name_the_fix(error: Exception, needle: str) -> None:
    message = str(access_error(error, "list", "s3://b/imgs/", "http://127.0.0.1:1"))
    assert needle in message
    assert "s3://b/imgs/" in message


# -- through the real pipeline: one bad object never stops the others ---------------------------------


class RedPreprocess:
    def array(self, image: Image.Image) -> np.ndarray:
        return np.full((3, 2, 2), image.getpixel((0, 0))[0], dtype=np.float32)  # type: ignore[index]


class FakeCaptioner:
    """The surface the pipeline uses (version, draft_size, prepare, caption_inputs)."""

    version = "fake-1"
    family = "fake"  # not a listed family: takes prompts, as the generic rule does
    draft_size = (2, 2)

    def __init__(self) -> None:
        self.preprocess = RedPreprocess()

    def prepare(self, image: Image.Image, prompt: str | None = None, *, origin: object = None) -> ModelInput:
        pixels = self.preprocess.array(image)
        return ModelInput({"red": int(pixels[0, 0, 0])}, cost=4, key="fake", prompt=prompt, origin=KeptImage(image))

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        return [Caption(f"red {item.features['red']}", -1.0, 2) for item in inputs]


class ListSink:
    def __init__(self) -> None:
        self.rows: list[Result] = []

    def done_ids(self) -> set[str]:
        return {r.id for r in self.rows}

    def write(self, results: list[Result]) -> None:
        self.rows.extend(results)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_pipeline_gives_each_bad_object_its_failure_kind() -> None:
    s3 = FakeS3()
    for name in ("good1", "gone", "denied", "slow", "throttled", "flaky", "huge", "good2"):
        s3.put("b", name, png(red=len(name)))
    s3.fail("GetObject", "denied", client_error("AccessDenied", 403))
    s3.fail("GetObject", "slow", *[read_timeout()] * 3)
    s3.fail("GetObject", "throttled", *[slow_down()] * 3)
    s3.fail("GetObject", "flaky", slow_down(), read_timeout())  # recovers on the third attempt
    listed = [obj(s3, key) for key in ("good1", "gone", "denied", "slow", "throttled", "flaky", "huge", "good2")]
    del s3.objects[("b", "gone")]  # deleted after it was listed
    listed[6] = S3Object("b", "huge", listed[6].etag, 10_000)  # listed as larger than the limit

    rec = Recorder()
    reader = S3Reader(s3, retry=rec.policy(attempts=3), max_bytes=5_000)
    sink = ListSink()
    pipeline = CaptionPipeline(FakeCaptioner(), sink, BatchSettings(max_items=3, max_wait_ms=5), ImageLimits())  # type: ignore[arg-type]
    with Prefetcher(reader, concurrency=4) as fetcher:
        stats = pipeline.run(fetcher.items(listed))

    kinds: dict[str, Any] = {row.id: row.error_kind for row in sink.rows}
    assert kinds == {
        "good1": None,
        "gone": "not_found",
        "denied": "forbidden",
        "slow": "timeout",
        "throttled": "unavailable",
        "flaky": None,
        "huge": "too_large",
        "good2": None,
    }
    assert stats.done == 3 and stats.failed == 5
    assert {row.id: row.caption for row in sink.rows if row.ok} == {
        "good1": "red 5",
        "flaky": "red 5",
        "good2": "red 5",
    }


def test_prefetcher_keeps_order_and_bounds_what_is_fetched_ahead() -> None:
    s3 = FakeS3()
    for i in range(40):
        s3.put("b", f"{i:02d}", png())
    started: list[str] = []
    s3.on_call = lambda op, kwargs: started.append(kwargs["Key"]) if op == "GetObject" else None
    fetcher = Prefetcher(S3Reader(s3), concurrency=3)
    items = fetcher.items(obj(s3, f"{i:02d}") for i in range(40))
    first = next(items)
    # Taking the first item started at most 2 * concurrency GETs: the window, not the whole listing.
    assert len(started) <= 6
    assert first.read() == png()
    rest = list(items)
    fetcher.close()
    assert [item.id for item in [first, *rest]] == [f"{i:02d}" for i in range(40)]
    assert all(item.read() == png() for item in rest)
    assert rest[0].attempts == 1 and rest[0].fetch_ms is not None


def test_an_object_grown_past_the_limit_since_it_was_listed_is_not_downloaded_whole(s3: FakeS3) -> None:
    s3.put("b", "grown.png", b"\x89PNG" + b"\0" * 5000)
    listed = S3Object("b", "grown.png", s3.etag("b", "grown.png"), size=100)  # what the listing said
    with pytest.raises(ImageError, match="more than 1000 bytes") as refused:
        S3Reader(s3, max_bytes=1000).get(listed)
    assert refused.value.kind == "too_large"
    assert S3Reader(s3, max_bytes=10_000).get(listed).data == s3.objects[("b", "grown.png")]
