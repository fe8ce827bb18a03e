"""Fetching image uris: the allow-list policy (decided before any I/O) and S3 retries, without a server.

The real SeaweedFS server is used in tests/integration/test_stream_fetch_s3.py.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber

from captionfleet.core.failures import FetchError
from captionfleet.core.settings import FetchSettings, S3Settings
from captionfleet.worker.fetch import Fetcher


def fetcher(tmp_path: Path | None = None, client: Any = None, **settings: Any) -> tuple[Fetcher, list[float]]:
    sleeps: list[float] = []
    options: dict[str, Any] = {"allowed_buckets": ["images"], **settings}
    if tmp_path is not None:
        options.setdefault("file_root", tmp_path / "root")
    f = Fetcher(
        FetchSettings(**options),
        s3=S3Settings(),
        max_bytes=1000,
        s3_client=client,
        sleep=sleeps.append,
        jitter=lambda: 1.0,  # the full backoff cap, so waits are predictable
    )
    return f, sleeps


class NoCallsClient:
    """Fails the test if the fetcher ever talks to S3."""

    def get_object(self, **kwargs: Any) -> Any:
        raise AssertionError(f"a refused uri was fetched: {kwargs}")


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("s3://secrets/passwords.txt", "forbidden"),
        ("http://169.254.169.254/latest/meta-data/", "forbidden"),
        ("https://example.com/cat.jpg", "forbidden"),
        ("file:///etc/passwd", "forbidden"),  # no file root configured
        ("ftp://example.com/cat.jpg", "malformed"),
        ("cat.jpg", "malformed"),
        ("s3://images/", "malformed"),
        ("s3:///key", "malformed"),
    ],
)
def test_refused_uris_are_never_fetched(uri: str, kind: str) -> None:
    f, _ = fetcher(client=NoCallsClient())
    with pytest.raises(FetchError) as info:
        f.fetch(uri)
    assert info.value.kind == kind


def test_forbidden_message_names_the_setting() -> None:
    f, _ = fetcher(client=NoCallsClient())
    with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_BUCKETS"):
        f.fetch("s3://other/k.jpg")
    with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_HOSTS"):
        f.fetch("https://example.com/k.jpg")


def test_http_needs_the_host_on_the_list() -> None:
    f, _ = fetcher(allowed_hosts="cdn.example.com")
    assert f.check("https://cdn.example.com/a.jpg")
    with pytest.raises(FetchError) as info:
        f.check("https://cdn.example.com.evil.net/a.jpg")
    assert info.value.kind == "forbidden"


def test_a_url_with_credentials_is_refused_whatever_its_host() -> None:
    f, _ = fetcher(client=NoCallsClient(), allowed_hosts="cdn.example.com")
    for uri in (
        "https://user:secret@cdn.example.com/a.jpg",
        "https://cdn.example.com@evil.example.net/a.jpg",
        "https://evil.example.net@cdn.example.com/a.jpg",
    ):
        with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_HOSTS") as info:
            f.fetch(uri)
        assert info.value.kind == "forbidden", uri


def test_a_bare_host_allows_its_default_port_and_host_port_that_port() -> None:
    f, _ = fetcher(client=NoCallsClient(), allowed_hosts="CDN.example.com, img.example.com:8443, [::1]:8080")
    for uri in (
        "https://cdn.example.com/a.jpg",
        "http://cdn.example.com/a.jpg",
        "https://cdn.example.com:443/a.jpg",
        "http://cdn.example.com:80/a.jpg",
        "https://img.example.com:8443/a.jpg",
        "http://img.example.com:8443/a.jpg",
        "http://[::1]:8080/a.jpg",
    ):
        assert f.check(uri), uri
    for uri in (
        "https://cdn.example.com:8443/a.jpg",  # another service on an allowed host is another target
        "http://cdn.example.com:443/a.jpg",  # 443 is https's default, not http's
        "http://cdn.example.com:6379/",
        "https://img.example.com/a.jpg",  # listed with a port: that port only
        "http://[::1]/a.jpg",
    ):
        with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_HOSTS") as info:
            f.fetch(uri)
        assert info.value.kind == "forbidden", uri


def test_a_bare_ipv6_address_allows_its_default_port() -> None:
    # As before host:port entries existed: urls write it in brackets, the list may not.
    f, _ = fetcher(client=NoCallsClient(), allowed_hosts="fd00::10")
    assert f.check("http://[fd00::10]/a.jpg")
    with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_HOSTS"):
        f.fetch("http://[fd00::10]:8080/a.jpg")


def test_allowed_hosts_must_be_host_or_host_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from captionfleet.core.settings import SettingsError, load_worker_settings

    monkeypatch.setenv("WORKER_FETCH__ALLOWED_HOSTS", "CDN.example.com, img.example.com:8443")
    assert load_worker_settings().fetch.allowed_hosts == ["cdn.example.com", "img.example.com:8443"]
    for bad in ("https://cdn.example.com", "cdn.example.com:notaport", "cdn.example.com/images", "me@cdn.example.com"):
        monkeypatch.setenv("WORKER_FETCH__ALLOWED_HOSTS", f"ok.example.com,{bad}")
        with pytest.raises(SettingsError, match="WORKER_FETCH__ALLOWED_HOSTS") as info:
            load_worker_settings()
        assert "host:port" in str(info.value) and bad in str(info.value)


def test_file_root_reads_inside_and_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jpg").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    (root / "link.jpg").symlink_to(tmp_path / "secret.txt")  # a link pointing out of the root
    (root / "inner.jpg").symlink_to(root / "sub" / "ok.jpg")  # a link that stays inside is fine
    (root / "big.jpg").write_bytes(b"x" * 1001)
    f, _ = fetcher(tmp_path)
    assert f.fetch(f"file://{root}/sub/ok.jpg") == b"inside"
    assert f.fetch(f"file://{root}/inner.jpg") == b"inside"
    assert f.fetch(f"file://localhost{root}/sub/ok.jpg") == b"inside"
    for uri in (
        f"file://{root}/../secret.txt",
        f"file://{root}/sub/%2e%2e/%2e%2e/secret.txt",  # url-encoded dots are dots too
        f"file://{root}/link.jpg",
        f"file://{tmp_path}/secret.txt",
        f"file://otherhost{root}/sub/ok.jpg",
    ):
        with pytest.raises(FetchError) as info:
            f.fetch(uri)
        assert info.value.kind == "forbidden", uri
    with pytest.raises(FetchError) as missing:
        f.fetch(f"file://{root}/nope.jpg")
    assert missing.value.kind == "not_found"
    with pytest.raises(FetchError) as folder:
        f.fetch(f"file://{root}/sub")
    assert folder.value.kind == "not_found"
    with pytest.raises(FetchError) as big:
        f.fetch(f"file://{root}/big.jpg")
    assert big.value.kind == "too_large"


def test_file_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="WORKER_FETCH__FILE_ROOT"):
        Fetcher(FetchSettings(file_root=tmp_path / "missing"), s3=S3Settings(), max_bytes=10)


# -- S3, with botocore's Stubber: real client code, canned responses ---------------------------------


def stubbed() -> tuple[Any, Stubber]:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    return client, Stubber(client)


def body(data: bytes) -> dict[str, Any]:
    return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)}


GET = {"Bucket": "images", "Key": "cat.jpg"}


def test_s3_slow_down_is_retried_with_growing_waits() -> None:
    client, stub = stubbed()
    for _ in range(2):
        stub.add_client_error("get_object", "SlowDown", "Please reduce your request rate.", 503, expected_params=GET)
    stub.add_response("get_object", body(b"jpeg bytes"), expected_params=GET)
    f, sleeps = fetcher(client=client, backoff_initial_ms=100, backoff_max_ms=150)
    with stub:
        assert f.fetch("s3://images/cat.jpg") == b"jpeg bytes"
        stub.assert_no_pending_responses()
    assert sleeps == [0.1, 0.15]  # doubled, then capped


def test_s3_gives_up_after_max_attempts() -> None:
    client, stub = stubbed()
    for _ in range(3):
        stub.add_client_error("get_object", "InternalError", "oops", 500, expected_params=GET)
    f, sleeps = fetcher(client=client, max_attempts=3)
    with stub, pytest.raises(FetchError) as info:
        f.fetch("s3://images/cat.jpg")
    assert info.value.kind == "unavailable"
    assert "after 3 attempts" in info.value.message
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [("NoSuchKey", 404, "not_found"), ("NoSuchBucket", 404, "not_found"), ("AccessDenied", 403, "forbidden")],
)
def test_s3_errors_that_are_not_retried(code: str, status: int, kind: str) -> None:
    client, stub = stubbed()
    stub.add_client_error("get_object", code, code, status, expected_params=GET)
    f, sleeps = fetcher(client=client)
    with stub, pytest.raises(FetchError) as info:
        f.fetch("s3://images/cat.jpg")
    assert info.value.kind == kind
    assert sleeps == []


def test_s3_object_over_the_limit_is_not_read() -> None:
    client, stub = stubbed()
    stub.add_response("get_object", {**body(b""), "ContentLength": 10_000}, expected_params=GET)
    f, _ = fetcher(client=client)
    with stub, pytest.raises(FetchError) as info:
        f.fetch("s3://images/cat.jpg")
    assert info.value.kind == "too_large"


class TimingOutClient:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def get_object(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise ReadTimeoutError(endpoint_url="http://store")
        return body(b"late but fine")


def test_s3_timeouts_are_retried_then_reported() -> None:
    f, _ = fetcher(client=TimingOutClient(failures=2), max_attempts=3)
    assert f.fetch("s3://images/cat.jpg") == b"late but fine"
    always = TimingOutClient(failures=99)
    f, _ = fetcher(client=always, max_attempts=2)
    with pytest.raises(FetchError) as info:
        f.fetch("s3://images/cat.jpg")
    assert info.value.kind == "timeout"
    assert always.calls == 2


def test_fetch_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from captionfleet.core.settings import load_worker_settings

    monkeypatch.setenv("WORKER_FETCH__ALLOWED_BUCKETS", "images, uploads")
    monkeypatch.setenv("WORKER_FETCH__ALLOWED_HOSTS", '["cdn.example.com"]')
    monkeypatch.setenv("WORKER_FETCH__FILE_ROOT", os.fspath(tmp_path))
    settings = load_worker_settings().fetch
    assert settings.allowed_buckets == ["images", "uploads"]
    assert settings.allowed_hosts == ["cdn.example.com"]
    assert settings.file_root == tmp_path


# -- hostile sources: slow hosts, swapped folders, FIFOs, dot segments, broken uris ----------------


class DrippingHandler(http.server.BaseHTTPRequestHandler):
    """Announces a small body, then sends it a byte at a time, slowly: each read is within the socket
    timeout, the whole body is not."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A local http server in a thread; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dripping_host() -> Iterator[str]:
    with serving(DrippingHandler) as port:
        yield f"http://localhost:{port}/slow.jpg"


