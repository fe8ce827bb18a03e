"""The caption API against the real server (uvicorn on a free loopback port) with real HTTP clients (httpx):
request shapes, failure kinds, the allow-list, auth, each limit, deadlines, disconnects and the drain.

The model is the tiny test checkpoint; where a test needs images to wait (a full queue, a deadline, a drain)
the model's batches wait at a gate the test opens, so every state is reached by construction."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings, SettingsError
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.api_worker import ApiWorker
from captionfleet.worker.metrics import Health, WorkerMetrics
from tests.hostile_images import hostile_corpus, jpeg_bytes
from tests.integration.http_support import (
    TOKEN,
    GatedModel,
    RunningApi,
    api_settings,
    eventually,
    running_api,
    tiny_model,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

JPEG = jpeg_bytes()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(JPEG)
    return folder


@pytest.fixture
def api(tiny_checkpoint: Path, images: Path) -> Iterator[RunningApi]:
    with running_api(api_settings(fetch={"file_root": str(images)}), tiny_model(tiny_checkpoint)) as running:
        yield running


@pytest.fixture
def gated(tiny_checkpoint: Path) -> GatedModel:
    return GatedModel(tiny_model(tiny_checkpoint))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post_in_thread(url: str, **kwargs: Any) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(url, timeout=60, **kwargs)), daemon=True)
    thread.start()
    return thread, answers


# -- shapes and answers -----------------------------------------------------------------------------


def test_multipart_files_are_answered_in_request_order_with_failure_kinds(api: RunningApi) -> None:
    corpus = {case.name: case for case in hostile_corpus()}
    files = [
        ("files", ("first.jpg", JPEG, "image/jpeg")),
        ("files", ("notes.txt", corpus["notes.txt"].data, "text/plain")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("half.jpg", corpus["half.jpg"].data, "image/jpeg")),
        ("files", ("last.png", corpus["rgba.png"].data, "image/png")),
    ]
    response = httpx.post(f"{api.url}/v1/captions", files=files, data={"max_new_tokens": "3"}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body["results"]
    assert [r["id"] for r in rows] == ["first.jpg", "notes.txt", "empty.jpg", "half.jpg", "last.png"]
    assert [r["error_kind"] for r in rows] == [None, "not_an_image", "empty", corpus["half.jpg"].expect_kind, None]
    for row in (rows[0], rows[4]):
        assert row["ok"] and row["caption"] and row["width"] and row["inference_ms"] is not None
        assert row["tokens"] is not None and row["mean_logprob"] is not None  # the caption's confidence
    assert {r["model_version"] for r in rows} == {body["model_version"]}
    assert body["worker"] == response.headers["x-captionfleet-worker"] == "test-worker"
    assert api.sample("captionfleet_images_total", outcome="captioned") == 2
    assert api.sample("captionfleet_failures_total", kind="not_an_image") == 1


def test_json_takes_base64_data_uris_and_allowed_uris_and_ids(api: RunningApi, images: Path) -> None:
    body = {
        "images": [
            {"id": "b64", "data": b64(JPEG)},
            {"id": "data-uri", "uri": f"data:image/jpeg;base64,{b64(JPEG)}"},
            {"id": "file", "uri": f"file://{images}/cat.jpg"},
            {"id": "missing", "uri": f"file://{images}/nope.jpg"},
            {"uri": f"file://{images}/cat.jpg"},
        ],
        "max_new_tokens": 3,
    }
    response = httpx.post(f"{api.url}/v1/captions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rows = response.json()["results"]
    assert [r["id"] for r in rows] == ["b64", "data-uri", "file", "missing", "4"]
    assert [r["error_kind"] for r in rows] == [None, None, None, "not_found", None]
    assert rows[0]["uri"] == "upload:b64" and rows[2]["uri"] == f"file://{images}/cat.jpg"
    assert rows[2]["fetch_ms"] is not None and rows[0]["fetch_ms"] is None  # read by the API, not uploaded

    single = httpx.post(f"{api.url}/v1/captions", json={"id": "one", "data": b64(JPEG)}, timeout=60)
    assert [r["id"] for r in single.json()["results"]] == ["one"]


def test_prompts_go_to_the_model_family_and_one_without_prompts_says_so(
    api: RunningApi, tiny_family: Callable[[str], Path]
) -> None:
    refused = httpx.post(f"{api.url}/v1/captions", json={"data": b64(JPEG), "prompt": "a photo of"}, timeout=60)
    (row,) = refused.json()["results"]  # the tiny checkpoint is a vision-encoder-decoder: it takes no prompt
    assert row["error_kind"] == "malformed" and "takes no prompt" in row["error_message"]
    assert row["prompt"] == "a photo of"
    decoding = DecodingSettings(num_beams=1, max_new_tokens=4)
    blip = load_checkpoint(tiny_family("blip"), device="cpu", precision="fp32", decoding=decoding)
    with running_api(api_settings(), blip) as prompted:
        body = {"images": [{"id": "own", "data": b64(JPEG), "prompt": "a picture of"}, {"data": b64(JPEG)}]}
        rows = httpx.post(f"{prompted.url}/v1/captions", json={**body, "prompt": "a photo of"}, timeout=60).json()
        assert [r["prompt"] for r in rows["results"]] == ["a picture of", "a photo of"]
        assert all(r["ok"] for r in rows["results"]), rows


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(JPEG)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_uris_outside_the_allow_list_are_refused_before_any_io(tiny_checkpoint: Path, tmp_path: Path) -> None:
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(JPEG)
    root = tmp_path / "root"
    root.mkdir()
    settings = api_settings(fetch={"file_root": str(root), "allowed_buckets": ["allowed"]})
    try:
        with running_api(settings, tiny_model(tiny_checkpoint)) as api:
            uris = [
                f"http://127.0.0.1:{host.server_address[1]}/cat.jpg",  # a host not on WORKER_FETCH__ALLOWED_HOSTS
                "s3://other-bucket/cat.jpg",
                f"file://{outside}",
                f"file://{root}/../outside.jpg",
                "ftp://example.com/cat.jpg",
            ]
            response = httpx.post(f"{api.url}/v1/captions", json={"images": [{"uri": uri} for uri in uris]}, timeout=60)
            rows = response.json()["results"]
            assert [r["error_kind"] for r in rows] == ["forbidden"] * 4 + ["malformed"]
            assert "WORKER_FETCH__ALLOWED_HOSTS" in rows[0]["error_message"]
            assert "WORKER_FETCH__ALLOWED_BUCKETS" in rows[1]["error_message"]
    finally:
        host.shutdown()
    assert _CountingHandler.hits == 0  # refused before any request


def test_requests_that_cannot_be_answered_say_why_without_quoting_them(api: RunningApi) -> None:
    secret = b64(JPEG)[:40]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not JSON"),
        ({"json": {"images": [{"uri": "data:x", "data": secret}]}}, 400, "exactly one of uri and data"),
        ({"json": {"images": [{"data": "!!" + secret}]}}, 400, "not valid base64"),
        ({"json": {"images": [{"data": secret}], "colour": secret}}, 400, "colour"),
        ({"json": {"images": []}}, 400, "no image"),
        ({"json": {"data": secret, "prompt": "a\x1b[31m photo"}}, 400, "control character"),
        ({"json": {"data": secret, "num_beams": 99}}, 400, "limit of 8"),
        ({"content": secret.encode(), "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
    ]
    for kwargs, status, words in cases:
        response = httpx.post(f"{api.url}/v1/captions", timeout=30, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        error = response.json()["error"]
        assert words in error["message"], error
        assert secret not in response.text
        assert error["kind"] in ("malformed",)


def test_models_and_the_openapi_schema(api: RunningApi) -> None:
    models = httpx.get(f"{api.url}/v1/models", timeout=30).json()
    assert models["object"] == "list" and models["data"][0]["id"] == api.worker.model.version
    schema = httpx.get(f"{api.url}/openapi.json", timeout=30).json()
    assert {"/v1/captions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    content = schema["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert "CaptionsIn" in schema["components"]["schemas"]


# -- auth -------------------------------------------------------------------------------------------


def test_bearer_tokens_are_required_when_set(tiny_checkpoint: Path) -> None:
    settings = api_settings(http={"tokens": f"other-token,{TOKEN}"})
    with running_api(settings, tiny_model(tiny_checkpoint)) as api:
        url = f"{api.url}/v1/captions"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
            refused = httpx.post(url, json={"data": b64(JPEG)}, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert "WORKER_HTTP__TOKENS" in refused.json()["error"]["message"]
        assert httpx.get(f"{api.url}/v1/models", timeout=30).status_code == 401
        ok = httpx.post(url, json={"data": b64(JPEG)}, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["results"][0]["ok"]
        assert api.sample("captionfleet_http_refused_total", reason="unauthorized") == 4


def test_no_tokens_is_only_allowed_on_loopback(tiny_checkpoint: Path) -> None:
    settings = api_settings(http={"host": "0.0.0.0"})
    worker = ApiWorker(settings, tiny_model(tiny_checkpoint), WorkerMetrics(), Health(consumer=False), "w")
    with pytest.raises(SettingsError, match="WORKER_HTTP__TOKENS"):
        worker.start()
    assert worker.api is None  # nothing was bound


# -- limits -----------------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413_declared_or_streamed(tiny_checkpoint: Path) -> None:
    settings = api_settings(http={"max_body_bytes": 64 * 1024, "max_images": 2})
    with running_api(settings, tiny_model(tiny_checkpoint)) as api:
        url = f"{api.url}/v1/captions"
        big = b"\xff" * (100 * 1024)
        declared = httpx.post(url, files=[("files", ("big.jpg", big, "image/jpeg"))], timeout=30)
        assert declared.status_code == 413 and "WORKER_HTTP__MAX_BODY_BYTES" in declared.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the bytes received pass the limit
            for _ in range(10):
                yield b"x" * (16 * 1024)

        streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        assert streamed.status_code == 413
        many = httpx.post(url, json={"images": [{"data": b64(JPEG)}] * 3}, timeout=30)
        assert many.status_code == 413 and "WORKER_HTTP__MAX_IMAGES" in many.json()["error"]["message"]
        files = [("files", (f"{i}.jpg", JPEG, "image/jpeg")) for i in range(3)]
        assert httpx.post(url, files=files, timeout=30).status_code == 413
        assert httpx.post(url, files=files[:2], timeout=60).status_code == 200
        assert api.sample("captionfleet_images_total", outcome="captioned") == 2


def test_too_many_concurrent_requests_get_429_with_retry_after(gated: GatedModel) -> None:
    settings = api_settings(http={"max_concurrent": 1, "retry_after_s": 3})
    with running_api(settings, gated) as api:
        first, answers = post_in_thread(f"{api.url}/v1/captions", json={"data": b64(JPEG)})
        gated.wait_entered(1)
        busy = httpx.post(f"{api.url}/v1/captions", json={"data": b64(JPEG)}, timeout=30)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
        assert "WORKER_HTTP__MAX_CONCURRENT" in busy.json()["error"]["message"]
        gated.open()
        first.join(60)
        assert answers[0].status_code == 200


def test_a_full_queue_gets_429_with_retry_after(gated: GatedModel) -> None:
    settings = api_settings(http={"max_queued": 3}, batch={"max_items": 1})
    with running_api(settings, gated) as api:
        url = f"{api.url}/v1/captions"
        first, answers = post_in_thread(url, json={"images": [{"data": b64(JPEG)}] * 2})
        gated.wait_entered(1)
        eventually(lambda: api.sample("captionfleet_http_queued_images") == 2, "two images queued")
        full = httpx.post(url, json={"images": [{"data": b64(JPEG)}] * 2}, timeout=30)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert "WORKER_HTTP__MAX_QUEUED" in full.json()["error"]["message"]
        gated.open()
        first.join(60)
        assert answers[0].status_code == 200
        # Answered: the room is free again.
        assert httpx.post(url, json={"images": [{"data": b64(JPEG)}] * 3}, timeout=60).status_code == 200


def test_past_its_deadline_a_request_is_504_and_its_queued_images_are_dropped(gated: GatedModel) -> None:
    settings = api_settings(http={"timeout_s": 1.0}, batch={"max_items": 1})
    with running_api(settings, gated) as api:
        url = f"{api.url}/v1/captions"
        first, first_answer = post_in_thread(url, json={"id": "in-the-model", "data": b64(JPEG)})
        gated.wait_entered(1)  # its batch holds the model: the next request's images wait in the queue
        late = httpx.post(url, json={"images": [{"data": b64(JPEG)}] * 3}, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["kind"] == "timeout"
        first.join(60)
        assert first_answer[0].status_code == 504  # its deadline passed too, inside its batch
        gated.open()
        eventually(lambda: api.sample("captionfleet_http_dropped_images_total", reason="deadline") == 3, "dropped")
        eventually(lambda: api.sample("captionfleet_http_queued_images") == 0, "queue empty")
        # Only the image already in its batch was captioned; the dropped three never reached the model.
        ok = httpx.post(url, json={"data": b64(JPEG)}, timeout=60)
        assert ok.status_code == 200
        assert api.sample("captionfleet_images_total", outcome="captioned") == 2
        assert sum(gated.sizes) == 2


def test_a_client_that_disconnects_frees_its_queued_images(gated: GatedModel) -> None:
    settings = api_settings(batch={"max_items": 1})
    with running_api(settings, gated) as api:
        first, first_answer = post_in_thread(f"{api.url}/v1/captions", json={"data": b64(JPEG)})
        gated.wait_entered(1)
        body = json.dumps({"images": [{"data": b64(JPEG)}] * 2}).encode()
        port = int(api.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/captions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            eventually(lambda: api.sample("captionfleet_http_queued_images") == 3, "its two images queued")
        # Closed: its two images leave the queue; the first request's stays.
        eventually(lambda: api.sample("captionfleet_http_queued_images") == 1, "freed")
        gated.open()
        first.join(60)
        assert first_answer[0].status_code == 200
        eventually(lambda: api.sample("captionfleet_http_dropped_images_total", reason="disconnect") == 2, "dropped")
        assert sum(gated.sizes) == 1
        assert api.sample("captionfleet_http_requests_total", route="captions", code="499") == 1


# -- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_answers_what_is_in_flight_and_refuses_new_requests_with_503(gated: GatedModel) -> None:
    """The real signal, through the same handler as `captionfleet serve` (this test runs in the main thread)."""
    settings = api_settings()
    worker = ApiWorker(settings, gated, WorkerMetrics(), Health(consumer=False), "draining").start()
    assert worker.api is not None
    url = f"http://127.0.0.1:{worker.api.port}/v1/captions"
    seen: dict[str, Any] = {}

    def client() -> None:
        thread, answers = post_in_thread(url, json={"id": "in-flight", "data": b64(JPEG)})
        gated.wait_entered(1)
        os.kill(os.getpid(), signal.SIGTERM)
        eventually(lambda: worker.api is not None and worker.api.ctx.state.draining, "draining")
        seen["refused"] = httpx.post(url, json={"data": b64(JPEG)}, timeout=30)
        seen["ready"] = worker.health.ready()
        gated.open()
        thread.join(60)
        seen["answer"] = answers[0]

    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    with stop_on_signals(lambda signum: worker.stop()):
        code = worker.run()
    helper.join(60)
    assert code == 0
    assert seen["refused"].status_code == 503 and seen["refused"].headers["retry-after"] == "1"
    assert seen["refused"].json()["error"]["kind"] == "draining"
    assert seen["ready"] == (False, "shutting down")
    assert seen["answer"].status_code == 200 and seen["answer"].json()["results"][0]["id"] == "in-flight"
