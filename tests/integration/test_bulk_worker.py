"""`captionfleet worker --source s3://… --out s3://…`: the S3 bulk job as a fleet worker (Indexed Job pod)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import captionfleet.worker.bulk as bulk
from captionfleet.core.captioner import Captioner, ModelInput, ModelWrapper
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings, WorkerSettings
from captionfleet.worker.bulk_worker import run_bulk_worker
from tests.integration.test_bulk_s3 import cli_env, list_keys, read_rows
from tests.services.seaweedfs import SeaweedS3

pytestmark = pytest.mark.integration


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (i * 9 % 256, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


def fill(server: SeaweedS3, bucket: str, n: int) -> set[str]:
    client = server.client()
    keys = {f"imgs/{i:03d}.png" for i in range(n)}
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=png(int(key[5:8])))
    client.put_object(Bucket=bucket, Key="imgs/broken.png", Body=b"\x89PNG\r\n\x1a\nnope")
    return keys | {"imgs/broken.png"}


def source_and_out(bucket: str) -> list[str]:
    return ["--source", f"s3://{bucket}/imgs/", "--out", f"s3://{bucket}/out/"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_indexed_job_pods_cover_the_prefix_between_them(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path
) -> None:
    keys = fill(s3_server, s3_bucket, 30)
    for index in (1, 0):  # the order pods happen to start in does not matter
        env = cli_env(
            s3_server,
            JOB_COMPLETION_INDEX=str(index),
            WORKER_SHARD__TOTAL="2",
            WORKER_METRICS__PORT="0",
            WORKER_METRICS__HOST="127.0.0.1",
        )
        done = subprocess.run(
            [sys.executable, "-m", "captionfleet.worker", "--model", str(tiny_checkpoint), *source_and_out(s3_bucket)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode in (0, 3), done.stderr  # 3: this shard holds the broken image
        assert any(f"shard-0000{index}-of-00002" in key for key in list_keys(s3_server.client(), s3_bucket, "out/"))
    rows = read_rows(s3_server.client(), s3_bucket, "out/")
    assert sorted(row["key"] for row in rows) == sorted(keys)
    assert next(row["error_kind"] for row in rows if row["key"] == "imgs/broken.png") in {"decode", "truncated"}


def test_bulk_mode_needs_both_uris(tiny_checkpoint: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "captionfleet.worker", "--source", "s3://b/imgs/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--out" in done.stderr


def test_metrics_and_readiness_while_the_shard_runs(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(s3_server, s3_bucket, 12)
    release = threading.Event()
    real = Captioner.from_dir(tiny_checkpoint, device="cpu")
    calls = 0

    class HeldCaptioner(ModelWrapper):
        """The real captioner, held before its second batch until the test has looked at /metrics."""

        @property
        def wrapped(self) -> Captioner:
            return real

        def caption_inputs(
            self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None
        ) -> list[Caption]:
            nonlocal calls
            calls += 1
            if calls == 2:
                assert release.wait(60)
            return real.caption_inputs(inputs, decoding)

    monkeypatch.setattr(bulk, "load_captioner", lambda settings: HeldCaptioner())
    port = free_port()
    data: dict[str, Any] = WorkerSettings().model_dump()
    data["metrics"].update(host="127.0.0.1", port=port)
    data["s3"].update(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key)
    data["s3"]["secret_access_key"] = s3_server.secret_key
    data["batch"].update(max_items=4, max_wait_ms=10)
    settings = WorkerSettings.model_validate(data)
    exit_code: list[int] = []
    runner = threading.Thread(
        target=lambda: exit_code.append(run_bulk_worker(settings, f"s3://{s3_bucket}/imgs/", f"s3://{s3_bucket}/out/"))
    )
    runner.start()
    try:
        text = ""
        for _ in range(600):  # bounded: 60 s
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                text = ""
            if 'captionfleet_images_total{outcome="captioned"} 4.0' in text:
                break
            threading.Event().wait(0.1)
        assert 'captionfleet_images_total{outcome="captioned"} 4.0' in text
        assert f'version="{real.version}"' in text  # the model info metric
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as ready:
            assert ready.status == 200
    finally:
        release.set()
        runner.join(120)
    assert exit_code == [3]  # the broken image has a failure row


def test_an_archive_pod_exports_its_progress(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.webdataset_shards import good_samples, shard

    client = s3_server.client()
    for n in range(3):
        members, _ = good_samples(f"s{n}-", 4)
        client.put_object(Bucket=s3_bucket, Key=f"shards/{n:05d}.tar", Body=shard(members))
    release = threading.Event()
    real = Captioner.from_dir(tiny_checkpoint, device="cpu")
    captioned = 0

    class HeldCaptioner(ModelWrapper):
        """The real captioner, held once the first shard's 4 images are captioned (and so before the second
        shard's last one: batches hold at most 4) until the test has looked at /metrics."""

        @property
        def wrapped(self) -> Captioner:
            return real

        def caption_inputs(
            self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None
        ) -> list[Caption]:
            nonlocal captioned
            if captioned >= 4:
                assert release.wait(60)
            captioned += len(inputs)
            return real.caption_inputs(inputs, decoding)

    monkeypatch.setattr(bulk, "load_captioner", lambda settings: HeldCaptioner())
    port = free_port()
    data: dict[str, Any] = WorkerSettings().model_dump()
    data["metrics"].update(host="127.0.0.1", port=port)
    data["s3"].update(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key)
    data["s3"]["secret_access_key"] = s3_server.secret_key
    data["batch"].update(max_items=4, max_wait_ms=10)
    settings = WorkerSettings.model_validate(data)
    source, out = f"s3://{s3_bucket}/shards/{{00000..00002}}.tar", f"s3://{s3_bucket}/captions/"
    exit_code: list[int] = []
    runner = threading.Thread(target=lambda: exit_code.append(run_bulk_worker(settings, source, out)))
    runner.start()
    try:
        text = ""
        for _ in range(600):  # bounded: 60 s
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                text = ""
            if "captionfleet_bulk_files_done 1.0" in text:
                break
            threading.Event().wait(0.1)
        assert "captionfleet_bulk_files_total 3.0" in text and "captionfleet_bulk_files_done 1.0" in text, text
        assert "captionfleet_bulk_images_per_second" in text and "captionfleet_bulk_eta_seconds" in text
        eta = float(text.split("\ncaptionfleet_bulk_eta_seconds ")[1].split()[0])
        assert eta > 0  # one file of three done: time is left, and it is known
    finally:
        release.set()
        runner.join(120)
    assert exit_code == [0]
    written = list_keys(client, s3_bucket, "captions/")
    assert {f"captions/{n:05d}.complete.json" for n in range(3)} <= set(written)
