"""fetch -> decode -> batch -> caption -> write, with decoding overlapping inference.

Each item is fetched, decoded and prepared for the model (``CaptionModel.prepare``: resizing,
normalising, its prompt's tokens) on its own in a bounded thread pool (PIL and numpy release the GIL),
so one bad image yields one failure row and never fails a batch, and the next batch is being prepared
while the model runs on the current one. Items flow to the batcher in input order; the batcher decides
when a batch goes to the model, counting each input's costs (the pixels its model processes, and its
decoder sequences: its decoding's beams). The model thread calls ``caption_inputs``; an input prepared for
a model that was swapped out meanwhile is prepared again by the new one from the item's bytes
(``core.images.EncodedImage``). A caption with no text is a failure row of its own kind (``empty_caption``).

The latency lane: ``offer()`` hands in interactive items (the caption API's, ``worker.lanes``) from any
thread. They are prepared on their own threads, go to the front of the model's input, and a batch holding
one runs after the interactive lane's short wait, its free rows filled by the stream/bulk items ready by
then. While both lanes wait, ``bulk_share`` of each batch's rows stays the stream's/bulk's, so a flood of
interactive requests slows them down and never stops them. An interactive item cancelled before its batch
runs is dropped. Interactive answers reach ``on_item_result`` only: never the sink, the run's stats or
``on_result``, so a bulk job serving the API writes and counts exactly what it would without it.

What inputs hold until their results are out (tensors and their source bytes) is bounded in number
(``prefetch``) and in bytes (``prefetch_mb``, ``HeldBytes``); interactive items are not counted there.

JPEGs on the GPU (``WORKER_BATCH__DEVICE_DECODE``, ``core.gpu_images.DeviceJpegs``): for a model with
fixed-size inputs on a CUDA device, the decode threads fetch and check each JPEG (sniffing, the header's
pixel limit) but leave it undecoded; the model thread decodes a batch's JPEGs together on the device right
before its model call (``_decode_jpegs``). An image neither the device nor the CPU can decode is a failure
row of its own; other formats and families are prepared by the decode threads as above.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from captionfleet.core.between_steps import HookFailed, between_steps, pauses
from captionfleet.core.captioner import (
    CaptionModel,
    FixedSizeInputs,
    ModelInput,
    PreparationFailed,
    PromptError,
    decoding_of_model,
    is_undecoded,
)
from captionfleet.core.failures import (
    EMPTY_CAPTION,
    FETCH_FAILURE,
    FORBIDDEN,
    INFERENCE_FAILURE,
    MALFORMED,
    NOT_FOUND,
    TIMEOUT,
    FetchError,
    ImageError,
)
from captionfleet.core.family import takes_prompt
from captionfleet.core.gpu_images import Decoder, DeviceJpegs
from captionfleet.core.images import EncodedImage, ImageLimits, decode_image, jpeg_draft_size
from captionfleet.core.settings import BatchSettings, DecodingSettings, SettingsError
from captionfleet.core.threads import CPU_DECODE_THREADS
from captionfleet.worker.batcher import Batcher, added, within
from captionfleet.worker.lanes import InteractiveItem, LaneQueue
from captionfleet.worker.messages import Result
from captionfleet.worker.sinks import Sink

logger = logging.getLogger(__name__)


class Item(Protocol):
    """What a source yields: something with an id and uri whose bytes can be read. An item may also
    carry a ``prompt`` (``str | None``; absent or None: the job's prompt, else the model family's default,
    see ``prompt_of``)."""

    @property
    def id(self) -> str: ...
    @property
    def uri(self) -> str: ...
    def read(self) -> bytes: ...


def prompt_of(item: Item) -> str | None:
    """The item's prompt. Optional in the protocol (getattr): sources whose requests have no prompt
    need not declare one."""
    prompt = getattr(item, "prompt", None)
    return prompt if isinstance(prompt, str) else None


def refuse_prompt_it_cannot_take(captioner: CaptionModel, prompt: str | None) -> None:
    """A job's prompt (``--prompt``, WORKER_BULK__PROMPT) for a model that takes none would fail every
    item one by one: refused once, before any work, naming the fix."""
    if prompt is not None and not takes_prompt(captioner.family):
        raise PromptError(
            f"the model {captioner.version} ({captioner.family}) takes no prompt, but the job has one ({prompt!r}): "
            "drop --prompt (WORKER_BULK__PROMPT), or caption with a model of a family that takes one (blip, git, "
            "florence2, the VLMs)"
        )


@dataclass
class Prepared:
    item: Item
    input: ModelInput | None = None
    failure: Result | None = None
    width: int = 0
    height: int = 0
    size: int = 0
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    ready_at: float = 0.0
    urgent: bool = False  # offered through the interactive lane (an InteractiveItem)
    held: int = 0  # the bytes its input holds until its results are out (see HeldBytes)


def held_bytes(prepared: ModelInput, source: bytes) -> int:
    """What one input holds: its tensors (numpy or torch) and the source bytes its origin keeps. A JPEG left
    for the GPU to decode holds its compressed bytes only: those same source bytes, counted once."""
    return len(source) + sum(int(getattr(value, "nbytes", 0)) for value in prepared.features.values())


def check_device_decoding(captioner: CaptionModel, jpegs: DeviceJpegs) -> None:
    """WORKER_BATCH__DEVICE_DECODE=on for a model whose JPEGs cannot decode on its device: refused at start,
    naming the fix, rather than leaving the CPU the bottleneck that "on" was set to remove. Otherwise the
    start's log says where JPEGs decode (auto's choice is not otherwise visible)."""
    if jpegs.mode == "off":
        return
    model = fixed_size_inputs(captioner)
    reason = jpegs.why_not(model)
    if reason is not None and jpegs.mode == "on":
        raise SettingsError(
            f"WORKER_BATCH__DEVICE_DECODE=on, but {reason} (model {captioner.version}): set it to auto (the GPU "
            "where it can, else the CPU) or off, or serve a ViT-GPT2-style model on a CUDA GPU (WORKER_MODEL__DEVICE)"
        )
    if reason is None and model is not None:
        logger.info("JPEGs decode on %s, a batch's together (WORKER_BATCH__DEVICE_DECODE=%s)", model.device, jpegs.mode)
    elif model is not None and model.device.type == "cuda":  # a GPU worker that decodes on the CPU: say why
        logger.info("JPEGs decode in the decode threads: %s (WORKER_BATCH__DEVICE_DECODE=%s)", reason, jpegs.mode)


def fixed_size_inputs(captioner: CaptionModel) -> FixedSizeInputs | None:
    """The model's ``fixed_size_inputs``; None for a model object without it (a stand-in written before it)."""
    found = getattr(captioner, "fixed_size_inputs", None)
    return found if isinstance(found, FixedSizeInputs) else None