def test_a_host_dripping_its_body_times_out_within_the_limit(dripping_host: str) -> None:
    host = urlsplit(dripping_host).netloc
    f, sleeps = fetcher(allowed_hosts=[host], connect_timeout_s=0.2, read_timeout_s=0.3, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        f.fetch(dripping_host)
    assert info.value.kind == "timeout" and "not received within 0.5s" in info.value.message
    # Two attempts of 0.5 s (plus at most one read each), not the 4 s the body takes.
    assert time.monotonic() - start < 3.0 and len(sleeps) == 1


def test_a_declared_body_over_the_limit_is_not_read(dripping_host: str) -> None:
    f = Fetcher(FetchSettings(allowed_hosts=[urlsplit(dripping_host).netloc]), s3=S3Settings(), max_bytes=10)
    with pytest.raises(FetchError) as info:
        f.fetch(dripping_host)
    assert info.value.kind == "too_large" and "40 bytes" in info.value.message


def test_a_folder_swapped_for_a_link_after_the_check_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "secret.txt").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"SECRET")
    f, _ = fetcher(tmp_path)
    target = f.check(f"file://{root}/d/secret.txt")  # the policy check passes...
    (root / "d" / "secret.txt").unlink()
    (root / "d").rmdir()
    (root / "d").symlink_to(tmp_path / "outside")  # ...then a folder on the way becomes a link out
    with pytest.raises(FetchError) as info:
        f._read_file(target.path, "file://swapped")  # type: ignore[union-attr]
    assert info.value.kind == "forbidden"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    f, _ = fetcher(tmp_path)
    result: list[FetchError] = []

    def fetch() -> None:
        with pytest.raises(FetchError) as info:
            f.fetch(f"file://{root}/pipe.jpg")
        result.append(info.value)

    reader = threading.Thread(target=fetch, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "opening a FIFO blocked the fetch"
    assert result[0].kind == "not_found"


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("s3://images/../secrets/creds.json", "forbidden"),
        ("s3://images/a/./b.jpg", "forbidden"),
        ("s3://images/a/..", "forbidden"),
        ("http://[/x.jpg", "malformed"),
        ("http://localhost:notaport/x.jpg", "malformed"),
    ],
)
def test_dot_segments_and_broken_uris_are_refused_before_any_io(uri: str, kind: str) -> None:
    f, _ = fetcher(client=NoCallsClient(), allowed_hosts=["localhost"])
    with pytest.raises(FetchError) as info:
        f.fetch(uri)
    assert info.value.kind == kind


