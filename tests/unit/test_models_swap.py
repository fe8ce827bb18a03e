"""Hot swapping (worker/hotswap.py) with in-memory captioners: the batch in flight finishes on the old
model, a version that fails to load leaves the old one serving, LATEST refs are parsed strictly."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import pytest
from PIL import Image

from captionfleet.core.captioner import CaptionModel, ImageOrigin, KeptImage, ModelInput, own_inputs
from captionfleet.core.generation import Caption
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.registry_layout import check_version, latest_root, version_uri
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker import hotswap
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.watcher import ModelWatcher


class FakeCaptioner:
    """Captions every image with its own version and the input size it was prepared at; can hold a
    batch until released. Inputs prepared for another size are prepared again (own_inputs), as the
    real captioners do."""

    family = "fake"

    def __init__(self, version: str, size: int = 32) -> None:
        self.version = version
        self.source = f"fake://{version}"
        self.size = size
        self.prepared: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    @property
    def preparation_key(self) -> str:
        return f"fake:{self.size}"

    @property
    def draft_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        self.prepared.append(self.size)
        resized = image.resize((self.size, self.size))
        return ModelInput(
            {"side": resized.width}, resized.width**2, self.preparation_key, prompt, origin or KeptImage(image)
        )

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        self.started.set()
        assert self.release.wait(10)
        return [Caption(f"{self.version}@{item.features['side']}", -1.0, 1) for item in own_inputs(self, inputs)]

    def caption(self, images: Sequence[Image.Image], decoding: DecodingSettings | None = None) -> list[str]:
        return [c.text for c in self.caption_inputs([self.prepare(i) for i in images], decoding)]


def batch(model: CaptionModel, n: int = 2) -> list[ModelInput]:
    return [model.prepare(Image.new("RGB", (50, 40))) for _ in range(n)]


def texts(model: CaptionModel, n: int = 2) -> list[str]:
    """Versions that captioned a batch of ``n`` prepared by ``model`` as it serves now."""
    return [c.text.split("@")[0] for c in model.caption_inputs(batch(model, n))]


def test_the_batch_in_flight_finishes_on_the_old_model() -> None:
    old, new = FakeCaptioner("v1"), FakeCaptioner("v2")
    hot = HotSwapCaptioner(old)
    swaps: list[tuple[str, str]] = []
    hot.on_swap(lambda a, b: swaps.append((a.version, b.version)))
    old.release.clear()
    out: list[list[str]] = []
    inputs = batch(hot)
    thread = threading.Thread(target=lambda: out.append([c.text for c in hot.caption_inputs(inputs)]))
    thread.start()
    assert old.started.wait(10)
    hot.offer(new)  # arrives while v1 is mid-batch
    old.release.set()
    thread.join(10)
    assert out == [["v1@32", "v1@32"]]
    assert hot.version == "v1"  # results of that batch are built now: they must name v1
    assert texts(hot, 3) == ["v2"] * 3
    assert hot.version == "v2" and hot.source == "fake://v2"
    assert swaps == [("v1", "v2")]


def test_a_version_with_another_input_size_prepares_the_waiting_inputs_again() -> None:
    # Inputs the decode threads prepared for the 32 px model before the swap reach the 64 px one: it
    # prepares them again from their origin, so none is lost and none is captioned at the old size.
    old, new = FakeCaptioner("v1", size=32), FakeCaptioner("v2", size=64)
    hot = HotSwapCaptioner(old)
    waiting = batch(hot, 3)
    hot.offer(new)
    assert [c.text for c in hot.caption_inputs(waiting)] == ["v2@64"] * 3
    assert new.prepared == [64, 64, 64]
    assert hot.prepare(Image.new("RGB", (10, 10))).key == "fake:64"  # decode threads now prepare for v2


def test_watcher_keeps_the_old_model_when_a_version_fails_to_load() -> None:
    hot = HotSwapCaptioner(FakeCaptioner("v1"))
    metrics = WorkerMetrics()
    now = [0.0]
    latest = ["v1"]
    loads: list[str] = []

    def load(version: str) -> CaptionModel:
        loads.append(version)
        if version == "broken":
            raise ModelRefError("s3://b/models/x/versions/broken holds only pickled weights (pytorch_model.bin)")
        return FakeCaptioner(version)

    watcher = ModelWatcher(
        hot, lambda: latest[0], load, interval_s=1, retry_failed_s=60, metrics=metrics, clock=lambda: now[0]
    )
    assert watcher.check() == "unchanged"
    latest[0] = "broken"
    assert watcher.check() == "failed"
    assert texts(hot) == ["v1", "v1"]
    assert metrics.sample("captionfleet_model_load_failures_total") == 1
    reasons = {
        sample.labels["version"]: sample.labels["reason"]
        for family in metrics.registry.collect()
        if family.name == "captionfleet_model_load_failure"
        for sample in family.samples
    }
    assert "pickled" in reasons["broken"]  # the metric says why, not only that
    assert watcher.check() == "known_bad" and loads == ["broken"]  # not retried at every poll
    now[0] = 61
    assert watcher.check() == "failed" and loads == ["broken", "broken"]
    latest[0] = "v2"
    assert watcher.check() == "loaded"
    assert watcher.check() == "unchanged"
    assert texts(hot, 1) == ["v2"]
    latest[0] = "v1"  # a rollback is a swap like any other
    assert watcher.check() == "loaded"
    assert texts(hot, 1) == ["v1"]


def test_watcher_survives_an_unreadable_latest() -> None:
    hot = HotSwapCaptioner(FakeCaptioner("v1"))

    def read() -> str | None:
        raise OSError("connection refused")

    watcher = ModelWatcher(hot, read, lambda v: FakeCaptioner(v), interval_s=1)
    assert watcher.check() == "unreadable"
    assert texts(hot, 1) == ["v1"]


def test_watcher_refuses_a_version_that_names_itself_otherwise() -> None:
    hot = HotSwapCaptioner(FakeCaptioner("v1"))
    watcher = ModelWatcher(hot, lambda: "v2", lambda v: FakeCaptioner("something-else"), interval_s=1)
    assert watcher.check() == "failed"
    assert texts(hot, 1) == ["v1"]


def test_latest_refs_and_version_names() -> None:
    assert latest_root("s3://bucket/models/tiny/LATEST") == "s3://bucket/models/tiny"
    assert latest_root("s3://bucket/models/tiny/versions/v1") is None
    assert latest_root("/models/tiny/LATEST") is None  # local folders are not polled
    assert version_uri("s3://b/models/x/", "x-1.2") == "s3://b/models/x/versions/x-1.2"
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ModelRefError, match="not a valid name"):
            check_version(bad)


def test_the_heap_is_trimmed_once_the_old_model_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The C heap keeps freed memory (fastpath.reuse_freed_memory): a swap must hand the old model's back.
    old = FakeCaptioner("v1")
    hot = HotSwapCaptioner(old)
    gone = weakref.ref(old)
    del old
    trimmed_with_old_alive: list[bool] = []
    monkeypatch.setattr(hotswap, "return_freed_heap", lambda: trimmed_with_old_alive.append(gone() is not None))
    hot.offer(FakeCaptioner("v2"))
    assert texts(hot) == ["v2", "v2"]
    assert trimmed_with_old_alive == [False]  # trimmed once, after the last reference to v1 went


def test_the_heap_is_trimmed_only_when_a_thread_still_in_the_old_model_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = FakeCaptioner("v1")
    hot = HotSwapCaptioner(old)
    gone = weakref.ref(old)
    trimmed_with_old_alive: list[bool] = []
    monkeypatch.setattr(hotswap, "return_freed_heap", lambda: trimmed_with_old_alive.append(gone() is not None))
    held = old.prepare  # as a decode thread inside old.prepare() holds it
    del old
    hot.offer(FakeCaptioner("v2"))
    assert texts(hot) == ["v2", "v2"]
    assert trimmed_with_old_alive == []  # not yet: the old model is still in use
    del held
    assert trimmed_with_old_alive == [False]