class HeldBytes:
    """The bytes inputs hold from their decoding until their batch's results are out: each input's
    prepared tensors and its item's source bytes (kept as its origin, so that a hot swap can prepare it
    again), bounded by ``WORKER_BATCH__PREFETCH_MB`` as ``prefetch`` bounds their number.

    Before the source starts decoding one more item it reserves the largest size among the recent inputs
    (the whole limit before any is known: the first input is decoded alone); each input's real size
    replaces its reservation once it is prepared. Only the source waits, never a decode thread or the
    model thread, so nothing waits on what waits on it; one input is always let through, so an input
    larger than the limit still runs. The bound is the limit plus what inputs exceed their estimate by."""

    RECENT = 64  # inputs whose largest size is the next estimate: one outlier does not slow a day's stream

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._recent: deque[int] = deque(maxlen=self.RECENT)
        self._changed = threading.Condition()

    def reserve(self, stop: threading.Event) -> int | None:
        """Wait for room for one more input; returns its reservation, or None once ``stop`` is set."""
        with self._changed:
            while not stop.is_set():
                estimate = max(self._recent, default=self.limit)
                if self.held == 0 or self.held + estimate <= self.limit:
                    self.held += estimate
                    return estimate
                self._changed.wait(0.1)  # stop is an Event of its own: look at it now and then
            return None

    def settle(self, reserved: int, actual: int) -> None:
        """An input is prepared (``actual``: what it holds, 0 for a failure): its size replaces its reservation."""
        with self._changed:
            self.held += actual - reserved
            if actual:
                self._recent.append(actual)
            self._changed.notify_all()

    def release(self, size: int) -> None:
        """Inputs whose results are out no longer hold anything."""
        with self._changed:
            self.held -= size
            self._changed.notify_all()


