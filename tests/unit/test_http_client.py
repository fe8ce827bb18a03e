"""The httpx client behind manifests of urls and the stream's http(s) uris, against a local http server:
what a hostile host can make it do (encoded bodies, slow headers, held slots) and which X-Robots-Tag
opt-outs it honours."""

from __future__ import annotations

import gzip
import http.server
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from captionfleet.core.failures import FetchError
from captionfleet.core.s3 import RetryPolicy
from captionfleet.core.settings import FetchSettings
from captionfleet.worker.http_client import HttpFetcher
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
