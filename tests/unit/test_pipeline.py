"""The pipeline's own logic, with an in-memory source and sink and a fake model.

The fake captioner implements the same surface the pipeline uses from the real one
(version, draft_size, prepare, caption_inputs); the real model is covered elsewhere.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from captionfleet.core.captioner import ImageOrigin, KeptImage, ModelInput, PromptError
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BatchSettings
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline


def png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class MemoryItem:
    id: str
    data: bytes | Exception
    uri: str = ""
    prompt: str | None = None

    def read(self) -> bytes:
        if isinstance(self.data, Exception):
            raise self.data
        return self.data


@dataclass
class MemorySink:
    rows: list[Result] = field(default_factory=list)
    flushed: int = 0

    def done_ids(self) -> set[str]:
        return {r.id for r in self.rows}

    def write(self, results: list[Result]) -> None:
        self.rows.extend(results)

    def flush(self) -> None:
        self.flushed = len(self.rows)

    def close(self) -> None:
        self.flush()


class RedPreprocess:
    """Encodes the red channel of the top-left pixel so the fake model can 'caption' it."""

    def array(self, image: Image.Image) -> np.ndarray:
        return np.full((3, 2, 2), image.getpixel((0, 0))[0], dtype=np.float32)  # type: ignore[index]


class FakeCaptioner:
    version = "fake-1"
    family = "fake"
    preparation_key = "fake"
    draft_size = (2, 2)

    def __init__(self, fail_on_red: int | None = None, empty_on_red: int | None = None) -> None:
        self.preprocess = RedPreprocess()
        self.batches: list[int] = []
        self.costs: list[int] = []
        self.prompts: list[str | None] = []
        self.fail_on_red = fail_on_red
        self.empty_on_red = empty_on_red
        self.in_inference = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def prepare(
        self, image: Image.Image, prompt: str | None = None, *, origin: ImageOrigin | None = None
    ) -> ModelInput:
        if prompt == "refused":
            raise PromptError("this model takes no prompt")
        self.prompts.append(prompt)
        red = int(self.preprocess.array(image)[0, 0, 0])
        return ModelInput({"red": red}, cost=100 + red, key="fake", prompt=prompt, origin=origin or KeptImage(image))

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        self.in_inference.set()
        assert self.release.wait(10)
        reds = [int(item.features["red"]) for item in inputs]
        if self.fail_on_red is not None and self.fail_on_red in reds:
            raise RuntimeError("the model broke on this image")
        self.batches.append(len(reds))
        self.costs.append(sum(item.cost for item in inputs))
        return [
            Caption("" if r == self.empty_on_red else f"red={r}", -0.25 * r, r % 5 + 1, prompt=self.used(item))
            for r, item in zip(reds, inputs, strict=True)
        ]

    @staticmethod
    def used(item: ModelInput) -> str | None:
        """As a family's model says which prompt it used: the input's, else its default."""
        return item.prompt if item.prompt is not None else "fake default"


def run(items: list[MemoryItem], captioner: FakeCaptioner, **batch: int) -> tuple[MemorySink, CaptionPipeline]:
    sink = MemorySink()
    settings = BatchSettings(**{"max_items": 4, "max_wait_ms": 20, "prefetch": 8, **batch})
    pipeline = CaptionPipeline(captioner, sink, settings, ImageLimits())  # type: ignore[arg-type]
    pipeline.run(items)
    return sink, pipeline


def test_each_item_gets_one_row_and_bad_items_do_not_fail_their_batch() -> None:
    items = [MemoryItem(f"ok{i}", png((i, 0, 0))) for i in range(10)]
    items.insert(3, MemoryItem("corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10))
    items.insert(6, MemoryItem("empty", b""))
    items.insert(8, MemoryItem("gone", FileNotFoundError("no such file")))
    items.insert(9, MemoryItem("denied", PermissionError("denied")))
    sink, pipeline = run(items, FakeCaptioner())
    by_id = {r.id: r for r in sink.rows}
    assert sorted(by_id) == sorted(i.id for i in items)
    assert len(sink.rows) == len(items)
    for i in range(10):
        assert by_id[f"ok{i}"].caption == f"red={i}"  # captions stay attached to their images
        assert by_id[f"ok{i}"].model_version == "fake-1"
    assert by_id["corrupt"].error_kind in {"decode", "truncated"}
    assert by_id["empty"].error_kind == "empty"
    assert by_id["gone"].error_kind == "not_found"
    assert by_id["denied"].error_kind == "forbidden"
    assert pipeline.stats.done == 10 and pipeline.stats.failed == 4
    assert sink.flushed == len(items)  # the run ends flushed


def test_batches_respect_max_items() -> None:
    captioner = FakeCaptioner()
    run([MemoryItem(str(i), png((i, 0, 0))) for i in range(10)], captioner, max_items=4)
    assert sum(captioner.batches) == 10
    assert max(captioner.batches) <= 4


def test_an_image_that_breaks_the_model_fails_alone() -> None:
    captioner = FakeCaptioner(fail_on_red=5)
    sink, _ = run([MemoryItem(str(i), png((i, 0, 0))) for i in range(8)], captioner, max_items=8)
    by_id = {r.id: r for r in sink.rows}
    assert by_id["5"].error_kind == "inference"
    assert "broke" in (by_id["5"].error_message or "")
    assert all(by_id[str(i)].caption == f"red={i}" for i in range(8) if i != 5)


def test_decoding_continues_while_the_model_runs() -> None:
    """While batch 1 is in inference, the decode pool prepares the following images."""
    captioner = FakeCaptioner()
    captioner.release.clear()
    items = [MemoryItem(str(i), png((i, 0, 0))) for i in range(12)]
    prepared: list[str] = []
    sink = MemorySink()
    pipeline = CaptionPipeline(
        captioner,  # type: ignore[arg-type]
        sink,
        BatchSettings(max_items=4, max_wait_ms=1000, prefetch=8, decode_threads=2),
        ImageLimits(),
    )
    original = pipeline._prepare

    def spy(item: MemoryItem) -> object:
        result = original(item)
        prepared.append(item.id)
        return result

    pipeline._prepare = spy  # type: ignore[method-assign, assignment]
    runner = threading.Thread(target=pipeline.run, args=(items,))
    runner.start()
    assert captioner.in_inference.wait(10)
    # The first batch (4 images) is held in the model; more images get decoded meanwhile.
    deadline = threading.Event()
    for _ in range(100):
        if len(prepared) >= 8:
            break
        deadline.wait(0.05)
    assert len(prepared) >= 8
    captioner.release.set()
    runner.join(10)
    assert not runner.is_alive()
    assert len(sink.rows) == 12


def test_a_lone_item_is_not_held_back_waiting_for_a_full_batch() -> None:
    """The time trigger: a batch smaller than max_items still goes once max_wait passes."""
    gate = threading.Event()

    class SlowSource:
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield MemoryItem("first", png((1, 0, 0)))
            assert gate.wait(10)  # the source stalls until the first caption exists
            yield MemoryItem("second", png((2, 0, 0)))

    sink = MemorySink()
    captioner = FakeCaptioner()

    class GateSink(MemorySink):
        def write(self, results: list[Result]) -> None:
            super().write(results)
            gate.set()

    sink = GateSink()
    pipeline = CaptionPipeline(captioner, sink, BatchSettings(max_items=8, max_wait_ms=30), ImageLimits())  # type: ignore[arg-type]
    pipeline.run(SlowSource())  # type: ignore[arg-type]
    assert [r.id for r in sink.rows] == ["first", "second"]
    assert captioner.batches == [1, 1]


def test_source_errors_are_raised_after_in_flight_work_is_written() -> None:
    def broken() -> object:
        yield MemoryItem("a", png((1, 0, 0)))
        raise ConnectionError("listing failed")

    sink = MemorySink()
    pipeline = CaptionPipeline(FakeCaptioner(), sink, BatchSettings(), ImageLimits())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        pipeline.run(broken())  # type: ignore[arg-type]
    assert [r.id for r in sink.rows] == ["a"]


def test_an_unexpected_preprocessing_error_fails_only_that_item() -> None:
    class Picky(RedPreprocess):
        def array(self, image: Image.Image) -> np.ndarray:
            if image.getpixel((0, 0))[0] == 3:  # type: ignore[index]
                raise ValueError("preprocessing bug")
            return super().array(image)

    captioner = FakeCaptioner()
    captioner.preprocess = Picky()
    sink, _ = run([MemoryItem(str(i), png((i, 0, 0))) for i in range(6)], captioner)
    by_id = {r.id: r for r in sink.rows}
    assert len(sink.rows) == 6
    assert by_id["3"].error_kind == "decode" and "preprocessing bug" in (by_id["3"].error_message or "")
    assert all(by_id[str(i)].caption == f"red={i}" for i in range(6) if i != 3)


def test_a_failing_sink_stops_the_source_thread_and_raises() -> None:
    class BrokenSink(MemorySink):
        def write(self, results: list[Result]) -> None:
            raise OSError("disk full")

    items = [MemoryItem(f"ok{i}", png((i, 0, 0))) for i in range(50)]  # far more than the prefetch queue holds
    settings = BatchSettings(max_items=2, max_wait_ms=20, prefetch=2)
    pipeline = CaptionPipeline(FakeCaptioner(), BrokenSink(), settings, ImageLimits())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk full"):
        pipeline.run(items)
    # The producer was blocked on the full queue; left there it would hold its thread forever.
    assert not any(t.name == "source" and t.is_alive() for t in threading.enumerate())


# -- model inputs, confidence, empty captions, prompts ---------------------------------------------


def test_rows_carry_the_caption_confidence() -> None:
    sink, _ = run([MemoryItem(str(i), png((i, 0, 0))) for i in range(4)], FakeCaptioner())
    by_id = {r.id: r for r in sink.rows}
    for i in range(4):
        assert by_id[str(i)].mean_logprob == -0.25 * i
        assert by_id[str(i)].tokens == i % 5 + 1
        assert by_id[str(i)].to_row()["mean_logprob"] == -0.25 * i


def test_an_empty_caption_is_a_failure_row_of_its_own_kind() -> None:
    sink, pipeline = run([MemoryItem(str(i), png((i, 0, 0))) for i in range(4)], FakeCaptioner(empty_on_red=2))
    by_id = {r.id: r for r in sink.rows}
    assert by_id["2"].error_kind == "empty_caption" and by_id["2"].caption is None
    assert "--retry-failed empty_caption" in (by_id["2"].error_message or "")
    assert by_id["2"].tokens == 3  # what the model did is still there to look at
    assert all(by_id[str(i)].ok for i in (0, 1, 3))
    assert pipeline.stats.failed_by_kind == {"empty_caption": 1} and pipeline.stats.done == 3


def test_the_batcher_counts_what_each_input_costs_the_model() -> None:
    captioner = FakeCaptioner()
    # Costs 100 + red: 100, 101, ..., 105; a limit of 210 lets two inputs into a batch, never three.
    items = [MemoryItem(str(i), png((i, 0, 0))) for i in range(6)]
    run(items, captioner, max_items=8, max_pixels=210, max_wait_ms=10_000)
    assert captioner.batches == [2, 2, 2]
    assert captioner.costs == [201, 205, 209]


def test_an_item_prompt_reaches_the_model_and_a_refused_one_fails_alone() -> None:
    captioner = FakeCaptioner()
    items = [
        MemoryItem("default", png((1, 0, 0))),
        MemoryItem("asked", png((2, 0, 0)), prompt="a picture of"),
        MemoryItem("refused", png((3, 0, 0)), prompt="refused"),
    ]
    sink, _ = run(items, captioner)
    by_id = {r.id: r for r in sink.rows}
    assert sorted(captioner.prompts, key=str) == [None, "a picture of"]
    assert by_id["refused"].error_kind == "malformed" and "takes no prompt" in (by_id["refused"].error_message or "")
    assert by_id["default"].ok and by_id["asked"].ok


def test_results_name_the_prompt_used_and_the_job_prompt_fills_in_for_items_without_one() -> None:
    items = [
        MemoryItem("own", png((1, 0, 0)), prompt="a picture of"),
        MemoryItem("none", png((2, 0, 0))),
        MemoryItem("refused", png((3, 0, 0)), prompt="refused"),
        MemoryItem("gone", FileNotFoundError("no such file"), prompt="asked for the gone one"),
    ]
    sink, _ = run(items, FakeCaptioner())
    by_id = {r.id: r for r in sink.rows}
    assert (by_id["own"].prompt, by_id["none"].prompt) == ("a picture of", "fake default")
    # Failure rows echo the prompt as asked: no caption names it.
    assert (by_id["refused"].prompt, by_id["gone"].prompt) == ("refused", "asked for the gone one")
    assert by_id["own"].to_row()["prompt"] == "a picture of"

    captioner = FakeCaptioner()
    sink = MemorySink()
    settings = BatchSettings(max_items=4, max_wait_ms=20)
    CaptionPipeline(captioner, sink, settings, ImageLimits(), prompt="the job's").run(items[:2])  # type: ignore[arg-type]
    by_id = {r.id: r for r in sink.rows}
    assert sorted(captioner.prompts, key=str) == ["a picture of", "the job's"]  # an item's own prompt wins
    assert (by_id["own"].prompt, by_id["none"].prompt) == ("a picture of", "the job's")


def test_a_job_prompt_for_a_model_that_takes_none_is_refused_before_any_work() -> None:
    captioner = FakeCaptioner()
    captioner.family = "vision-encoder-decoder"  # type: ignore[misc]
    with pytest.raises(PromptError, match=r"takes no prompt, but the job has one \('a photo of'\): drop --prompt"):
        CaptionPipeline(captioner, MemorySink(), BatchSettings(), ImageLimits(), prompt="a photo of")  # type: ignore[arg-type]
    assert captioner.prompts == []
    CaptionPipeline(captioner, MemorySink(), BatchSettings(), ImageLimits())  # type: ignore[arg-type]


class SwappedToNoPrompts(FakeCaptioner):
    """What a hot swap to ViT-GPT2 does to inputs prepared with a prompt before it: preparing them again
    (own_inputs, inside caption_inputs) refuses the prompt, failing the batch they are in."""

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        if any(item.prompt is not None for item in inputs):
            raise PromptError("a vision-encoder-decoder model takes no prompt")
        return super().caption_inputs(inputs, decoding)


def test_a_prompt_the_model_swapped_in_cannot_take_fails_that_item_alone_as_malformed() -> None:
    items = [MemoryItem(f"plain{i}", png((i, 0, 0))) for i in range(3)]
    items.insert(1, MemoryItem("asked", png((9, 0, 0)), prompt="a picture of"))
    sink, pipeline = run(items, SwappedToNoPrompts(), max_items=4, max_wait_ms=10_000)
    by_id = {r.id: r for r in sink.rows}
    assert len(sink.rows) == 4 and all(by_id[f"plain{i}"].caption == f"red={i}" for i in range(3))
    assert by_id["asked"].error_kind == "malformed" and "takes no prompt" in (by_id["asked"].error_message or "")
    assert by_id["asked"].prompt == "a picture of"
    assert pipeline.stats.failed_by_kind == {"malformed": 1}
