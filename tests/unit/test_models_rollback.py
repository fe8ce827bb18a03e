"""The LATEST watcher (worker/watcher.py) when LATEST moves while a swap is pending, and how a failed
load is retried: storage errors at the next poll, broken checkpoints only after retry_failed_s."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.model_store import ModelRefError, resolve_model_ref
from captionfleet.core.registry_layout import version_uri
from captionfleet.core.s3 import is_storage_error
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.watcher import ModelWatcher
from tests.unit.test_models_swap import FakeCaptioner, texts
from tests.unit.test_s3_fake import FakeS3, read_timeout, slow_down

ROOT = "s3://bucket/models/x"


class Latest:
    """LATEST, and a load that records what it loaded (optionally failing)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.loads: list[str] = []
        self.fail: dict[str, Exception] = {}

    def read(self) -> str | None:
        return self.version

    def load(self, version: str) -> CaptionModel:
        self.loads.append(version)
        if version in self.fail:
            raise self.fail[version]
        return FakeCaptioner(version)


def watching(latest: Latest, now: list[float] | None = None) -> tuple[HotSwapCaptioner, ModelWatcher]:
    clock = now if now is not None else [0.0]
    hot = HotSwapCaptioner(FakeCaptioner("v1"))
    watcher = ModelWatcher(hot, latest.read, latest.load, interval_s=1, retry_failed_s=600, clock=lambda: clock[0])
    return hot, watcher


def test_rollback_while_a_swap_is_pending_keeps_the_active_model_without_a_reload() -> None:
    latest = Latest("v1")
    hot, watcher = watching(latest)
    swaps: list[tuple[str, str]] = []
    hot.on_swap(lambda a, b: swaps.append((a.version, b.version)))
    latest.version = "v2"
    assert watcher.check() == "loaded" and hot.pending_version == "v2"  # the worker is idle: not swapped yet
    latest.version = "v1"  # the operator rolls back before the next batch
    assert watcher.check() == "unchanged"
    assert latest.loads == ["v2"]  # v1 is serving: not loaded again
    assert hot.pending_version is None  # the offer of the rolled-back v2 is withdrawn
    assert texts(hot) == ["v1", "v1"]
    assert swaps == []
    assert watcher.check() == "unchanged" and latest.loads == ["v2"]
    latest.version = "v2"  # promoted again later: loaded again, and swapped to
    assert watcher.check() == "loaded"
    assert texts(hot, 1) == ["v2"] and swaps == [("v1", "v2")]


def test_a_pending_offer_is_withdrawn_when_latest_moves_to_a_version_that_fails() -> None:
    latest = Latest("v1")
    latest.fail["v3"] = ModelRefError("s3://b/models/x/versions/v3 holds only pickled weights (pytorch_model.bin)")
    hot, watcher = watching(latest)
    latest.version = "v2"
    assert watcher.check() == "loaded"
    latest.version = "v3"
    assert watcher.check() == "failed"
    assert hot.pending_version is None
    assert texts(hot, 1) == ["v1"]  # not the v2 LATEST no longer names
    assert watcher.check() == "known_bad"
    latest.version = "v2"  # v2 was withdrawn, so it is loaded again
    assert watcher.check() == "loaded" and latest.loads == ["v2", "v3", "v2"]
    assert texts(hot, 1) == ["v2"]


def wrapped_storage_error() -> ModelRefError:
    try:
        raise slow_down()
    except Exception as error:
        try:
            raise ModelRefError("could not download s3://b/models/x/versions/v2/model.safetensors") from error
        except ModelRefError as wrapped:
            return wrapped


def test_a_storage_error_is_retried_at_the_next_poll_a_broken_checkpoint_is_not() -> None:
    now = [0.0]
    latest = Latest("v1")
    hot, watcher = watching(latest, now)
    latest.version = "v2"
    latest.fail["v2"] = wrapped_storage_error()
    assert watcher.check() == "failed"
    now[0] = 1.0  # the next poll, well within retry_failed_s
    latest.fail["v2"] = read_timeout()
    assert watcher.check() == "failed"
    now[0] = 2.0
    del latest.fail["v2"]
    assert watcher.check() == "loaded" and latest.loads == ["v2", "v2", "v2"]
    assert texts(hot, 1) == ["v2"]

    latest.version = "broken"
    latest.fail["broken"] = ModelRefError("s3://b/models/x/versions/broken holds only pickled weights")
    assert watcher.check() == "failed"
    now[0] = 3.0
    assert watcher.check() == "known_bad" and latest.loads.count("broken") == 1
    now[0] = 603.0
    assert watcher.check() == "failed" and latest.loads.count("broken") == 2


def test_storage_and_checkpoint_errors_are_told_apart() -> None:
    assert is_storage_error(slow_down()) and is_storage_error(read_timeout())
    assert is_storage_error(wrapped_storage_error())
    assert not is_storage_error(ModelRefError("input size 64x64 differs from the serving model's 32x32"))
    assert not is_storage_error(OSError("config.json is not valid JSON"))
    try:
        try:
            raise slow_down()
        except Exception:
            raise ModelRefError("unrelated") from None
    except ModelRefError as suppressed:
        assert not is_storage_error(suppressed)


# -- the same through resolve_model_ref and an in-memory S3 --------------------------------------------


class PagedS3(FakeS3):
    """FakeS3 with what resolve_model_ref also calls: a paginator, and bodies read in chunks."""

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        response = super().get_object(**kwargs)
        return {**response, "Body": io.BytesIO(response["Body"].read())}

    def get_paginator(self, operation: str) -> Any:
        assert operation == "list_objects_v2"
        fake = self

        class Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                yield fake.list_objects_v2(**kwargs)

        return Paginator()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> PagedS3:
    fake = PagedS3()
    for version in ("v1", "v2"):
        fake.put("bucket", f"models/x/versions/{version}/config.json", b"{}")
        fake.put("bucket", f"models/x/versions/{version}/model.safetensors", b"\0" * 8)
    fake.put("bucket", "models/x/versions/pickled/config.json", b"{}")
    fake.put("bucket", "models/x/versions/pickled/pytorch_model.bin", b"\0" * 8)
    monkeypatch.setattr("captionfleet.core.model_store.make_s3_client", lambda settings: fake)
    return fake


def test_download_errors_from_the_model_store_are_retried_at_the_next_poll(s3: PagedS3, tmp_path: Path) -> None:
    now = [0.0]
    latest = ["v1"]
    loads: list[str] = []

    def load(version: str) -> CaptionModel:
        loads.append(version)
        resolve_model_ref(version_uri(ROOT, version), cache_dir=tmp_path / "cache")
        return FakeCaptioner(version)

    hot = HotSwapCaptioner(FakeCaptioner("v1"))
    watcher = ModelWatcher(hot, lambda: latest[0], load, interval_s=1, retry_failed_s=600, clock=lambda: now[0])
    latest[0] = "v2"
    s3.fail("GetObject", "models/x/versions/v2/model.safetensors", slow_down())
    assert watcher.check() == "failed"
    now[0] = 1.0
    assert watcher.check() == "loaded" and loads == ["v2", "v2"]
    assert texts(hot, 1) == ["v2"]

    latest[0] = "pickled"
    assert watcher.check() == "failed"
    now[0] = 2.0
    assert watcher.check() == "known_bad" and loads == ["v2", "v2", "pickled"]
