"""The pipeline's second cost limit: a batch holds at most ``max_sequences`` decoder sequences, each image
counted as its decoding's beams (an item's own, else the model's), so greedy batches hold more images than
beam-search ones. The fake models of the other pipeline tests, with a decoding of their own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from captionfleet.core.captioner import ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.pipeline import CaptionPipeline
from tests.unit.stream_fakes import wait_for
from tests.unit.test_pipeline import FakeCaptioner, MemoryItem, MemorySink, png, run
from tests.unit.test_pipeline_lanes import INTERACTIVE, Offered, SteppedFake


class DecodingFake(FakeCaptioner):
    """A FakeCaptioner that decodes as a loaded model says it does (``decoding``), recording each model
    call's images (by red value) and the decoding it was asked for."""

    def __init__(self, num_beams: int) -> None:
        super().__init__()
        self.decoding = DecodingSettings(num_beams=num_beams)
        self.calls: list[tuple[list[int], object]] = []

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        self.calls.append(([int(item.features["red"]) for item in inputs], decoding))
        return super().caption_inputs(inputs, decoding)


@dataclass
class AskingItem(MemoryItem):
    """An item with a decoding of its own, as the caption API's requests carry."""

    decoding: DecodingSettings | None = None


@pytest.mark.parametrize(("beams", "images", "batches"), [(1, 160, [128, 32]), (4, 64, [32, 32]), (16, 16, [8, 8])])
def test_greedy_and_beam_batches_hold_the_images_the_sequence_limit_implies(
    beams: int, images: int, batches: list[int]
) -> None:
    """The GPU defaults: 128 images, 128 sequences (a minute's wait: only the limits close a batch)."""
    model = DecodingFake(beams)
    items = [MemoryItem(str(i), png((i, 0, 0))) for i in range(images)]
    sink, _ = run(items, model, max_items=128, max_sequences=128, max_wait_ms=60_000, prefetch=256)
    assert model.batches == batches
    assert len(sink.rows) == images and all(row.ok for row in sink.rows)


def test_the_model_behind_a_wrapper_says_how_many_beams_an_image_costs() -> None:
    model = DecodingFake(4)
    items = [MemoryItem(str(i), png((i, 0, 0))) for i in range(8)]
    run(items, HotSwapCaptioner(model), max_items=8, max_sequences=8, max_wait_ms=60_000)  # type: ignore[arg-type]
    assert model.batches == [2, 2, 2, 2]


def test_without_a_sequence_limit_the_batch_is_its_images() -> None:
    """The CPU default (max_sequences 0): 4 beams or not, max_items images a batch, as before the limit."""
    model = DecodingFake(4)
    run([MemoryItem(str(i), png((i, 0, 0))) for i in range(16)], model, max_items=8, max_wait_ms=60_000)
    assert model.batches == [8, 8]


def test_an_item_with_its_own_beams_counts_them() -> None:
    """A greedy model, 8 sequences a batch: an item asking for 4 beams counts 4, one asking for 8 fills a
    batch alone; a batch of mixed decodings runs one model call per decoding."""
    model = DecodingFake(1)
    four, eight = DecodingSettings(num_beams=4), DecodingSettings(num_beams=8)
    asked = {5: four, 7: eight}
    items = [AskingItem(str(i), png((i, 0, 0)), decoding=asked.get(i)) for i in range(1, 9)]
    run(items, model, max_items=8, max_sequences=8, max_wait_ms=60_000)  # type: ignore[arg-type]
    # Batches: 1-4 + 5 (4 + 4 sequences: full), 6 (7's 8 would overflow), 7 alone, 8 at the end.
    assert model.calls == [([1, 2, 3, 4], None), ([5], four), ([6], None), ([7], eight), ([8], None)]


def test_between_steps_the_interactive_images_taken_fit_the_sequence_limit() -> None:
    """A running stream batch is paused for the interactive images ready: as many as fit in 8 sequences
    (two at 4 beams), the third at the next step."""
    model = SteppedFake(steps=3)
    model.decoding = DecodingSettings(num_beams=1)  # type: ignore[attr-defined]
    pipeline = CaptionPipeline(
        model,  # type: ignore[arg-type]
        MemorySink(),
        BatchSettings(max_items=4, max_sequences=8, max_wait_ms=60_000, prefetch=64),
        ImageLimits(),
        on_item_result=lambda item, result: item.answer(result) if isinstance(item, Offered) else None,
        interactive_wait_ms=5,
    )
    done = threading.Event()

    def source() -> Iterator[MemoryItem]:
        yield from (MemoryItem(f"bulk-{i}", png((i, 0, 0))) for i in range(1, 5))
        done.wait(60)

    thread = threading.Thread(target=lambda: pipeline.run(source()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: model.reds == [[1, 2, 3, 4]], 30, "the stream batch at its first step")
        beams = DecodingSettings(num_beams=4)
        offered = [Offered(f"i{i}", INTERACTIVE + i, decoding=beams) for i in range(3)]
        for item in offered:
            pipeline.offer(item)
        lanes = pipeline._lanes
        wait_for(lambda: all(entry[1].done() for entry in list(lanes._urgent)), 30, "the offered images prepared")
        model.step()
        assert offered[0].future.result(timeout=30).ok and offered[1].future.result(timeout=30).ok
        assert model.reds[1] == [INTERACTIVE, INTERACTIVE + 1]  # 2 x 4 beams: the third did not fit
        model.step()
        assert offered[2].future.result(timeout=30).ok
        assert model.reds[2] == [INTERACTIVE + 2]
    finally:
        model.opened.set()
        done.set()
        thread.join(30)


def test_the_streams_share_of_a_batch_counts_the_images_its_decoding_lets_in() -> None:
    settings = BatchSettings(max_items=128, max_sequences=128)
    beams = CaptionPipeline(DecodingFake(4), MemorySink(), settings, ImageLimits(), bulk_share=0.25)  # type: ignore[arg-type]
    greedy = CaptionPipeline(DecodingFake(1), MemorySink(), settings, ImageLimits(), bulk_share=0.25)  # type: ignore[arg-type]
    assert (beams.bulk_rows, greedy.bulk_rows) == (8, 32)  # a quarter of 32 images, of 128
