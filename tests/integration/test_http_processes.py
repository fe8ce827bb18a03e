"""The caption API as it runs: `captionfleet serve` alone, `captionfleet worker --http` answering HTTP and
Kafka from one model thread (real broker, real S3 server), and `captionfleet caption` serving it for the
length of a bulk job, each in its own process with this checkout's code."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from captionfleet.worker.sinks import read_rows
from tests.hostile_images import jpeg_bytes
from tests.integration.http_support import REPO, TOKEN, subprocess_env
from tests.integration.stream_support import AnswerReader, WorkerProcess, make_topics, worker_env
from tests.services.kafka import KafkaBroker, free_port
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

AUTH = {"authorization": f"Bearer {TOKEN}"}


def _serve_env(checkpoint: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(
        WORKER_MODEL__REF=str(checkpoint),
        WORKER_MODEL__CACHE_DIR=str(tmp_path / "cache"),
        WORKER_HTTP__PORT=str(free_port()),
        WORKER_HTTP__TOKENS=TOKEN,
        WORKER_METRICS__HOST="127.0.0.1",
        WORKER_METRICS__PORT=str(free_port()),
        WORKER_LOG_LEVEL="DEBUG",
        **extra,
    )


def test_serve_answers_with_a_token_and_stops_cleanly_on_sigterm(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = _serve_env(tiny_checkpoint, tmp_path)
    server = WorkerProcess(env, tmp_path / "serve.log", command=["-m", "captionfleet.cli", "serve"])
    try:
        server.wait_ready(timeout_s=120)
        url = f"http://127.0.0.1:{env['WORKER_HTTP__PORT']}"
        image = jpeg_bytes()
        upload = httpx.post(f"{url}/v1/captions", files={"file": ("cat.jpg", image)}, headers=AUTH, timeout=60)
        assert upload.status_code == 200 and upload.json()["results"][0]["ok"], upload.text
        inline = {"images": [{"id": "inline", "data": base64.b64encode(image).decode()}]}
        assert httpx.post(f"{url}/v1/captions", json=inline, headers=AUTH, timeout=60).status_code == 200
        assert httpx.post(f"{url}/v1/captions", json=inline, timeout=60).status_code == 401
        pasted = httpx.post(f"{url}/v1/captions", files={"file": ("key.txt", b"hunter2-pasted")}, headers=AUTH)
        assert pasted.json()["results"][0]["error_kind"] == "not_an_image"
        metrics = server.metrics()
        assert metrics[("captionfleet_images_total", (("outcome", "captioned"),))] == 2
        assert server.terminate() == 0
    finally:
        server.close()
    log = (tmp_path / "serve.log").read_text()
    assert "caption API on http://127.0.0.1" in log
    # Neither the credential nor any image bytes reach the log, even at DEBUG.
    assert TOKEN not in log
    assert base64.b64encode(image).decode()[:24] not in log
    assert "hunter2" not in log  # a non-image upload is described, never quoted


def test_serve_refuses_to_listen_beyond_loopback_without_tokens(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = _serve_env(tiny_checkpoint, tmp_path, WORKER_HTTP__HOST="0.0.0.0")
    del env["WORKER_HTTP__TOKENS"]
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet.cli", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "WORKER_HTTP__TOKENS is empty" in done.stderr and "127.0.0.1" in done.stderr


def _http_client(url: str, bucket: str, client: int, requests: int, answers: list[tuple[list[str], Any]]) -> None:
    """Requests of 1-3 images: s3:// uris the worker reads, and uploads."""
    image = base64.b64encode(jpeg_bytes()).decode()
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
        for n in range(requests):
            ids = [f"http-{client}-{n}-{i}" for i in range(1 + n % 3)]
            images = [
                {"id": i, "uri": f"s3://{bucket}/photos/{k % 10}.jpg"} if k % 2 else {"id": i, "data": image}
                for k, i in enumerate(ids)
            ]
            response = http.post("/v1/captions", json={"images": images})
            answers.append((ids, response))


