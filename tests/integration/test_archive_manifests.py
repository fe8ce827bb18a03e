"""Manifests of image urls, as img2dataset writes them, stored in the real S3 server, with the images on a
local http server (127.0.0.1) that is slow, fails, redirects to a host that is not allowed, opts images out
with X-Robots-Tag, and counts how many requests it holds at once; plus s3:// uris into an allowed bucket.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captionfleet.core.captioner import Captioner
from captionfleet.core.failures import FetchError
from captionfleet.core.settings import DecodingSettings, FetchSettings, S3Settings, WorkerSettings
from captionfleet.worker.bulk_archive import ArchiveOptions, run_archive_job
from captionfleet.worker.fetch import Fetcher
from tests.hostile_images import jpeg_bytes
from tests.integration.test_bulk_s3 import admin_settings
from tests.services.seaweedfs import SeaweedS3
from tests.unit.test_fetch import serving

pytestmark = pytest.mark.integration

JPEG = jpeg_bytes()


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Any) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=8))


class Images(http.server.BaseHTTPRequestHandler):
    """Paths say how to answer. Class state: requests seen, user agents, and the most held at once.

    A request counts as held from its arrival until its answer is decided, not while the answer is written:
    the client holds its host's slot until it has read the answer (or given up on it), so that window lies
    inside the slot's. Counting to the handler's return instead counts a handler still dripping to a client
    that gave up (it notices only at its next write), or one not yet scheduled again after its last write,
    beside the requests the freed slot let in: 3 at once under load, with the client holding 2.
    """

    lock = threading.Lock()
    in_flight = 0
    most_in_flight = 0
    hits: dict[str, int] = {}  # noqa: RUF012 - shared on purpose, reset by the fixture
    agents: set[str] = set()  # noqa: RUF012
    redirect_to = ""

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
            cls.hits[self.path] = cls.hits.get(self.path, 0) + 1
            cls.agents.add(self.headers.get("User-Agent", ""))
            hits = cls.hits[self.path]
        try:
            reply = self.answer(hits)
        finally:
            with cls.lock:
                cls.in_flight -= 1
        reply()

    def answer(self, hits: int) -> Callable[[], None]:
        """Decide the answer (the work a request holds its slot for); returns what writes it."""
        path = self.path
        if path.startswith("/ok/"):
            time.sleep(0.05)  # long enough for requests to overlap
            return lambda: self.send(200, JPEG)
        if path == "/flaky.jpg" and hits == 1:
            return lambda: self.send(503, b"busy")
        if path == "/flaky.jpg":
            return lambda: self.send(200, JPEG)
        if path == "/down.jpg":
            return lambda: self.send(500, b"down")
        if path == "/missing.jpg":
            return lambda: self.send(404, b"")
        if path == "/noai.jpg":
            return lambda: self.send(200, JPEG, {"X-Robots-Tag": "noindex, noai"})
        if path == "/noimageai.jpg":
            return lambda: self.send(200, JPEG, {"X-Robots-Tag": "noimageai"})
        if path == "/other-bot.jpg":
            return lambda: self.send(200, JPEG, {"X-Robots-Tag": "otherbot: noai"})  # another crawler's rule
        if path == "/redirect.jpg":
            return lambda: self.send(302, b"", {"Location": type(self).redirect_to})
        if path == "/big.jpg":
            return lambda: self.send(200, b"\xff\xd8\xff" + bytes(300_000))
        if path == "/slow.jpg":
            return self.drip
        return lambda: self.send(404, b"")

    def drip(self) -> None:
        """Each byte well within the read timeout, the whole far past the deadline; the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[str]:
    Images.hits, Images.agents, Images.most_in_flight, Images.in_flight = {}, set(), 0, 0
    with serving(Images) as port, serving(Images) as forbidden_port:
        Images.redirect_to = f"http://127.0.0.1:{forbidden_port}/ok/elsewhere.jpg"
        yield f"127.0.0.1:{port}"


ROWS = [
    ("ok/0.jpg", None),
    ("ok/1.jpg", None),
    ("flaky.jpg", None),  # 503, then fine: retried
    ("down.jpg", "unavailable"),
    ("missing.jpg", "not_found"),
    ("noai.jpg", "opted_out"),
    ("noimageai.jpg", "opted_out"),
    ("other-bot.jpg", None),
    ("redirect.jpg", "forbidden"),
    ("big.jpg", "too_large"),
    ("slow.jpg", "timeout"),
    *((f"ok/{n}.jpg", None) for n in range(2, 14)),
]