@dataclass
class RunStats:
    done: int = 0
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failed_by_kind.values())

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def _fetch_failure_kind(error: Exception) -> str:
    # A source may refuse an item before reading it (too_large by size, a tar member's forbidden name), or
    # fetch it with a failure kind of its own (a manifest's uri): the kind it carries is the row's.
    if isinstance(error, ImageError | FetchError):
        return error.kind
    if isinstance(error, FileNotFoundError):
        return NOT_FOUND
    if isinstance(error, PermissionError):
        return FORBIDDEN
    if isinstance(error, TimeoutError):
        return TIMEOUT
    return FETCH_FAILURE


_DONE = object()  # end-of-input marker on the prefetch queue

# Threads preparing interactive items: their own, so an offered image never waits behind the stream's
# prefetched decodes.
_INTERACTIVE_THREADS = 2


class _PauseBudget:
    """The between-steps hook of one stream/bulk batch: it pauses the batch (runs ``job``, which captions the
    interactive images ready) only once the batch's own time has caught up with the time it was paused. So
    a request arriving late in a long batch is not left to wait for all of it because an earlier one paused
    it, and the pauses of a batch take at most its own time plus one pause: under a flood of requests the
    stream keeps a third to a half of the model's time (the first pause always runs: its length is not
    known before, and a request's decoding is capped by WORKER_HTTP__MAX_NUM_BEAMS / MAX_NEW_TOKENS)."""

    def __init__(self, job: Callable[[], bool]) -> None:
        self._job = job
        self._start = time.perf_counter()
        self._paused = 0.0

    def __call__(self) -> None:
        now = time.perf_counter()
        if self._paused > (now - self._start) - self._paused:
            return
        self._job()
        self._paused += time.perf_counter() - now


def _decoding_of(item: Item) -> DecodingSettings | None:
    """An interactive item's own decoding (None: the model's)."""
    decoding = getattr(item, "decoding", None)
    return decoding if isinstance(decoding, DecodingSettings) else None


# What an image of a model that does not say how it decodes (a stand-in) is counted as: the default's beams.
_UNKNOWN_DECODING = DecodingSettings()


