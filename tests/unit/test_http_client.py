"""The httpx client behind manifests of urls and the stream's http(s) uris, against a local http server:
what a hostile host can make it do (encoded bodies, slow headers, held slots) and which X-Robots-Tag
opt-outs it honours."""

from __future__ import annotations

import gzip
import http.server
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pytest

from captionfleet.core.failures import FetchError
from captionfleet.core.s3 import RetryPolicy
from captionfleet.core.settings import FetchSettings, S3Settings
from captionfleet.worker.fetch import Fetcher
from captionfleet.worker.http_client import HttpFetcher, opted_out
from tests.unit.test_fetch import serving

IMAGE = b"\xff\xd8\xff" + bytes(range(256)) * 100


class Encoded(http.server.BaseHTTPRequestHandler):
    """``/<encoding>/<what>``: the body of ``what`` sent with that Content-Encoding, whatever was asked."""

    bodies: ClassVar[dict[str, bytes]] = {
        "gzip/image": gzip.compress(IMAGE),
        "deflate/image": zlib.compress(IMAGE),
        "gzip/bomb": gzip.compress(b"\0" * (64 << 20), 9),  # 64 MiB of zeros in ~64 KiB
        "gzip, gzip/bomb": gzip.compress(gzip.compress(b"\0" * (64 << 20), 9), 9),  # in a few hundred bytes
        "br/image": b"not really brotli",
    }
    asked: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).asked.append(self.headers.get("Accept-Encoding"))
        name = self.path.lstrip("/").replace("%20", " ")
        encoding = name.rpartition("/")[0]
        body = self.bodies[name]
        self.send_response(200)
        self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def host() -> Iterator[str]:
    Encoded.asked = []
    with serving(Encoded) as port:
        yield f"127.0.0.1:{port}"


def client(host: str, max_bytes: int = 1 << 20, **settings: Any) -> HttpFetcher:
    return HttpFetcher(
        FetchSettings(allowed_hosts=[host], **settings), max_bytes=max_bytes, retry=RetryPolicy(attempts=1)
    )


def peak_of(fetch: Any) -> tuple[BaseException | bytes, int]:
    """What ``fetch()`` returned or raised, and the most memory Python held meanwhile."""
    tracemalloc.start()
    try:
        try:
            outcome: BaseException | bytes = fetch()
        except FetchError as error:
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_nested_gzip_is_refused_without_being_inflated(host: str) -> None:
    error, peak = peak_of(lambda: client(host).get_once(f"http://{host}/gzip, gzip/bomb"))
    assert Encoded.asked == ["identity"]
    assert isinstance(error, FetchError) and error.kind == "fetch" and "gzip, gzip" in error.message
    assert peak < 8 << 20  # was hundreds of MiB with a 1 MiB limit


def test_one_gzip_or_deflate_layer_is_decoded_under_the_limit(host: str) -> None:
    assert client(host).get_once(f"http://{host}/gzip/image") == IMAGE
    assert client(host).get_once(f"http://{host}/deflate/image") == IMAGE
    error, peak = peak_of(lambda: client(host).get_once(f"http://{host}/gzip/bomb"))
    assert isinstance(error, FetchError) and error.kind == "too_large" and peak < 8 << 20
    with pytest.raises(FetchError, match="Content-Encoding br"):
        client(host).get_once(f"http://{host}/br/image")


class Slow(http.server.BaseHTTPRequestHandler):
    """``/drip``: the headers a byte every 0.2 s (4 s in all); ``/hop/N``: a redirect to ``/hop/N-1`` after
    0.3 s, ``/hop/0`` the image; ``/held``: the image after 1.5 s; anything else at once."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/drip":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n")
            for _ in range(20):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(b": y\r\n\r\nabc")
            return
        if self.path.startswith("/hop/") and self.path != "/hop/0":
            time.sleep(0.3)
            self.send_response(302)
            self.send_header("Location", f"/hop/{int(self.path.rsplit('/', 1)[1]) - 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/held":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_host() -> Iterator[str]:
    with serving(Slow) as port:
        yield f"127.0.0.1:{port}"


def test_one_deadline_covers_the_headers_and_every_redirect_hop(slow_host: str) -> None:
    fetcher = client(slow_host, connect_timeout_s=0.25, read_timeout_s=0.75)  # 1 s an attempt
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetcher.get_once(f"http://{slow_host}/drip")  # every header byte inside the read timeout: took 4 s
    assert time.monotonic() - start < 1.6
    assert info.value.kind == "timeout" and "not received within 1s" in info.value.message
    assert fetcher.get_once(f"http://{slow_host}/hop/2") == IMAGE  # 0.6 s of hops: inside the deadline
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetcher.get_once(f"http://{slow_host}/hop/5")  # 1.5 s of hops, each one quick enough: took 1.5 s
    assert info.value.kind == "timeout" and time.monotonic() - start < 1.4


def test_a_slow_host_queue_holds_no_slot_another_host_needs(slow_host: str) -> None:
    """Per-host slot first, then the fetcher's own: requests queued for a busy host wait without one."""
    with serving(Slow) as other:
        fast = f"127.0.0.1:{other}"
        fetcher = Fetcher(
            FetchSettings(allowed_hosts=[slow_host, fast], concurrency=2, per_host_concurrency=1, read_timeout_s=5),
            s3=S3Settings(),
            max_bytes=1 << 20,
        )
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(fetcher.fetch, f"http://{slow_host}/held") for _ in range(3)]
            time.sleep(0.3)  # one holds the slow host's slot, two wait for it
            start = time.monotonic()
            assert fetcher.fetch(f"http://{fast}/now.jpg") == IMAGE
            waited = time.monotonic() - start
            assert [future.result() for future in held] == [IMAGE] * 3
    assert waited < 0.8  # was until a slow one finished: the waiting ones held both of the fetcher's slots


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], "noai"),
        (["noindex, noimageai"], "noimageai"),
        (["max-image-preview:large, noai"], "noai"),  # a valued directive is not a bot: was ignored
        (["unavailable_after: 2030-01-01, noimageai"], "noimageai"),  # was ignored
        (["max-snippet: 20, max-video-preview:-1, noai"], "noai"),
        (["unavailable_after: Friday, 25-Jun-30 15:00:00 PST, noai"], "noai"),  # a date with a comma
        (["otherbot: noai"], None),  # someone else's rule
        (["otherbot: max-image-preview:large, noai"], None),
        (["otherbot: noindex", "noai"], "noai"),  # each header value on its own
        (["captionfleet: noai"], "noai"),
        (["*: noimageai"], "noimageai"),
        (["otherbot: noindex, captionfleet: noai"], "noai"),
        (["noindex, nofollow", "max-image-preview:none"], None),
    ],
)
def test_opt_out_directives(values: list[str], expected: str | None) -> None:
    assert opted_out(values, "CaptionFleet/1.0 (ops@example.invalid)") == expected
