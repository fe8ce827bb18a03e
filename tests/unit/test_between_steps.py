"""A model call nested between the decoding steps of a running one (core/between_steps.py): the running
call's captions are exactly those it gives without the pause (greedy and beams, ViT-GPT2 and another
family), the nested call's are those of its images alone, and a hot swap offered meanwhile waits for the
paused call to end. The pipeline's side (an interactive image overtaking a running stream/bulk batch) is
in test_pipeline_lanes.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from captionfleet.core import between_steps as between_steps_module
from captionfleet.core.between_steps import between_steps, in_nested_call, step_processors
from captionfleet.core.captioner import CaptionModel, ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker import pipeline as pipeline_module
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.pipeline import CaptionPipeline
from captionfleet.worker.stream import metered as metered_module
from captionfleet.worker.stream.metered import MeteredCaptioner
from tests.tiny_families import pictures
from tests.unit.stream_fakes import wait_for
from tests.unit.test_pipeline import FakeCaptioner, MemoryItem, MemorySink, png
from tests.unit.test_pipeline_lanes import Offered

GREEDY = DecodingSettings(num_beams=1, max_new_tokens=8)
BEAMS = DecodingSettings(num_beams=4, max_new_tokens=8)


def picture_set(count: int, offset: int) -> list[Image.Image]:
    return pictures(count + offset)[offset:]


def paused_once(
    model: CaptionModel,
    running: list[ModelInput],
    nested: list[ModelInput],
    outer: DecodingSettings,
    inner: DecodingSettings,
) -> tuple[list[Caption], list[Caption], int]:
    """Caption ``running`` with ``nested`` captioned between its 2nd and 3rd decoding steps; also the steps seen."""
    got: list[list[Caption]] = []
    steps = 0

    def hook() -> None:
        nonlocal steps
        steps += 1
        if steps == 2:
            got.append(model.caption_inputs(nested, inner))

    with between_steps(hook):
        captions = model.caption_inputs(running, outer)
    assert got, "the running call never paused"
    return captions, got[0], steps


@pytest.mark.parametrize(
    ("outer", "inner"),
    [(GREEDY, GREEDY), (BEAMS, GREEDY), (GREEDY, BEAMS)],
    ids=["greedy", "beams-then-greedy", "greedy-then-beams"],
)
def test_a_paused_call_captions_as_it_does_without_the_pause(
    tiny_checkpoint: Path, outer: DecodingSettings, inner: DecodingSettings
) -> None:
    model = load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    running = [model.prepare(image) for image in picture_set(6, 0)]
    nested = [model.prepare(image) for image in picture_set(2, 6)]
    paused, inside, steps = paused_once(model, running, nested, outer, inner)
    assert paused == model.caption_inputs(running, outer)  # text, confidence and tokens, exactly
    assert inside == model.caption_inputs(nested, inner)  # as that batch without a call around it
    assert steps >= 2
    assert len({caption.text for caption in paused}) > 1  # the check has teeth: captions follow their images


@pytest.mark.parametrize("decoding", [GREEDY, BEAMS], ids=["greedy", "4-beams"])
# Qwen-VL: transformers once kept its rope offsets on the model between steps, where a nested call overwrote them.
@pytest.mark.parametrize("family", ["git", "qwen2_vl"])
def test_another_family_pauses_the_same_way(
    tiny_family: Callable[[str], Path], family: str, decoding: DecodingSettings
) -> None:
    model = load_checkpoint(tiny_family(family), device="cpu", precision="fp32")
    running = [model.prepare(image) for image in picture_set(4, 0)]
    nested = [model.prepare(image, "a photo of") for image in picture_set(2, 4)]
    paused, inside, _ = paused_once(model, running, nested, decoding, GREEDY)
    assert paused == model.caption_inputs(running, decoding)
    assert inside == model.caption_inputs(nested, GREEDY)


def test_a_nested_call_gets_no_hook_and_outside_a_pause_there_is_none() -> None:
    assert step_processors() == [] and not in_nested_call()
    seen: list[tuple[int, bool]] = []

    def hook() -> None:
        seen.append((len(step_processors()), in_nested_call()))

    with between_steps(hook):
        (processor,) = step_processors()
        processor(None, None)  # type: ignore[arg-type]  # what generate() does after a step
    assert seen == [(0, True)]
    assert step_processors() == [] and not in_nested_call()


class SteppedFake(FakeCaptioner):
    """Captions with its version, running the step processors as generate() does (two steps)."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version
        self.source = f"memory://{version}"

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        for processor in step_processors() * 2:
            processor(None, None)  # type: ignore[arg-type]
        return [Caption(self.version, -0.1, 1) for _ in inputs]