# Tight timeouts so that slow.jpg times out in about a second; the per-host limit below the overall one.
FETCH: dict[str, Any] = {
    "connect_timeout_s": 0.5,
    "read_timeout_s": 0.5,
    "max_attempts": 2,
    "backoff_initial_ms": 10,
    "backoff_max_ms": 20,
    "per_host_concurrency": 2,
    "concurrency": 8,
    "user_agent": "captionfleet-test/1.0 (ops@example.invalid)",
}


def manifest_settings(server: SeaweedS3, host: str, bucket: str, **fetch: Any) -> WorkerSettings:
    settings = admin_settings(server)
    settings.images.max_bytes = 200_000
    settings.fetch = settings.fetch.model_copy(
        update={"allowed_hosts": [host], "allowed_buckets": [bucket], **FETCH, **fetch}
    )
    return settings


def test_an_img2dataset_manifest_on_s3_is_captioned_beside_itself(
    s3_server: SeaweedS3, s3_bucket: str, image_host: str, captioner: Captioner
) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="images/in-s3.jpg", Body=JPEG)
    urls = [f"http://{image_host}/{path}" for path, _ in ROWS]
    urls += [f"s3://{s3_bucket}/images/in-s3.jpg", f"s3://{s3_bucket}/images/nope.jpg", "http://elsewhere.invalid/x"]
    expected = [kind for _, kind in ROWS] + [None, "not_found", "forbidden"]
    table = pa.table(
        {"url": urls, "caption": [f"alt {i}" for i in range(len(urls))], "key": [f"{i:09d}" for i in range(len(urls))]}
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=s3_bucket, Key="manifests/part-00000.parquet", Body=buf.getvalue())

    summary = run_archive_job(
        f"s3://{s3_bucket}/manifests/",
        f"s3://{s3_bucket}/captions/",
        manifest_settings(s3_server, image_host, s3_bucket),
        options=ArchiveOptions(input_format="manifest"),
        show_progress=False,
        captioner=captioner,
    )
    body = client.get_object(Bucket=s3_bucket, Key="captions/part-00000.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    assert [row["key"] for row in rows] == table.column("key").to_pylist()  # every input row, in order
    assert [row["original_caption"] for row in rows] == table.column("caption").to_pylist()
    assert [row["error_kind"] for row in rows] == expected, [(r["url"], r["error_message"]) for r in rows]
    by_url = {row["url"]: row for row in rows}
    assert "X-Robots-Tag: noai" in by_url[f"http://{image_host}/noai.jpg"]["error_message"]
    assert "not received within 1s" in by_url[f"http://{image_host}/slow.jpg"]["error_message"]
    assert "gave up after 2 attempts" in by_url[f"http://{image_host}/down.jpg"]["error_message"]
    assert Images.hits["/flaky.jpg"] == 2 and Images.hits["/down.jpg"] == 2
    assert "/ok/elsewhere.jpg" not in Images.hits  # the redirect was refused, never followed
    assert Images.agents == {"captionfleet-test/1.0 (ops@example.invalid)"}
    assert Images.most_in_flight == 2  # per-host limit, with 8 fetches allowed in all
    assert summary.done == expected.count(None) and summary.files_finished == 1


def test_opt_out_can_be_turned_off(
    s3_server: SeaweedS3, s3_bucket: str, image_host: str, captioner: Captioner, tmp_path: Any
) -> None:
    (tmp_path / "m.jsonl").write_text(f'{{"url": "http://{image_host}/noai.jpg"}}\n')
    settings = manifest_settings(s3_server, image_host, s3_bucket, honour_opt_out=False)
    run_archive_job(
        str(tmp_path / "m.jsonl"), str(tmp_path / "out"), settings, show_progress=False, captioner=captioner
    )
    rows = pq.read_table(tmp_path / "out" / "m.parquet").to_pylist()
    assert rows[0]["error_kind"] is None and rows[0]["caption"] is not None


def test_a_slot_freed_by_a_timed_out_attempt_keeps_the_host_within_its_limit(image_host: str) -> None:
    """Requests queued for a host while one of its two slots drips past the deadline: the slot it frees goes
    to the next request, and the host still never has more than two at once (with 8 fetches allowed)."""
    fetcher = Fetcher(FetchSettings(allowed_hosts=[image_host], **FETCH), s3=S3Settings(), max_bytes=200_000)
    urls = [f"http://{image_host}/slow.jpg"] + [f"http://{image_host}/ok/{n}.jpg" for n in range(40)]

    def kind(url: str) -> str | None:
        try:
            fetcher.fetch(url)
        except FetchError as error:
            return error.kind
        return None

    with ThreadPoolExecutor(8) as pool:
        kinds = list(pool.map(kind, urls))
    assert kinds == ["timeout"] + [None] * 40
    assert Images.hits["/slow.jpg"] == 2 and Images.most_in_flight == 2
