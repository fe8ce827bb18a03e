"""The bytes inputs hold between their decoding and their results (worker/pipeline.py's HeldBytes):
bounded by WORKER_BATCH__PREFETCH_MB as their number is by prefetch, whatever one input weighs."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from captionfleet.core.captioner import ImageOrigin, KeptImage, ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BatchSettings
from captionfleet.worker.pipeline import CaptionPipeline, HeldBytes
from tests.unit.test_pipeline import MemoryItem, MemorySink, png

MIB = 1 << 20


class HeavyCaptioner:
    """Each input holds 1 MiB of tensors (a Qwen-VL image holds 25); the model waits until released."""

    version = "heavy-1"
    family = "fake"
    preparation_key = "heavy"
    draft_size = None

    def __init__(self) -> None:
        self.prepared = 0
        self.release = threading.Event()
        self.first_batch = threading.Event()

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        self.prepared += 1
        pixels = np.zeros(MIB // 4, dtype=np.float32)
        return ModelInput({"pixels": pixels}, cost=1, key="heavy", prompt=prompt, origin=origin or KeptImage(image))

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        self.first_batch.set()
        assert self.release.wait(10)
        return [Caption("heavy", -0.1, 1) for _ in inputs]


def test_inputs_decoded_ahead_hold_at_most_the_byte_budget() -> None:
    captioner = HeavyCaptioner()
    settings = BatchSettings(max_items=1, max_wait_ms=0, prefetch=32, prefetch_mb=4, decode_threads=2)
    sink = MemorySink()
    pipeline = CaptionPipeline(captioner, sink, settings, ImageLimits())  # type: ignore[arg-type]
    items = [MemoryItem(f"img{i}", png((i, 0, 0))) for i in range(40)]
    runner = threading.Thread(target=pipeline.run, args=(items,))
    runner.start()
    assert captioner.first_batch.wait(10)
    threading.Event().wait(0.5)  # the decode threads would fill the whole prefetch queue by now
    ahead = captioner.prepared
    captioner.release.set()
    runner.join(30)
    assert not runner.is_alive()
    # 4 MiB: the batch held by the model and a few waiting, where prefetch alone lets 32 wait (32 MiB).
    assert ahead <= 6, ahead
    assert len(sink.rows) == 40 and all(row.ok for row in sink.rows)
    assert pipeline._held.held == 0  # every reservation settled and released


def test_one_input_larger_than_the_budget_still_runs_and_reservations_settle() -> None:
    held = HeldBytes(limit=10)
    stop = threading.Event()
    assert held.reserve(stop) == 10  # no size known yet: the first input is decoded alone
    held.settle(10, 4)
    assert held.reserve(stop) == 4  # 8 of 10
    held.settle(4, 30)  # larger than the whole budget, and already on its way: it runs
    assert held.held == 34
    waiter: list[int | None] = []
    blocked = threading.Thread(target=lambda: waiter.append(held.reserve(stop)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # no room: the source waits
    held.release(4)
    blocked.join(0.3)
    assert blocked.is_alive()  # 30 held, 30 expected of the next: still no room
    held.release(30)
    blocked.join(5)
    assert waiter == [30] and held.held == 30  # the largest recent input is the next estimate
    held.settle(30, 0)  # that one failed: it holds nothing
    assert held.held == 0
    stop.set()
    assert HeldBytes(limit=1).reserve(stop) is None  # stopping: no more input
