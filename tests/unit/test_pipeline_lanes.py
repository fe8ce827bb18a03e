"""The latency lane in the pipeline's one batcher: interactive items (``offer``) overtake a queued backlog,
stream/bulk items keep their share of every batch while both lanes wait, a cancelled interactive item is
dropped, and an item's own decoding gets its own model call. A fake model whose batches wait at a gate
records what each batch held, so the order is asserted, never a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest

from captionfleet.core.between_steps import in_nested_call, step_processors
from captionfleet.core.captioner import ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker import pipeline as pipeline_module
from captionfleet.worker.messages import Result
from captionfleet.worker.pipeline import CaptionPipeline, RunStats
from tests.unit.stream_fakes import wait_for
from tests.unit.test_pipeline import FakeCaptioner, MemoryItem, MemorySink, png

INTERACTIVE = 100  # red values from here on are interactive items


class GatedFake(FakeCaptioner):
    """Captions each image with its red value; each batch waits at the gate (``step`` lets one through)."""

    def __init__(self) -> None:
        super().__init__()
        self.reds: list[list[int]] = []  # each batch's images, by their red value
        self.decodings: list[object] = []
        self._permits = threading.Semaphore(0)
        self.opened = threading.Event()

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        reds = [int(item.features["red"]) for item in inputs]
        self.reds.append(reds)
        self.decodings.append(decoding)
        while not self.opened.is_set() and not self._permits.acquire(timeout=0.01):
            pass
        return [Caption(str(red), -0.5, 1) for red in reds]

    def step(self, batches: int = 1) -> None:
        for _ in range(batches):
            self._permits.release()


@dataclass(eq=False)
class Offered:
    """An interactive item (worker.lanes.InteractiveItem)."""

    id: str
    red: int
    decoding: DecodingSettings | None = None
    uri: str = ""
    future: Future[Result] = field(default_factory=Future)
    drops: int = 0

    def read(self) -> bytes:
        return png((self.red, 0, 0))

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def answer(self, result: Result) -> None:
        self.future.set_result(result)

    def dropped(self) -> None:
        self.drops += 1


class Run:
    """A pipeline over a bulk source, run in a thread, with its interactive answers routed to their futures."""

    def __init__(self, model: GatedFake, bulk: int, *, share: float, max_items: int = 4, wait_ms: int = 5) -> None:
        self.sink = MemorySink()
        self.done = threading.Event()
        self.on_result: list[str] = []  # ids the run's per-row hook saw
        self.stats: list[RunStats] = []
        self.pipeline = CaptionPipeline(
            model,  # type: ignore[arg-type]
            self.sink,
            BatchSettings(max_items=max_items, max_wait_ms=60_000, prefetch=64),
            ImageLimits(),
            on_result=lambda result: self.on_result.append(result.id),
            on_item_result=self._answered,
            interactive_wait_ms=wait_ms,
            bulk_share=share,
        )
        self.items = [MemoryItem(f"bulk-{i}", png((i, 0, 0))) for i in range(1, bulk + 1)]
        self.thread = threading.Thread(target=lambda: self.stats.append(self.pipeline.run(self._source())), daemon=True)

    def _source(self) -> Iterator[MemoryItem]:
        yield from self.items
        self.done.wait()  # the source stays open, as the stream's does, until the test ends it

    def _answered(self, item: object, result: Result) -> None:
        if isinstance(item, Offered):
            item.answer(result)

    def finish(self, model: GatedFake) -> None:
        model.opened.set()
        self.done.set()
        self.thread.join(30)


def test_an_interactive_item_overtakes_the_queued_backlog() -> None:
    model = GatedFake()
    run = Run(model, bulk=40, share=0.25)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the first batch at the gate")
    wait_for(lambda: run.pipeline._lanes._bulk.__len__() >= 30, 30, "the backlog queued")
    urgent = Offered("now", INTERACTIVE)
    run.pipeline.offer(urgent)
    model.step()  # the first batch ends; the next one is formed with the interactive item in it
    wait_for(lambda: len(model.reds) == 2, 30, "the second batch")
    assert INTERACTIVE in model.reds[1]
    model.step()
    assert urgent.future.result(timeout=30).caption == str(INTERACTIVE)
    run.finish(model)
    # Nothing of the backlog lost or captioned twice, and only it went to the sink.
    assert sorted(r.id for r in run.sink.rows) == sorted(item.id for item in run.items)
    assert sorted(red for batch in model.reds for red in batch) == [*range(1, 41), INTERACTIVE]


def test_stream_items_keep_their_share_of_every_batch_while_both_lanes_wait() -> None:
    model = GatedFake()
    run = Run(model, bulk=20, share=0.5)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the first batch at the gate")
    flood = [Offered(f"i{i}", INTERACTIVE + i) for i in range(40)]
    for item in flood:
        run.pipeline.offer(item)
    model.step(6)
    wait_for(lambda: len(model.reds) >= 6, 30, "five more batches")
    for batch in model.reds[1:6]:  # both lanes were waiting: half the rows each
        assert len([red for red in batch if red < INTERACTIVE]) == 2, model.reds
        assert len([red for red in batch if red >= INTERACTIVE]) == 2, model.reds
    run.finish(model)
    assert all(item.future.result(timeout=30).caption == str(item.red) for item in flood)
    assert len(run.sink.rows) == 20


def test_a_batch_with_an_interactive_item_runs_after_its_own_wait_not_the_streams() -> None:
    model = GatedFake()
    model.opened.set()
    run = Run(model, bulk=1, share=0.25, max_items=8, wait_ms=0)  # the stream's wait is a minute
    run.thread.start()
    try:
        urgent = Offered("alone", INTERACTIVE)
        run.pipeline.offer(urgent)
        assert urgent.future.result(timeout=30).ok  # well before the minute: the interactive wait is 0
        assert INTERACTIVE in model.reds[0]  # the first batch, whatever the stream's wait
    finally:
        run.finish(model)


def test_a_cancelled_interactive_item_is_dropped_and_its_own_decoding_gets_its_own_call() -> None:
    model = GatedFake()
    run = Run(model, bulk=1, share=0.25, max_items=8, wait_ms=50)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 0, 1, "nothing yet")
    gone = Offered("gone", INTERACTIVE)
    gone.future.cancel()
    beams = DecodingSettings(num_beams=2, max_new_tokens=5)
    own = Offered("own", INTERACTIVE + 1, decoding=beams)
    plain = Offered("plain", INTERACTIVE + 2)
    for item in (gone, own, plain):
        run.pipeline.offer(item)
    model.opened.set()
    assert own.future.result(timeout=30).ok and plain.future.result(timeout=30).ok
    assert gone.drops == 1
    assert sorted(map(sorted, model.reds)) == [[1, INTERACTIVE + 2], [INTERACTIVE + 1]]
    assert beams in model.decodings
    run.finish(model)


class StepClock:
    """The pipeline's ``time`` where model time is what the fake model says: each decoding step of a running
    call takes ``step_s``, a call nested in its pause ``nested_s`` (the batcher's waits stay real)."""

    def __init__(self, step_s: float, nested_s: float) -> None:
        self.now = 0.0
        self.step_s = step_s
        self.nested_s = nested_s

    def perf_counter(self) -> float:
        return self.now

    monotonic = staticmethod(time.monotonic)


class SteppedFake(GatedFake):
    """A GatedFake whose calls decode in ``steps`` steps as generate() does: each waits at the gate, then runs
    the step processors (core/between_steps.py), where the pipeline may caption interactive items in a call
    of their own. Such a nested call runs at once."""

    def __init__(self, steps: int, clock: StepClock | None = None) -> None:
        super().__init__()
        self.steps = steps
        self.clock = clock

    def caption_inputs(self, inputs: list[ModelInput], decoding: object = None) -> list[Caption]:
        reds = [int(item.features["red"]) for item in inputs]
        self.reds.append(reds)
        if in_nested_call() and self.clock is not None:
            self.clock.now += self.clock.nested_s
        if not in_nested_call():
            for _ in range(self.steps):
                while not self.opened.is_set() and not self._permits.acquire(timeout=0.01):
                    pass
                if self.clock is not None:
                    self.clock.now += self.clock.step_s
                for processor in step_processors():
                    processor(None, None)  # type: ignore[arg-type]
        return [Caption(str(red), -0.5, 1) for red in reds]


def offer_prepared(run: Run, item: Offered) -> None:
    """Offer an item and wait until it is decoded: ready to be taken between two steps."""
    run.pipeline.offer(item)
    lanes = run.pipeline._lanes
    wait_for(lambda: not lanes._urgent or lanes._urgent[-1][1].done(), 30, f"{item.id} prepared")


def test_an_interactive_item_is_captioned_between_the_steps_of_a_running_batch() -> None:
    model = SteppedFake(steps=3)
    run = Run(model, bulk=8, share=0.25)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the first batch at its first step")
    urgent = Offered("now", INTERACTIVE)
    offer_prepared(run, urgent)
    model.step()  # one decoding step of the running batch
    assert urgent.future.result(timeout=30).caption == str(INTERACTIVE)
    assert model.reds == [[1, 2, 3, 4], [INTERACTIVE]]  # in a call of its own, while the batch still runs
    assert run.sink.rows == []
    run.finish(model)
    assert sorted(r.id for r in run.sink.rows) == sorted(item.id for item in run.items)  # nothing lost


def test_a_batch_is_paused_again_once_it_has_run_as_long_as_it_was_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step of the stream batch takes 1 s, a nested call 3 s: after a pause at its first step it runs
    unpaused until its own time (3 s) has caught up with the pause.
    A batch holding interactive items is never paused."""
    clock = StepClock(step_s=1, nested_s=3)
    monkeypatch.setattr(pipeline_module, "time", clock)
    model = SteppedFake(steps=5, clock=clock)
    run = Run(model, bulk=8, share=0.25)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the stream batch at its first step")
    first, second, third, fourth = (Offered(f"i{i}", INTERACTIVE + i) for i in range(4))
    offer_prepared(run, first)
    model.step()  # step 1 (own time 1 s): paused for first (3 s)
    assert first.future.result(timeout=30).ok
    offer_prepared(run, second)
    model.step()  # step 2: own 2 s < 3 s paused: not paused
    assert not second.future.done()
    model.step()  # step 3: own 3 s: paused again
    assert second.future.result(timeout=30).ok
    assert model.reds == [[1, 2, 3, 4], [INTERACTIVE], [INTERACTIVE + 1]] and run.sink.rows == []
    offer_prepared(run, third)
    model.step(2)  # steps 4 and 5: own 4 and 5 s < 6 s paused: third waits for the next batch
    wait_for(lambda: len(model.reds) == 4, 30, "the next batch")
    assert model.reds[3] == [5, INTERACTIVE + 2, 6, 7]  # the stream's share first, then the interactive item
    offer_prepared(run, fourth)  # that batch holds an interactive item: it is not paused
    model.step(5)
    assert third.future.result(timeout=30).ok
    wait_for(lambda: len(model.reds) == 5, 30, "the batch after")
    assert model.reds[4] == [8, INTERACTIVE + 3]
    run.finish(model)
    assert fourth.future.result(timeout=30).ok
    assert sorted(red for batch in model.reds for red in batch) == [*range(1, 9), *range(INTERACTIVE, INTERACTIVE + 4)]
    assert len(run.sink.rows) == 8


@pytest.mark.parametrize(("steps", "nested_s"), [(3, 3), (5, 3), (6, 2)])
def test_under_a_flood_of_requests_a_batch_is_paused_at_most_its_own_time_and_one_pause(
    monkeypatch: pytest.MonkeyPatch, steps: int, nested_s: float
) -> None:
    """A request ready at every step of the stream batch, pauses of one size: the time paused is at most the
    batch's own plus one pause (a third of the model's time at worst for the stream), never more."""
    clock = StepClock(step_s=1, nested_s=nested_s)
    monkeypatch.setattr(pipeline_module, "time", clock)
    model = SteppedFake(steps=steps, clock=clock)
    run = Run(model, bulk=4, share=0.25)
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the stream batch at its first step")
    for step in range(steps):
        offer_prepared(run, Offered(f"i{step}", INTERACTIVE + step))
        model.step()
    wait_for(lambda: bool(run.sink.rows), 30, "the stream batch written")
    own = steps * 1.0  # the clock moves only for the batch's steps and the calls nested in its pauses
    paused = clock.now - own
    run.finish(model)
    assert 0 < paused <= own + nested_s, (model.reds, paused, own)


@dataclass(eq=False)
class Unreadable(Offered):
    """An interactive item whose bytes are no image: a failure answered to its client."""

    def read(self) -> bytes:
        return b"not an image"


def test_interactive_answers_are_no_part_of_the_runs_results_stats_or_per_row_hook() -> None:
    """What lets a bulk job serve the API: its rows, counts (its exit status) and progress are its own items'."""
    model = GatedFake()
    model.opened.set()
    run = Run(model, bulk=6, share=0.25)
    run.thread.start()
    offered = [Offered("ok", INTERACTIVE), Unreadable("bad", INTERACTIVE + 1)]
    for item in offered:
        run.pipeline.offer(item)
    assert offered[0].future.result(timeout=30).ok
    assert offered[1].future.result(timeout=30).error_kind is not None
    run.finish(model)
    assert sorted(run.on_result) == sorted(r.id for r in run.sink.rows) == sorted(i.id for i in run.items)
    assert run.stats[0].done == 6 and run.stats[0].failed == 0