def serving_images(requests: list[str]) -> type[http.server.BaseHTTPRequestHandler]:
    """Serves every path with the same body, and notes the paths asked for in ``requests``."""

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"image")

        def log_message(self, *args: Any) -> None:
            pass

    return Images


def redirecting_to(location: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Redirecting


def test_a_redirect_is_held_to_the_same_host_and_port_rule() -> None:
    requests: list[str] = []
    with serving(serving_images(requests)) as target:
        other_port = f"http://127.0.0.1:{target}/elsewhere.jpg"
        with serving(redirecting_to(other_port)) as first:
            f, _ = fetcher(allowed_hosts=[f"127.0.0.1:{first}"], max_attempts=1)
            with pytest.raises(FetchError, match="WORKER_FETCH__ALLOWED_HOSTS") as info:
                f.fetch(f"http://127.0.0.1:{first}/cat.jpg")  # the same host, another port
            assert info.value.kind == "forbidden" and requests == []
            # Listed too, the same redirect is followed.
            f, _ = fetcher(allowed_hosts=[f"127.0.0.1:{first}", f"127.0.0.1:{target}"], max_attempts=1)
            assert f.fetch(f"http://127.0.0.1:{first}/cat.jpg") == b"image"
            assert requests == ["/elsewhere.jpg"]
        with serving(redirecting_to(f"http://127.0.0.1:{target}:bad/x.jpg")) as broken:
            f, _ = fetcher(allowed_hosts=[f"127.0.0.1:{broken}", f"127.0.0.1:{target}"], max_attempts=1)
            with pytest.raises(FetchError) as refused:
                f.fetch(f"http://127.0.0.1:{broken}/cat.jpg")
            assert refused.value.kind == "forbidden"
