"""Model references on a real S3 server (SeaweedFS): download, cache, refusals, clear errors."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import captionfleet.core.model_store as model_store
from captionfleet.core.model_store import ModelRefError, resolve_model_ref
from captionfleet.core.s3 import make_s3_client
from captionfleet.core.settings import S3Settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts S3 operations made by the model store, keyed "GetObject:<key>" and by operation.

    Also keeps retries and timeouts small so failure tests finish in seconds.
    """
    calls: Counter[str] = Counter()

    def count(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls[model.name] += 1
        if model.name == "GetObject":
            calls[f"GetObject:{params['Key']}"] += 1

    def client(settings: S3Settings, **_: Any) -> Any:
        made = make_s3_client(settings, connect_timeout=2, read_timeout=10, max_attempts=2)
        made.meta.events.register("before-parameter-build.s3", count)
        return made

    monkeypatch.setattr(model_store, "make_s3_client", client)
    yield calls


def admin_settings(server: SeaweedS3) -> S3Settings:
    return S3Settings(
        endpoint_url=server.endpoint_url,
        access_key_id=SecretStr(server.access_key),
        secret_access_key=SecretStr(server.secret_key),
    )


def upload_dir(server: SeaweedS3, bucket: str, prefix: str, local: Path) -> None:
    client = server.client()
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, prefix + path.name)


def test_s3_checkpoint_is_downloaded_once_and_loads(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path, s3_calls: Counter[str]
) -> None:
    upload_dir(s3_server, s3_bucket, "models/tiny/", tiny_checkpoint)
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/tiny/README.md", Body=b"# not needed")
    uri = f"s3://{s3_bucket}/models/tiny"  # no trailing slash: still a prefix of whole names
    settings = admin_settings(s3_server)
    cache = tmp_path / "cache"

    first = resolve_model_ref(uri, cache_dir=cache, s3=settings)
    assert first.parent == cache
    expected = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    assert {p.name: p.read_bytes() for p in first.iterdir()} == expected
    assert s3_calls["GetObject"] == len(expected)  # README.md skipped
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]

    # Unchanged objects: same directory, nothing downloaded, files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    s3_calls.clear()
    assert resolve_model_ref(uri + "/", cache_dir=cache, s3=settings) == first
    assert s3_calls["GetObject"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes

    # A changed object (new ETag): a new directory with the new content; the old one stays intact.
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/tiny/captionfleet.json", Body=b'{"version": "2"}')
    second = resolve_model_ref(uri, cache_dir=cache, s3=settings)
    assert second != first
    assert (second / "captionfleet.json").read_bytes() == b'{"version": "2"}'
    assert not (first / "captionfleet.json").exists()

    # Proof that it is a complete, loadable checkpoint.
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(first, use_safetensors=True)
    assert model.config.to_dict()["decoder"]["model_type"] == "gpt2"


def test_pickled_only_prefix_is_refused_without_downloading(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path, s3_calls: Counter[str]
) -> None:
    client = s3_server.client()
    client.upload_file(str(tiny_checkpoint / "config.json"), s3_bucket, "models/pickled/config.json")
    client.put_object(Bucket=s3_bucket, Key="models/pickled/pytorch_model.bin", Body=b"\x80\x04 not loaded")

    with pytest.raises(ModelRefError, match="only safetensors are loaded") as info:
        resolve_model_ref(
            f"s3://{s3_bucket}/models/pickled/", cache_dir=tmp_path / "cache", s3=admin_settings(s3_server)
        )
    assert "pytorch_model.bin" in str(info.value)
    assert s3_calls["GetObject"] == 0  # refused from the listing alone
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_empty_prefix_is_a_clear_error(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path, s3_calls: Counter[str]
) -> None:
    uri = f"s3://{s3_bucket}/models/nothing-here/"
    with pytest.raises(ModelRefError, match="no objects under") as info:
        resolve_model_ref(uri, cache_dir=tmp_path, s3=admin_settings(s3_server))
    assert uri in str(info.value)


def test_missing_bucket_is_a_clear_error(s3_server: SeaweedS3, tmp_path: Path, s3_calls: Counter[str]) -> None:
    with pytest.raises(ModelRefError, match="NoSuchBucket") as info:
        resolve_model_ref("s3://no-such-bucket-xyz/m/", cache_dir=tmp_path, s3=admin_settings(s3_server))
    assert "WORKER_S3__ENDPOINT_URL" in str(info.value)


def test_forbidden_bucket_is_a_clear_error(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path, s3_calls: Counter[str]
) -> None:
    upload_dir(s3_server, s3_bucket, "models/tiny/", tiny_checkpoint)
    readonly = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        access_key_id=SecretStr(s3_server.readonly_access_key),
        secret_access_key=SecretStr(s3_server.readonly_secret_key),
    )
    uri = f"s3://{s3_bucket}/models/tiny/"
    with pytest.raises(ModelRefError, match="AccessDenied") as info:
        resolve_model_ref(uri, cache_dir=tmp_path, s3=readonly)
    message = str(info.value)
    assert uri in message and "credentials" in message
    assert s3_server.readonly_secret_key not in message


@pytest.mark.timeout(60)
def test_unreachable_endpoint_is_a_clear_error(tmp_path: Path, s3_calls: Counter[str]) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id=SecretStr("x"),
        secret_access_key=SecretStr("y"),
    )
    started = time.monotonic()
    with pytest.raises(ModelRefError, match="WORKER_S3__ENDPOINT_URL") as info:
        resolve_model_ref("s3://bucket/models/tiny/", cache_dir=tmp_path, s3=settings)
    assert "s3://bucket/models/tiny/" in str(info.value)
    assert time.monotonic() - started < 30


def test_captioner_loads_from_s3_and_captions_like_the_local_copy(
    s3_server: SeaweedS3, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from captionfleet.core.captioner import Captioner
    from captionfleet.core.loading import load_model as load_captioner
    from captionfleet.core.settings import ModelSettings, WorkerSettings

    upload_dir(s3_server, s3_bucket, "models/tiny-captioner/", tiny_checkpoint)
    settings = WorkerSettings(
        model=ModelSettings(ref=f"s3://{s3_bucket}/models/tiny-captioner", cache_dir=tmp_path / "cache", device="cpu"),
        s3=admin_settings(s3_server),
    )
    remote = load_captioner(settings)
    local = Captioner.from_dir(tiny_checkpoint, device="cpu")
    images = [Image.new("RGB", (40, 30), (i * 50, 100, 200 - i * 40)) for i in range(4)]
    assert remote.version == local.version  # same weights, same content hash
    assert remote.caption(images) == local.caption(images)
    assert remote.source.startswith(str(tmp_path / "cache"))