def test_an_interactive_item_left_in_the_open_batch_is_taken_between_steps_too() -> None:
    """Its cost did not fit the open stream batch, which was flushed ahead of it: it must not wait for all of
    that batch while later interactive items are captioned between its steps."""
    model = SteppedFake(steps=3)
    sink = MemorySink()
    pipeline = CaptionPipeline(
        model,  # type: ignore[arg-type]
        sink,
        BatchSettings(max_items=4, max_wait_ms=60_000, prefetch=64, max_pixels=350),  # costs: 100 + red
        ImageLimits(),
        on_item_result=lambda item, result: item.answer(result) if isinstance(item, Offered) else None,
        interactive_wait_ms=5,
        bulk_share=0.25,
    )
    done = threading.Event()

    def source() -> Iterator[MemoryItem]:
        yield from (MemoryItem(f"bulk-{i}", png((i, 0, 0))) for i in (1, 2))
        done.wait(60)

    thread = threading.Thread(target=lambda: pipeline.run(source()), daemon=True)
    thread.start()
    wait_for(lambda: pipeline._open is not None and pipeline._open.rows == 2, 30, "two stream items in the open batch")
    first = Offered("first", INTERACTIVE)  # 101 + 102 + 200 > 350: the stream batch is flushed ahead of it
    pipeline.offer(first)
    wait_for(lambda: model.reds == [[1, 2]], 30, "the stream batch at its first step")
    model.step()
    assert first.future.result(timeout=30).ok
    assert model.reds == [[1, 2], [INTERACTIVE]]
    model.opened.set()
    done.set()
    thread.join(30)
    assert sorted(r.id for r in sink.rows) == ["bulk-1", "bulk-2"]