def test_http_and_kafka_share_one_worker_with_nothing_lost_or_answered_twice(
    kafka_broker: KafkaBroker, s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    names = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in ("requests", "results", "dead", "group")}
    make_topics(kafka_broker, names, partitions=2)
    s3 = s3_server.client()
    for i in range(10):
        s3.put_object(Bucket=s3_bucket, Key=f"photos/{i}.jpg", Body=jpeg_bytes())
    kafka_ids = [f"kafka-{i}" for i in range(150)]
    messages = []
    for i, request_id in enumerate(kafka_ids):
        uri = f"s3://{s3_bucket}/photos/{i % 10}.jpg" if i % 15 else f"s3://{s3_bucket}/missing/{i}.jpg"
        messages.append((i % 2, None, json.dumps({"id": request_id, "uri": uri}).encode()))
    http_port = free_port()
    env = worker_env(
        kafka_broker,
        names,
        s3_server,
        s3_bucket,
        tiny_checkpoint,
        tmp_path / "cache",
        "mixed-worker",
        free_port(),
        WORKER_HTTP__ENABLED="true",
        WORKER_HTTP__PORT=str(http_port),
        WORKER_HTTP__TOKENS=TOKEN,
        WORKER_BATCH__MAX_ITEMS="4",
        PYTHONPATH=str(REPO),
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    reader = AnswerReader(kafka_broker, names)
    try:
        worker.wait_ready(timeout_s=120)
        kafka_broker.produce(names["requests"], messages)
        answers: list[tuple[list[str], Any]] = []
        clients = [
            threading.Thread(target=_http_client, args=(f"http://127.0.0.1:{http_port}", s3_bucket, c, 10, answers))
            for c in range(3)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(300)
        seen = reader.wait(lambda a: len(a.ids()) >= len(kafka_ids), timeout_s=300, worker=worker)
        assert worker.terminate() == 0
    finally:
        worker.close()
        reader.close()

    # Kafka: every request answered exactly once, and nothing of HTTP's went to its topics.
    assert seen.ids() == {request_id: 1 for request_id in kafka_ids}
    assert len(seen.dead) == 10 and {m["kind"] for m in seen.dead} == {"not_found"}
    # HTTP: every request answered 200, every image in its order, each captioned.
    assert len(answers) == 30
    http_images = 0
    for ids, response in answers:
        assert response.status_code == 200, response.text
        rows = response.json()["results"]
        assert [r["id"] for r in rows] == ids and all(r["ok"] for r in rows)
        assert {r["worker"] for r in rows} == {"mixed-worker"}
        http_images += len(ids)
    assert http_images == 3 * 19  # 1, 2, 3, 1, 2, 3, 1, 2, 3, 1 images per client
    log = (tmp_path / "worker.log").read_text()
    assert TOKEN not in log


def _noise_pngs(root: Path, n: int) -> None:
    """Images of ~770 KB each: with WORKER_BATCH__PREFETCH_MB=1 the job holds one at a time, so each batch waits
    its whole WORKER_BATCH__MAX_WAIT_MS for a second image that cannot come: the job lasts n times that."""
    root.mkdir()
    for i in range(n):
        Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(root / f"{i:03}.png")


def test_a_bulk_job_serves_the_api_while_it_runs_then_drains_and_exits_0(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root, out, log_path = tmp_path / "photos", tmp_path / "captions.jsonl", tmp_path / "caption.log"
    _noise_pngs(root, 16)
    port = free_port()
    env = subprocess_env(
        WORKER_MODEL__REF=str(tiny_checkpoint),
        WORKER_MODEL__CACHE_DIR=str(tmp_path / "cache"),
        WORKER_HTTP__ENABLED="true",
        WORKER_HTTP__PORT=str(port),
        WORKER_BATCH__MAX_ITEMS="4",
        WORKER_BATCH__MAX_WAIT_MS="250",
        WORKER_BATCH__PREFETCH_MB="1",
        WORKER_LOG_LEVEL="INFO",
    )
    url = f"http://127.0.0.1:{port}/v1/captions"
    body = {"id": "interactive", "data": base64.b64encode(jpeg_bytes()).decode()}
    with log_path.open("wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "captionfleet.cli", "caption", str(root), "--out", str(out), "--no-progress"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:  # the port is served from before the model loads: 503 "starting" until the job runs
                assert job.poll() is None, f"the job exited with {job.returncode}:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, "the API never answered"
                try:
                    answer = httpx.post(url, json=body, timeout=60)
                except httpx.ConnectError:  # the process has not bound the port yet
                    time.sleep(0.05)
                    continue
                if answer.status_code != 503:
                    break
                assert answer.json()["error"]["kind"] == "starting", answer.text
                # As a client would, after Retry-After; at most 0.25 s here: the job (4 s) must still be running.
                time.sleep(min(float(answer.headers["retry-after"]), 0.25))
            assert job.poll() is None  # answered while the job still runs
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["id"] == "interactive" and answer.json()["results"][0]["ok"]
            code = job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(30)
    text = log_path.read_text()
    assert code == 0, text
    assert f"caption API on http://127.0.0.1:{port}" in text and "draining the caption API" in text
    rows = [row["id"] for row in read_rows(out)]
    assert sorted(rows) == sorted(path.name for path in root.iterdir())  # each image once, none of the API's
    with pytest.raises(httpx.ConnectError):  # the job is over and so is its API
        httpx.post(url, json=body, timeout=10)
