"""The S3 bulk job against a real S3 server (SeaweedFS) with a tiny real model.

- 300+ images under nested prefixes, some corrupt, some empty, one not an image: three shards run one
  after the other cover every key exactly once, with the right rows.
- A shard killed with SIGKILL mid-run and restarted: every key exactly once, finished parts untouched.
- --retry-failed after fixing an object (or raising a limit): its row becomes a caption.
- Unreadable bucket, empty prefix, wrong endpoint, missing output bucket: clear error, exit 2, no output.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from captionfleet.core.captioner import Captioner
from captionfleet.core.settings import BulkS3Settings, DecodingSettings, S3Settings, WorkerSettings
from captionfleet.worker.bulk_s3 import S3JobOptions, run_s3_caption_job
from captionfleet.worker.connectors.s3_parts import MARKER_NAME, decode_part
from captionfleet.worker.sharding import ShardSpec, shard_of
from tests.hostile_images import hostile_corpus
from tests.services.seaweedfs import SeaweedS3

pytestmark = pytest.mark.integration

GOOD_IMAGES = 312
BROKEN = {"half.jpg": "truncated", "garbage.png": "decode", "empty.jpg": "empty", "notes.txt": "not_an_image"}


def image_bytes(rng: np.random.Generator, fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def upload(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


def list_keys(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """key -> ETag of everything under prefix."""
    found: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({obj["Key"]: obj["ETag"] for obj in page.get("Contents", [])})
    return found


def read_rows(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(list_keys(client, bucket, prefix)):
        if "/part-" in key:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            rows.extend(decode_part(body, key.rsplit(".", 1)[1]))
    return rows


def admin_settings(server: SeaweedS3, **bulk: Any) -> WorkerSettings:
    return WorkerSettings(
        s3=S3Settings(
            endpoint_url=server.endpoint_url,
            access_key_id=SecretStr(server.access_key),
            secret_access_key=SecretStr(server.secret_key),
        ),
        bulk=BulkS3Settings(**{"rows_per_part": 50, **bulk}),
    )


@pytest.fixture(scope="module")
def archive(s3_server: SeaweedS3) -> tuple[str, dict[str, str | None]]:
    """A bucket with 316 objects under archive/: expected failure kind per key (None = caption)."""
    bucket = f"bulk-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(5)
    objects: dict[str, bytes] = {}
    expected: dict[str, str | None] = {}
    for i in range(GOOD_IMAGES):
        fmt, ext = ("PNG", "png") if (i // 4) % 2 else ("JPEG", "jpg")  # both kinds in every folder
        key = f"archive/{2020 + i % 4}/{i % 12:02d}/img-{i:04d}.{ext}"
        objects[key] = image_bytes(rng, fmt)
        expected[key] = None
    corpus = {case.name: case for case in hostile_corpus()}
    for name, kind in BROKEN.items():
        assert corpus[name].expect_kind == kind
        key = f"archive/odd/{name}"
        objects[key], expected[key] = corpus[name].data, kind
    objects["unrelated/elsewhere.png"] = image_bytes(rng, "PNG")  # outside the prefix: never listed
    upload(client, bucket, objects)
    return bucket, expected


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    # Greedy, short captions: the job's logic is under test here, not beam search.
    return Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=8))


def check_rows(
    rows: list[dict[str, Any]], expected: dict[str, str | None], etags: dict[str, str], version: str
) -> None:
    assert sorted(row["key"] for row in rows) == sorted(expected)  # every key, exactly once
    for row in rows:
        key = row["key"]
        assert row["error_kind"] == expected[key], (key, row["error_message"])
        assert row["etag"] == etags[key]
        assert row["model_version"] == version
        assert row["uri"].endswith("/" + key)
        if expected[key] is None:
            assert isinstance(row["caption"], str)
            assert row["width"] == 32 and row["size"] > 0 and row["inference_ms"] > 0 and row["fetch_ms"] >= 0
        else:
            assert row["caption"] is None and row["error_message"]


def test_three_shards_one_after_another_cover_every_key_exactly_once(
    s3_server: SeaweedS3, archive: tuple[str, dict[str, str | None]], captioner: Captioner
) -> None:
    bucket, expected = archive
    client = s3_server.client()
    settings = admin_settings(s3_server)
    summaries = []
    for index in range(3):
        summaries.append(
            run_s3_caption_job(
                f"s3://{bucket}/archive/",
                f"s3://{bucket}/out-shards/",
                settings,
                options=S3JobOptions(shard=ShardSpec(index, 3)),
                show_progress=False,
                captioner=captioner,
            )
        )
    etags = list_keys(client, bucket, "archive/")
    rows = read_rows(client, bucket, "out-shards/")
    check_rows(rows, expected, etags, captioner.version)
    assert len(rows) >= 300

    for index, summary in enumerate(summaries):
        mine = {key for key in expected if shard_of(key, 3) == index}
        assert summary.complete and summary.total == len(mine) and summary.listed == len(expected)
        assert summary.done + summary.failed == len(mine)
        shard_rows = read_rows(client, bucket, f"out-shards/shard-{index:05d}-of-00003/")
        assert {row["key"] for row in shard_rows} == mine
        marker = client.get_object(Bucket=bucket, Key=f"out-shards/shard-{index:05d}-of-00003/{MARKER_NAME}")
        counts = __import__("json").loads(marker["Body"].read())
        assert counts["objects"] == counts["rows"] == len(mine)
        assert counts["model_version"] == captioner.version
    failures = sum((s.failed_by_kind for s in summaries), Counter())
    assert failures == Counter(kind for kind in expected.values() if kind)

    # A finished shard run again does nothing and writes nothing new.
    before = list_keys(client, bucket, "out-shards/shard-00001-of-00003/")
    again = run_s3_caption_job(
        f"s3://{bucket}/archive/",
        f"s3://{bucket}/out-shards/",
        settings,
        options=S3JobOptions(shard=ShardSpec(1, 3)),
        show_progress=False,
        captioner=captioner,
    )
    assert (again.skipped, again.done, again.failed, again.parts_written) == (summaries[1].total, 0, 0, 0)
    after = list_keys(client, bucket, "out-shards/shard-00001-of-00003/")
    assert {k: v for k, v in after.items() if "/part-" in k} == {k: v for k, v in before.items() if "/part-" in k}


def test_jsonl_parts_with_a_suffix_filter(
    s3_server: SeaweedS3, archive: tuple[str, dict[str, str | None]], captioner: Captioner
) -> None:
    bucket, expected = archive
    client = s3_server.client()
    summary = run_s3_caption_job(
        f"s3://{bucket}/archive/2021",
        f"s3://{bucket}/out-jsonl/",
        admin_settings(s3_server, format="jsonl", suffixes=[".JPG"], rows_per_part=20),
        show_progress=False,
        captioner=captioner,
    )
    wanted = {key: kind for key, kind in expected.items() if key.startswith("archive/2021/") and key.endswith(".jpg")}
    written = list_keys(client, bucket, "out-jsonl/")
    assert all(key.endswith((".jsonl", MARKER_NAME)) for key in written)
    check_rows(
        read_rows(client, bucket, "out-jsonl/"), wanted, list_keys(client, bucket, "archive/"), captioner.version
    )
    assert summary.filtered_out == sum(1 for key in expected if key.startswith("archive/2021/")) - len(wanted)


# -- the CLI in a subprocess ---------------------------------------------------------------------------


def cli_env(server: SeaweedS3, **extra: str) -> dict[str, str]:
    """Credentials through the standard AWS chain (environment), not WORKER_S3__ keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "AWS_"))}
    env.update(
        {
            "WORKER_S3__ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "captionfleet.cli", "caption", *args, "--num-beams", "1", "--max-new-tokens", "8"]


def test_sigkill_mid_run_then_restart_gives_every_key_once_and_keeps_finished_parts(
    s3_server: SeaweedS3, archive: tuple[str, dict[str, str | None]], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    bucket, expected = archive
    client = s3_server.client()
    out_prefix = "out-kill/"
    shard_prefix = f"{out_prefix}shard-00000-of-00001/"
    command = cli(
        f"s3://{bucket}/archive/",
        "--out",
        f"s3://{bucket}/{out_prefix}",
        "--model",
        str(tiny_checkpoint),
        "--rows-per-part",
        "10",  # small parts, so some exist long before the run ends
        "--no-progress",
    )
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=cli_env(s3_server), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        parts: dict[str, str] = {}
        while time.monotonic() < deadline and first.poll() is None:
            parts = {k: v for k, v in list_keys(client, bucket, shard_prefix).items() if "/part-" in k}
            if len(parts) >= 3:
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == -signal.SIGKILL

    killed = list_keys(client, bucket, shard_prefix)
    assert f"{shard_prefix}{MARKER_NAME}" not in killed  # not complete
    finished_parts = {k: v for k, v in killed.items() if "/part-" in k}
    rows_before = read_rows(client, bucket, shard_prefix)
    assert 30 <= len(rows_before) < len(expected)
    assert len({row["key"] for row in rows_before}) == len(rows_before)

    second = subprocess.run(command, env=cli_env(s3_server), capture_output=True, text=True, timeout=300)
    assert second.returncode == 3, second.stderr  # complete, with some failure rows
    assert f"already done: {len(rows_before)}  captioned:" in second.stdout

    after = list_keys(client, bucket, shard_prefix)
    # The finished parts were not redone: each is still there, byte for byte (same ETag).
    assert {k: after.get(k) for k in finished_parts} == finished_parts
    rows = read_rows(client, bucket, shard_prefix)
    check_rows(rows, expected, list_keys(client, bucket, "archive/"), rows_before[0]["model_version"])
    assert f"{shard_prefix}{MARKER_NAME}" in after


def test_retry_failed_turns_fixed_failures_into_captions(
    s3_server: SeaweedS3, s3_bucket: str, captioner: Captioner, tiny_checkpoint: Path
) -> None:
    client = s3_server.client()
    rng = np.random.default_rng(9)
    good = {f"photos/{i}.png": image_bytes(rng, "PNG") for i in range(8)}
    corrupt = {case.name: case.data for case in hostile_corpus()}["half.jpg"]
    big = image_bytes(rng, "PNG", size=(64, 64))  # over the first run's byte limit
    upload(client, s3_bucket, {**good, "photos/bad.jpg": corrupt, "photos/big.png": big, "photos/empty.png": b""})
    src, out = f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/captions/"
    settings = admin_settings(s3_server)
    settings.images.max_bytes = len(big) - 1
    first = run_s3_caption_job(src, out, settings, show_progress=False, captioner=captioner)
    assert first.failed_by_kind == Counter({"truncated": 1, "too_large": 1, "empty": 1})
    first_rows = {row["key"]: row for row in read_rows(client, s3_bucket, "captions/")}

    # Nothing changed and no retry asked: failure rows are answers, nothing is redone.
    settings.images.max_bytes = 50 * 1024 * 1024
    plain = run_s3_caption_job(src, out, settings, show_progress=False, captioner=captioner)
    assert (plain.skipped, plain.done, plain.failed) == (11, 0, 0)

    client.put_object(Bucket=s3_bucket, Key="photos/bad.jpg", Body=image_bytes(rng, "JPEG"))  # fixed upstream
    retry = subprocess.run(
        cli(
            src,
            "--retry-failed",
            "truncated",
            "too_large",
            "--out",
            out,
            "--model",
            str(tiny_checkpoint),
            "--no-progress",
        ),
        env=cli_env(s3_server),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert retry.returncode == 0, retry.stderr
    assert "captioned: 2  failed: 0" in retry.stdout

    rows = read_rows(client, s3_bucket, "captions/")
    by_key = {row["key"]: row for row in rows}
    assert len(rows) == len(by_key) == 11  # the failure rows were superseded, not added to
    for key in ("photos/bad.jpg", "photos/big.png"):
        assert by_key[key]["error_kind"] is None and isinstance(by_key[key]["caption"], str)
    assert by_key["photos/bad.jpg"]["etag"] == client.head_object(Bucket=s3_bucket, Key="photos/bad.jpg")["ETag"]
    # Kinds not asked for, and captions, were left as they were.
    assert by_key["photos/empty.png"]["run_id"] == first_rows["photos/empty.png"]["run_id"]
    assert by_key["photos/0.png"]["run_id"] == first_rows["photos/0.png"]["run_id"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("case", ["unreadable bucket", "empty prefix", "wrong endpoint", "missing output bucket"])
def test_unusable_source_or_output_is_a_clear_error_and_writes_nothing(
    s3_server: SeaweedS3, archive: tuple[str, dict[str, str | None]], tiny_checkpoint: Path, case: str
) -> None:
    bucket, _ = archive
    out_prefix = f"out-error-{uuid.uuid4().hex[:8]}/"
    src, out = f"s3://{bucket}/archive/", f"s3://{bucket}/{out_prefix}"
    env = cli_env(s3_server, WORKER_BULK__RETRY_ATTEMPTS="2", WORKER_LOG_LEVEL="DEBUG")
    if case == "unreadable bucket":
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = (
            s3_server.readonly_access_key,
            s3_server.readonly_secret_key,
        )
        needles = ["access denied to list", f"s3://{bucket}/archive/", "AWS_PROFILE"]
    elif case == "empty prefix":
        src = f"s3://{bucket}/no-such-folder/"
        needles = ["no objects under", "no-such-folder", "nothing was written"]
    elif case == "wrong endpoint":
        env["WORKER_S3__ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        needles = ["cannot reach the S3 endpoint", "WORKER_S3__ENDPOINT_URL"]
    else:
        out = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/captions/"
        needles = ["bucket does not exist", "no-such-bucket"]

    result = subprocess.run(
        cli(src, "--out", out, "--model", str(tiny_checkpoint), "--no-progress"),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # An unreachable store may be down for a moment: EX_TEMPFAIL, which the Indexed Job retries.
    # Refusals (access denied, no such bucket) and an empty source exit 2: retrying cannot help.
    assert result.returncode == (75 if case == "wrong endpoint" else 2), (result.stdout, result.stderr)
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert list_keys(s3_server.client(), bucket, out_prefix) == {}  # no partial output
    # Logged at DEBUG, yet no credential appears anywhere.
    for secret in (s3_server.secret_key, s3_server.access_key, s3_server.readonly_secret_key):
        assert secret not in result.stdout + result.stderr