def test_a_swap_offered_during_a_pause_waits_for_the_paused_call() -> None:
    old, new = SteppedFake("old"), SteppedFake("new")
    served = HotSwapCaptioner(old)
    item = old.prepare(Image.new("RGB", (4, 4), (7, 0, 0)))
    nested: list[list[Caption]] = []

    def hook() -> None:
        served.offer(new)  # the watcher's thread could do this at any moment
        nested.append(served.caption_inputs([item]))

    with between_steps(hook):
        running = served.caption_inputs([item])
    # The paused call and the calls nested in it ran on the model it started on, and it names that model.
    assert [c.text for c in running] == ["old"] and [c.text for batch in nested for c in batch] == ["old", "old"]
    assert served.version == "old"
    assert [c.text for c in served.caption_inputs([item])] == ["new"]  # the next batch swaps


class FakeClock:
    """``time`` for the modules that time model calls: perf_counter is what the fake model's steps make it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    monotonic = staticmethod(time.monotonic)  # the batcher's waits stay real


class TimedFake(SteppedFake):
    """Each of its two steps takes 1 s, a call nested in its pause 5 s (on the fake clock)."""

    def __init__(self, clock: FakeClock, before_steps: Callable[[], None] = lambda: None) -> None:
        super().__init__("timed")
        self.clock = clock
        self.before_steps = before_steps

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        if in_nested_call():
            self.clock.now += 5
        else:
            self.before_steps()
            for _ in range(2):
                self.clock.now += 1
                for processor in step_processors():
                    processor(None, None)  # type: ignore[arg-type]
        return [Caption(f"red={item.features['red']}", -0.1, 1) for item in inputs]


class Observed:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def test_a_paused_calls_metered_time_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(between_steps_module, "time", clock)
    monkeypatch.setattr(metered_module, "time", clock)
    inference = Observed()
    model = MeteredCaptioner(TimedFake(clock), SimpleNamespace(batch_size=Observed(), inference=inference))  # type: ignore[arg-type]
    item = model.prepare(Image.new("RGB", (4, 4), (7, 0, 0)))
    done: list[int] = []

    def hook() -> None:
        if not done:
            done.append(len(model.caption_inputs([item])))

    with between_steps(hook):
        model.caption_inputs([item, item])
    assert inference.values == [5.0, 2.0]  # the nested call's 5 s, then the paused call's own 2 s (not 7)


def test_a_paused_batchs_rows_give_its_own_inference_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(between_steps_module, "time", clock)
    monkeypatch.setattr(pipeline_module, "time", clock)
    urgent = Offered("now", 100)
    offered: list[Offered] = []

    def offer_once() -> None:  # while the stream batch runs, before its first step
        if not offered:
            offered.append(urgent)
            pipeline.offer(urgent)
            wait_for(lambda: pipeline._lanes._urgent[-1][1].done(), 30, "prepared")

    model = TimedFake(clock, before_steps=offer_once)
    rows: dict[str, float | None] = {}
    pipeline = CaptionPipeline(
        model,  # type: ignore[arg-type]
        MemorySink(),
        BatchSettings(max_items=2, max_wait_ms=60_000, prefetch=8),
        ImageLimits(),
        on_item_result=lambda item, result: rows.__setitem__(result.id, result.inference_ms),
        interactive_wait_ms=5,
    )
    pipeline.run(iter([MemoryItem(f"bulk-{i}", png((i, 0, 0))) for i in (1, 2)]))
    assert rows == {"now": 5000.0, "bulk-1": 2000.0, "bulk-2": 2000.0}
