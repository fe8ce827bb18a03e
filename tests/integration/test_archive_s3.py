"""Archives stored in a real S3 server (SeaweedFS), captioned by a tiny real model.

- WebDataset shards named by a brace range, split over three workers by file: every key once, each
  shard's Parquet, WebDataset shard and completion marker beside the data.
- A run killed with SIGKILL in the middle of a shard, then run again: every key exactly once, and the
  keys checkpointed before the kill are not captioned again.
- Planning 10,000 shards costs each worker one listing of the shards and one of the output: counted
  with botocore's event hooks, not assumed.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from captionfleet.core.captioner import Captioner
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.bulk_archive import ArchiveOptions, plan_archive_job, run_archive_job
from captionfleet.worker.sharding import ShardSpec, shard_of
from tests.integration.test_bulk_s3 import admin_settings, cli, cli_env, list_keys, upload
from tests.services.seaweedfs import SeaweedS3
from tests.webdataset_shards import good_samples, hostile_shard, shard

pytestmark = pytest.mark.integration

MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=DecodingSettings(num_beams=1, max_new_tokens=8))


def parquet_rows(client: Any, bucket: str, key: str) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows), f"{key}: a key has two rows"
    return by_key


def test_shards_on_s3_split_over_three_workers_with_outputs_beside_them(
    s3_server: SeaweedS3, s3_bucket: str, captioner: Captioner
) -> None:
    client = s3_server.client()
    hostile, hostile_expected = hostile_shard(MAX_BYTES)
    shards = {"shards/00000.tar": hostile}
    expected = {"00000": hostile_expected}
    for n in range(1, 5):
        members, keys = good_samples(f"s{n}-", 6)
        shards[f"shards/{n:05d}.tar"] = shard(members)
        expected[f"{n:05d}"] = keys
    shards["shards/unrelated.txt"] = b"not a shard, not named by the range"
    upload(client, s3_bucket, shards)
    settings = admin_settings(s3_server)
    settings.images.max_bytes = MAX_BYTES
    summaries = [
        run_archive_job(
            f"s3://{s3_bucket}/shards/{{00000..00004}}.tar",
            f"s3://{s3_bucket}/captions/",
            settings,
            options=ArchiveOptions(shard=ShardSpec(i, 3), out_format="webdataset"),
            show_progress=False,
            captioner=captioner,
        )
        for i in range(3)
    ]
    assert sum(s.files_finished for s in summaries) == 5 and all(s.files_listed == 5 for s in summaries)
    for i, summary in enumerate(summaries):
        assert summary.files_in_shard == sum(1 for stem in expected if shard_of(f"{stem}.tar", 3) == i)
    written = list_keys(client, s3_bucket, "captions/")
    assert not [key for key in written if ".partial/" in key]
    for stem, keys in expected.items():
        rows = parquet_rows(client, s3_bucket, f"captions/{stem}.parquet")
        assert {key: row["error_kind"] for key, row in rows.items()} == keys
        assert all(row["model_version"] == captioner.version for row in rows.values())
        assert all(row["source"] == f"s3://{s3_bucket}/shards/{stem}.tar" for row in rows.values())
        marker = json.loads(client.get_object(Bucket=s3_bucket, Key=f"captions/{stem}.complete.json")["Body"].read())
        assert marker["rows"] == len(keys) and marker["source_etag"] == written_etag(client, s3_bucket, stem)
        body = client.get_object(Bucket=s3_bucket, Key=f"captions/{stem}.tar")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            names = set(tar.getnames())
        captioned = {key for key, kind in keys.items() if kind is None}
        assert {f"{key}.txt" for key in captioned} <= names
    failures = sum((s.failed_by_kind for s in summaries), Counter())
    assert failures == Counter(kind for kind in hostile_expected.values() if kind)


def written_etag(client: Any, bucket: str, stem: str) -> str:
    return str(client.head_object(Bucket=bucket, Key=f"shards/{stem}.tar")["ETag"])


def test_sigkill_mid_shard_then_rerun_gives_every_key_exactly_once(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    client = s3_server.client()
    expected: dict[str, set[str]] = {}
    objects = {}
    for n in range(2):
        members, keys = good_samples(f"s{n}-", 150)
        objects[f"shards/{n:05d}.tar"] = shard(members)
        expected[f"{n:05d}"] = set(keys)
    upload(client, s3_bucket, objects)
    command = cli(
        f"s3://{s3_bucket}/shards/{{00000..00001}}.tar",
        "--out",
        f"s3://{s3_bucket}/out/",
        "--model",
        str(tiny_checkpoint),
        "--rows-per-part",
        "10",  # checkpoints long before the shard ends
        "--batch-size",
        "2",
        "--no-progress",
    )
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=cli_env(s3_server), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if len([k for k in list_keys(client, s3_bucket, "out/") if ".partial/" in k]) >= 3:
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    killed = list_keys(client, s3_bucket, "out/")
    assert not any(key.endswith(".complete.json") and "00001" in key for key in killed)
    checkpointed = sum(1 for key in killed if ".partial/" in key) * 10

    second = subprocess.run(command, env=cli_env(s3_server), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    already = int(second.stdout.split("already done: ")[1].split()[0])
    assert already >= checkpointed - 10 and already > 0  # resumed per key, not from the start
    for stem, keys in expected.items():
        rows = parquet_rows(client, s3_bucket, f"out/{stem}.parquet")
        assert set(rows) == keys and all(row["caption"] is not None for row in rows.values())
    after = list_keys(client, s3_bucket, "out/")
    assert not [key for key in after if ".partial/" in key]
    markers = {key for key in after if key.endswith(".complete.json")}
    assert markers == {"out/00000.complete.json", "out/00001.complete.json"}


@pytest.mark.slow
def test_planning_ten_thousand_shards_is_one_listing_per_worker(s3_server: SeaweedS3) -> None:
    client = s3_server.client()
    bucket = f"plan-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=bucket, Key=f"shards/{n:05d}.tar", Body=b""), range(10_000)))
    settings = admin_settings(s3_server)
    owned: list[str] = []
    for index in range(4):
        counted = s3_server.client()
        calls: Counter[str] = Counter()
        counted.meta.events.register("before-call.s3", lambda model, calls=calls, **_: calls.update([model.name]))
        plan = plan_archive_job(
            f"s3://{bucket}/shards/{{00000..09999}}.tar",
            f"s3://{bucket}/captions/",
            settings,
            ArchiveOptions(shard=ShardSpec(index, 4)),
            client=counted,  # type: ignore[arg-type]
        )
        owned += [inp.name for inp in plan.mine]
        # 10 pages of 1,000 keys for the shards, 1 for the (empty) output: nothing per shard.
        assert calls == Counter({"ListObjectsV2": 11}), calls
        assert len(plan.inputs) == 10_000
    assert sorted(owned) == [f"{n:05d}.tar" for n in range(10_000)]  # each file in exactly one shard


def test_an_output_over_one_puts_limit_goes_up_in_parts(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webdataset shard of large pictures can pass one PUT's 5 GiB: above SINGLE_PUT_MAX_BYTES (made
    6 MiB here) the output is a multipart upload, whole once completed."""
    import os

    from captionfleet.core.s3 import RetryPolicy, as_object_store
    from captionfleet.worker.connectors import archive_outputs

    monkeypatch.setattr(archive_outputs, "SINGLE_PUT_MAX_BYTES", 6 << 20)
    monkeypatch.setattr(archive_outputs, "PART_BYTES", 5 << 20)  # S3's smallest part but the last
    client = s3_server.client()
    outputs = archive_outputs.S3Outputs(as_object_store(client), f"s3://{s3_bucket}/out/", RetryPolicy(attempts=1))
    data = os.urandom(13 << 20)
    (tmp_path / "big.tar").write_bytes(data)
    outputs.put_file("big.tar", tmp_path / "big.tar")
    (tmp_path / "small.tar").write_bytes(b"small")
    outputs.put_file("small.tar", tmp_path / "small.tar")
    big = client.head_object(Bucket=s3_bucket, Key="out/big.tar")
    assert big["ContentLength"] == len(data) and big["ETag"].strip('"').endswith("-3")  # three parts
    assert client.get_object(Bucket=s3_bucket, Key="out/big.tar")["Body"].read() == data
    assert "-" not in client.head_object(Bucket=s3_bucket, Key="out/small.tar")["ETag"]  # one PUT