class CaptionPipeline:
    def __init__(
        self,
        captioner: CaptionModel,
        sink: Sink,
        batch: BatchSettings,
        limits: ImageLimits,
        *,
        on_result: Callable[[Result], None] | None = None,
        flush_interval_s: float = 10.0,
        on_item_result: Callable[[Item, Result], None] | None = None,
        prompt: str | None = None,
        interactive_wait_ms: int | None = None,
        bulk_share: float = 0.0,
        pause_batches: bool = True,
        on_item_dropped: Callable[[Item], None] | None = None,
        jpeg_decoder: Decoder | None = None,
    ) -> None:
        """``prompt``: the job's prompt, for items that carry none (None: the model family's default).
        ``jpeg_decoder``: the device's JPEG decoder for ``batch.device_decode`` (default: nvJPEG on a CUDA
        model; tests pass a stand-in)."""
        refuse_prompt_it_cannot_take(captioner, prompt)
        self._jpegs = DeviceJpegs(batch.device_decode, limits, jpeg_decoder)
        check_device_decoding(captioner, self._jpegs)
        self.captioner = captioner
        self.prompt = prompt
        self.sink = sink
        self.batch = batch
        self.limits = limits
        self.on_result = on_result
        # The streaming worker needs the item (its Kafka offset) with each result, not just its id; the owner of
        # interactive items answers them here (the only hook they reach).
        self.on_item_result = on_item_result
        self.flush_interval_s = flush_interval_s
        self.stop_event = threading.Event()  # set it to stop reading input; in-flight work finishes
        self.stats = RunStats()
        # The latency lane (see the module note): its wait, and the rows kept for stream/bulk items.
        self.interactive_wait_ms = interactive_wait_ms
        # Stream/bulk items decode as the model does: a batch of them holds images_at(its beams).
        stream_images = batch.images_at(self._beams(None))
        self.bulk_rows = math.ceil(bulk_share * stream_images) if bulk_share > 0 else 0
        self.on_item_dropped = on_item_dropped
        # Whether a stream/bulk batch pauses for interactive images (WORKER_HTTP__PAUSE_BATCHES).
        self.pause_batches = pause_batches
        self._open: Batcher[Prepared] | None = None  # the batch being filled, while run() runs
        # Bounded: at most `prefetch` stream/bulk images are decoded ahead of the model.
        self._lanes: LaneQueue[object] = LaneQueue(batch.prefetch)
        self._interactive_pool = ThreadPoolExecutor(_INTERACTIVE_THREADS, thread_name_prefix="decode-interactive")
        self._held: HeldBytes = self._held_bytes()

    def offer(self, item: InteractiveItem) -> None:
        """An interactive item, from any thread: prepared at once, then at the front of the model's input.
        Answered through ``on_item_result`` like any other; dropped (``item.dropped()``) if cancelled first."""
        self._lanes.put_urgent((item, self._interactive_pool.submit(self._prepare, item)))

    def _drop(self, item: Item) -> None:
        interactive: InteractiveItem = item  # type: ignore[assignment]
        interactive.dropped()
        if self.on_item_dropped is not None:
            self.on_item_dropped(item)

    def _prompt(self, item: Item) -> str | None:
        """The prompt asked for the item: its own, else the job's (None: the family's default)."""
        prompt = prompt_of(item)
        return prompt if prompt is not None else self.prompt

    def _beams(self, item: Item | None) -> int:
        """The decoder sequences an item's image runs as: its own decoding's beams, else the model's."""
        own = _decoding_of(item) if item is not None else None
        return (own or decoding_of_model(self.captioner) or _UNKNOWN_DECODING).num_beams

    @property
    def _limits(self) -> tuple[float, float]:
        """The batch's cost limits, in the order _costs counts an input against them."""
        return self.batch.max_pixels, self.batch.max_sequences

    def _costs(self, prepared: Prepared) -> tuple[float, float]:
        """What an input counts against the batch's limits (BatchSettings.max_pixels, .max_sequences): the
        pixels its model processes and its decoder sequences. A batch of mixed decodings runs as one model
        call per decoding (_caption_batch), each within the batch's sequences. A failed input counts nothing."""
        if prepared.input is None:
            return 0, 0
        return prepared.input.cost, self._beams(prepared.item)

    def _held_bytes(self) -> HeldBytes:
        return HeldBytes(self.batch.prefetch_mb << 20)

    def _failure(self, item: Item, kind: str, message: str, **timings: float) -> Result:
        # No caption was made: the row echoes the prompt as asked, so a consumer can tell which request it was.
        return Result(
            id=item.id,
            uri=item.uri,
            model_version=self.captioner.version,
            prompt=self._prompt(item),
            error_kind=kind,
            error_message=message,
            **timings,  # type: ignore[arg-type]
        )

    def _prepare_held(self, item: Item, reserved: int) -> Prepared:
        """Runs in a decode thread: ``_prepare``, then what the input holds replaces its reservation."""
        prepared = Prepared(item)
        try:
            prepared = self._prepare(item)
        finally:
            self._held.settle(reserved, prepared.held)
        return prepared

    def _prepare(self, item: Item) -> Prepared:
        """Runs in a decode thread: fetch, decode, preprocess. Never raises."""
        start = time.perf_counter()
        try:
            data = item.read()
        except Exception as error:
            kind = _fetch_failure_kind(error)
            logger.warning("fetch failed for %s (%s): %s", item.id, item.uri, error)
            return Prepared(item, failure=self._failure(item, kind, f"{type(error).__name__}: {error}"))
        fetched = time.perf_counter()
        fetch_ms = (fetched - start) * 1000
        try:
            # The origin records the draft size the image was decoded at: a hot swap between these two
            # lines has the new model prepare an image decoded for the old one, which own_inputs then
            # sees and prepares again.
            draft = self.captioner.draft_size
            origin = EncodedImage(data, self.limits, draft)
            target = self._jpegs.target(fixed_size_inputs(self.captioner))
            # A JPEG for the device: checked here, decoded with its batch (_decode_jpegs).
            undecoded = self._jpegs.undecoded(data, self._prompt(item), target, origin) if target else None
            if undecoded is not None:
                prepared = undecoded
                # The size the CPU path reports (its draft decoding's), so a row does not depend on the path.
                width, height = jpeg_draft_size(data, draft)
            else:
                image = decode_image(data, limits=self.limits, draft_size=draft)
                prepared = self.captioner.prepare(image, self._prompt(item), origin=origin)
                width, height = image.width, image.height
        except Exception as error:
            return Prepared(item, failure=self._preparation_failure(item, error, len(data), fetch_ms=fetch_ms))
        decoded = time.perf_counter()
        return Prepared(
            item,
            input=prepared,
            width=width,
            height=height,
            size=len(data),
            fetch_ms=fetch_ms,
            decode_ms=(decoded - fetched) * 1000,
            ready_at=decoded,
            held=held_bytes(prepared, data),
        )

    def _preparation_failure(self, item: Item, error: Exception, size: int, **timings: float) -> Result:
        """The row of an item its model could not prepare, by what failed: its prompt, its image, or else."""
        if isinstance(error, PromptError):  # the request, not the image: the model cannot take its prompt
            logger.info("prompt of %s refused: %s", item.id, error)
            failure = self._failure(item, MALFORMED, str(error), **timings)
        elif isinstance(error, ImageError):
            logger.info("image %s rejected (%s): %s", item.id, error.kind, error.message)
            failure = self._failure(item, error.kind, error.message, **timings)
        else:
            # A decoder or preprocessing bug must not become a poison message that stops the
            # worker on every restart: the item fails alone, with the error, and work goes on.
            logger.error("unexpected error preparing %s (%s)", item.id, item.uri, exc_info=error)
            failure = self._failure(item, "decode", f"{type(error).__name__}: {error}", **timings)
        failure.bytes = size
        return failure

    def _prepared_again(
        self, batch: list[Prepared], failed: PreparationFailed, decoding: DecodingSettings | None
    ) -> None:
        """After a hot swap: the items the new model could not prepare fail alone, each with its own kind
        (a prompt it takes none of: malformed); the others, prepared again, are captioned together."""
        rest: list[Prepared] = []
        for position, prepared in enumerate(batch):
            error = failed.errors.get(position)
            if error is not None:
                self._emit(
                    [self._preparation_failure(prepared.item, error, prepared.size)], [prepared.item], prepared.urgent
                )
            else:
                prepared.input = failed.inputs[position]
                rest.append(prepared)
        if rest:
            self._caption_group(rest, decoding)

    def _emit(self, results: list[Result], items: list[Item], urgent: bool = False) -> None:
        if urgent:
            # An interactive item's answer goes to its client (through on_item_result) and is no part of the
            # run: not in its results, its stats or on_result, which a bulk job turns into its summary, its exit
            # status and its progress.
            if self.on_item_result:
                for item, result in zip(items, results, strict=True):
                    self.on_item_result(item, result)
            return
        self.sink.write(results)
        for item, result in zip(items, results, strict=True):
            if result.ok:
                self.stats.done += 1
            else:
                self.stats.failed_by_kind[result.error_kind or "unknown"] += 1
            if self.on_result:
                self.on_result(result)
            if self.on_item_result:
                self.on_item_result(item, result)

    def _caption_batch(self, batch: list[Prepared]) -> None:
        """One batch: interactive items cancelled meanwhile are dropped; items asking for their own decoding run
        as their own model call (a model call has one decoding)."""
        groups: dict[str, list[Prepared]] = {}
        decodings: dict[str, DecodingSettings | None] = {}
        for prepared in batch:
            if prepared.urgent and getattr(prepared.item, "cancelled", False):
                self._drop(prepared.item)
                continue
            decoding = _decoding_of(prepared.item)
            key = "" if decoding is None else decoding.model_dump_json()
            groups.setdefault(key, []).append(prepared)
            decodings[key] = decoding
        for key, group in groups.items():
            self._caption_group(group, decodings[key])

    def _decode_jpegs(self, batch: list[Prepared]) -> tuple[list[Prepared], list[tuple[Prepared, ImageError]]]:
        """The batch's JPEGs the decode threads left for the device, decoded there together (core/gpu_images.py),
        each one's time added to its decode_ms. Returns the batch less the images no path could decode, and
        those with their errors. Inputs prepared for another model (a hot swap since) are left as they are:
        the model serving now prepares them again from their bytes (own_inputs)."""
        model = fixed_size_inputs(self.captioner)
        if model is None:
            return batch, []
        waiting = [
            (p, p.input) for p in batch if p.input is not None and is_undecoded(p.input) and p.input.key == model.key
        ]
        if not waiting:
            return batch, []
        started = time.perf_counter()
        outcome = self._jpegs.decode([item for _, item in waiting], model)
        decode_ms = (time.perf_counter() - started) * 1000
        logger.debug("decoded %d JPEGs, %d on %s, in %.1f ms", len(waiting), outcome.on_device, model.device, decode_ms)
        for position, (prepared, _) in enumerate(waiting):
            if position in outcome.inputs:
                prepared.input = outcome.inputs[position]
                prepared.decode_ms += decode_ms  # its batch's decoding, as inference_ms is its batch's
        refused = [(waiting[position][0], error) for position, error in sorted(outcome.failures.items())]
        gone = {id(prepared) for prepared, _ in refused}
        return [p for p in batch if id(p) not in gone], refused

    def _emit_refused(self, refused: list[tuple[Prepared, ImageError]]) -> None:
        """Images that failed to decode with their batch: one failure row each, as from a decode thread."""
        for prepared, error in refused:
            failure = self._preparation_failure(prepared.item, error, prepared.size, fetch_ms=prepared.fetch_ms)
            self._emit([failure], [prepared.item], prepared.urgent)

    def _caption_group(self, batch: list[Prepared], decoding: DecodingSettings | None = None) -> None:
        start = time.perf_counter()
        ready: list[Prepared] = batch
        refused: list[tuple[Prepared, ImageError]] = []
        try:
            ready, refused = self._decode_jpegs(batch)
            model_start = time.perf_counter()
            with pauses() as paused:  # the time of calls nested in its pause is theirs (core/between_steps.py)
                inputs = [p.input for p in ready if p.input is not None]
                captions = self.captioner.caption_inputs(inputs, decoding) if inputs else []
        except HookFailed:
            raise  # the work run in its pause failed, not this batch: see _run_batch
        except PreparationFailed as failed:
            self._emit_refused(refused)
            self._prepared_again(ready, failed, decoding)
            return
        except Exception as error:
            if len(batch) > 1:
                # Find the item that breaks the model (or the device's decoding) instead of failing its
                # neighbours; an image refused above is refused again alone, its one row then.
                logger.warning("batch of %d failed (%s); retrying its items one by one", len(batch), error)
                for prepared in batch:
                    self._caption_group([prepared], decoding)
                return
            if isinstance(error, PromptError):
                # Prepared with its prompt, then a model that takes none was swapped in before its batch: the
                # request, not the model, is what fails (as if that model had been serving when it arrived).
                logger.info("prompt of %s refused by the model swapped in: %s", batch[0].item.id, error)
                self._emit([self._failure(batch[0].item, MALFORMED, str(error))], [batch[0].item], batch[0].urgent)
                return
            logger.error("inference failed for %s: %s", batch[0].item.id, error)
            failure = self._failure(batch[0].item, INFERENCE_FAILURE, f"{type(error).__name__}: {error}")
            self._emit([failure], [batch[0].item], batch[0].urgent)
            return
        self._emit_refused(refused)
        if not ready:
            return
        inference_ms = (time.perf_counter() - model_start - paused.seconds) * 1000
        self.stats.batches += 1
        results = []
        for p, caption in zip(ready, captions, strict=True):
            result = Result(
                id=p.item.id,
                uri=p.item.uri,
                model_version=self.captioner.version,
                caption=caption.text,
                mean_logprob=caption.mean_logprob,
                tokens=caption.tokens,
                prompt=caption.prompt,  # the one the model used: asked, or its family's default
                width=p.width,
                height=p.height,
                bytes=p.size,
                fetch_ms=round(p.fetch_ms, 3),
                decode_ms=round(p.decode_ms, 3),
                queue_ms=round((start - p.ready_at) * 1000, 3),
                inference_ms=round(inference_ms, 3),
            )
            if not caption.text:  # nothing but special tokens or whitespace: no caption to give
                result.caption = None
                result.error_kind = EMPTY_CAPTION
                result.error_message = (
                    f"the model generated no text ({caption.tokens} tokens, all special or blank); "
                    "retry with another model or prompt (--retry-failed empty_caption)"
                )
            results.append(result)
        for urgent in (True, False):  # interactive answers first: someone waits for them
            chosen = [(r, p.item) for r, p in zip(results, ready, strict=True) if p.urgent == urgent]
            if chosen:
                self._emit([r for r, _ in chosen], [i for _, i in chosen], urgent)

    def _run_batch(self, batch: list[Prepared]) -> None:
        if self.pause_batches and self.interactive_wait_ms is not None and not any(p.urgent for p in batch):
            # A stream/bulk batch: the interactive images ready while it runs are captioned between two of its
            # decoding steps rather than after it (core/between_steps.py), within a time budget
            # (_PauseBudget). A batch already holding interactive images is not
            # paused: under a flood of requests they form full batches instead of many small ones.
            nested = _PauseBudget(self._caption_interactive_now)
            try:
                with between_steps(nested):
                    self._caption_batch(batch)
            except HookFailed as failed:
                # What failed in the pause (the interactive answers' callback, say) is what it would have been
                # outside one: it stops the run as it would have there; the paused batch is not blamed.
                raise failed.error from None
        else:
            self._caption_batch(batch)
        # Interactive items reserve nothing (they do not wait behind the stream's inputs): only the others.
        self._held.release(sum(prepared.held for prepared in batch if not prepared.urgent))

    def _caption_interactive_now(self) -> bool:
        """Between two decoding steps of a running stream/bulk batch (on the model thread): the interactive
        images prepared by now, up to a batch's rows and cost, captioned in a model call of their own.
        Returns whether there were any."""
        # First those already in the open batch (the batch running was flushed ahead of them when one of
        # them did not fit its cost), then the lane's.
        batch = self._open.take_urgent() if self._open is not None else []
        limits = self._limits
        cost: tuple[float, ...] = (0, 0)
        for taken in batch:
            cost = added(cost, self._costs(taken))

        def fits(entry: object) -> bool:
            assert isinstance(entry, tuple)
            future: Future[Prepared] = entry[1]
            if not future.done():  # still being decoded: it waits for the next step, or the next batch
                return False
            return not batch or within(limits, cost, self._costs(future.result()))

        while len(batch) < self.batch.max_items:
            entry = self._lanes.take_urgent(fits)
            if entry is None:
                break
            assert isinstance(entry, tuple)
            offered: InteractiveItem = entry[0]
            if offered.cancelled:  # its request timed out or its client left
                self._drop(offered)
                continue
            prepared: Prepared = entry[1].result()
            prepared.urgent = True
            if prepared.failure is not None:
                self._emit([prepared.failure], [prepared.item], urgent=True)
                continue
            cost = added(cost, self._costs(prepared))
            batch.append(prepared)
        if batch:
            self._caption_batch(batch)
        return bool(batch)

    def _consume(self, batcher: Batcher[Prepared]) -> None:
        """The model side of run(): batch what the decode threads prepared, caption, write. Interactive items
        come first, except that stream/bulk items are taken while they hold fewer than their rows."""
        last_flush = time.monotonic()
        ending = False  # the input ended: interactive items offered before are still answered
        while True:
            prefer_bulk = batcher.rows - batcher.urgent_rows < self.bulk_rows
            try:
                entry, urgent = self._lanes.get(0 if ending else batcher.time_left(), prefer_bulk=prefer_bulk)
            except queue.Empty:  # the open batch waited its max wait (or an interactive item its own): run it
                if ending:
                    break
                self._run_batch(batcher.flush())
                continue
            if entry is _DONE:
                ending = True
                continue
            future = entry
            if urgent:
                assert isinstance(entry, tuple)
                offered: InteractiveItem = entry[0]
                future = entry[1]
                if offered.cancelled:  # its request timed out or its client left: not batched for nobody
                    future.cancel()
                    self._drop(offered)
                    continue
            assert isinstance(future, Future)
            prepared: Prepared = future.result()
            prepared.urgent = urgent
            if prepared.failure is not None:
                self._emit([prepared.failure], [prepared.item], urgent)
            else:
                for ready in batcher.add(prepared, cost=self._costs(prepared), urgent=urgent):
                    self._run_batch(ready)
            if time.monotonic() - last_flush >= self.flush_interval_s:
                self.sink.flush()
                last_flush = time.monotonic()
        if len(batcher):
            self._run_batch(batcher.flush())

    def run(self, items: Iterable[Item]) -> RunStats:
        started = time.perf_counter()
        urgent_wait = None if self.interactive_wait_ms is None else self.interactive_wait_ms / 1000
        batcher: Batcher[Prepared] = Batcher(
            self.batch.max_items,
            self.batch.max_wait_ms / 1000,
            max_cost=self._limits,
            urgent_wait_s=urgent_wait,
        )
        lanes = self._lanes
        self._held = held = self._held_bytes()
        producer_error: list[BaseException] = []

        # 0 (auto) outside WorkerSettings, which resolves it by the device (core/threads.py): a CPU worker's.
        threads = self.batch.decode_threads or CPU_DECODE_THREADS
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:

            def produce() -> None:
                try:
                    for item in items:
                        reserved = held.reserve(self.stop_event)
                        if reserved is None:  # stopping
                            break
                        if not lanes.put_bulk(pool.submit(self._prepare_held, item, reserved)):
                            break  # the model loop is gone
                except BaseException as error:  # reported by the consumer, never swallowed
                    producer_error.append(error)
                finally:
                    lanes.put_bulk(_DONE)

            producer = threading.Thread(target=produce, name="source", daemon=True)
            producer.start()
            try:
                self._open = batcher
                self._consume(batcher)
            except BaseException:
                # The sink (or the model loop) failed: stop the producer, which may be blocked on the
                # full queue, instead of leaving it and its decode work behind.
                self.stop_event.set()
                lanes.close()
                producer.join(10)  # a source blocked in I/O is a daemon thread: not forever
                raise
            finally:
                self._interactive_pool.shutdown(wait=False, cancel_futures=True)
            producer.join()
        self.sink.flush()
        self.stats.seconds = time.perf_counter() - started
        if producer_error:
            raise producer_error[0]
        return self.stats