def test_a_failure_in_the_pause_stops_the_run_as_it_would_outside_one() -> None:
    """An error of the interactive answers' callback is not blamed on the paused batch (which would then be
    captioned again one by one): the run stops with it, as it does when the callback fails outside a pause."""
    model = SteppedFake(steps=3)

    class AnswerBroke(Exception):
        pass

    def answered(item: object, result: Result) -> None:
        if isinstance(item, Offered):
            raise AnswerBroke("the client's callback broke")

    pipeline = CaptionPipeline(
        model,  # type: ignore[arg-type]
        MemorySink(),
        BatchSettings(max_items=4, max_wait_ms=60_000, prefetch=64),
        ImageLimits(),
        on_item_result=answered,
        interactive_wait_ms=5,
        bulk_share=0.25,
    )
    failures: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run(iter([MemoryItem(f"bulk-{i}", png((i, 0, 0))) for i in range(1, 5)]))
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the stream batch at its first step")
    urgent = Offered("now", INTERACTIVE)
    lanes = pipeline._lanes
    pipeline.offer(urgent)
    wait_for(lambda: lanes._urgent and lanes._urgent[-1][1].done(), 30, "prepared")
    model.opened.set()
    thread.join(30)
    assert len(failures) == 1 and isinstance(failures[0], AnswerBroke)
    assert model.reds == [[1, 2, 3, 4], [INTERACTIVE]]  # the stream batch was not captioned again one by one


def test_a_batch_is_not_paused_with_pauses_off() -> None:
    model = SteppedFake(steps=3)
    run = Run(model, bulk=4, share=0.25)
    run.pipeline.pause_batches = False  # WORKER_HTTP__PAUSE_BATCHES=false
    run.thread.start()
    wait_for(lambda: len(model.reds) == 1, 30, "the stream batch at its first step")
    urgent = Offered("now", INTERACTIVE)
    offer_prepared(run, urgent)
    model.step(6)  # the whole stream batch, no pause; then the interactive item's own batch
    assert urgent.future.result(timeout=30).ok
    assert model.reds == [[1, 2, 3, 4], [INTERACTIVE]]
    assert len(run.sink.rows) == 4  # written before the interactive item was captioned
    run.finish(model)
