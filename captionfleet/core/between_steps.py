"""Work run between a model call's decoding steps: how the latency lane overtakes a running batch.

A stream/bulk batch takes a second or more on a CPU (and its whole generation on a GPU); an interactive
image arriving just after it began would wait for all of it, then for its own call. So the pipeline
(worker/pipeline.py) sets a hook around its model calls with ``between_steps(hook)``, every family's
``caption_inputs`` puts ``step_processors()`` among generate()'s logits processors, and the hook runs
after each decoding step: there the pipeline captions the interactive images ready by then in a model call
of their own, nested in the running one. The running call then goes on where it was: it returns the
scores it was given, untouched, and its cache and inputs are its own (generate() keeps its state in
locals), so its captions are those it gives without the pause.

A nested call gets no hook (no pause inside a pause), and neither does a call through kept static caches
(core/static_decoding.py): a nested call of the same shape would reset the cache the running one is using.
A pause's time is not the paused call's: ``pauses()`` measures it, so that a model call's duration (the
metrics, a result's inference_ms) is its own. An exception the hook raises reaches the paused call's
caller as ``HookFailed``, so that it is not mistaken for the paused model call's own failure.
The hook lives in a context variable rather than in ``caption_inputs``' signature so that the wrappers
between the pipeline and the model (metering, hot swap) pass it on without knowing of it; it is set and
read on the model thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

_hook: ContextVar[Callable[[], None] | None] = ContextVar("between_steps", default=None)
_nesting: ContextVar[int] = ContextVar("between_steps_nesting", default=0)


@dataclass
class PauseClock:
    """Seconds the calls made inside ``pauses()`` spent paused (running the hook)."""

    seconds: float = 0.0


_clocks: ContextVar[tuple[PauseClock, ...]] = ContextVar("between_steps_clocks", default=())


class HookFailed(Exception):
    """The hook raised ``error`` between two steps: the paused call was aborted, through no fault of its own."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"the work run between decoding steps failed: {error}")
        self.error = error


@contextmanager
def between_steps(hook: Callable[[], None]) -> Iterator[None]:
    """Model calls made inside run ``hook`` after each of their decoding steps."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)


@contextmanager
def pauses() -> Iterator[PauseClock]:
    """The time the model calls made inside spend paused: to take off their duration."""
    clock = PauseClock()
    token = _clocks.set((*_clocks.get(), clock))
    try:
        yield clock
    finally:
        _clocks.reset(token)


def in_nested_call() -> bool:
    """Whether this runs inside a hook, i.e. a call nested in a paused one (which must not change state that
    the paused call relies on, such as the model being served)."""
    return _nesting.get() > 0


class StepHook(LogitsProcessor):
    """A logits processor that runs the hook and changes nothing (transformers puts it after its own
    processors; the confidence recorder comes after it and sees the same scores)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook = hook

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        clocks = _clocks.get()  # those of the paused call; the nested call's own come and go inside
        hook_token = _hook.set(None)  # the nested call gets no hook of its own
        nesting_token = _nesting.set(_nesting.get() + 1)
        start = time.perf_counter()
        try:
            self.hook()
        except Exception as error:
            raise HookFailed(error) from error
        finally:
            for clock in clocks:
                clock.seconds += time.perf_counter() - start
            _nesting.reset(nesting_token)
            _hook.reset(hook_token)
        return scores


def step_processors() -> list[LogitsProcessor]:
    """The processors to add to a model call's generate() (none outside ``between_steps``)."""
    hook = _hook.get()
    return [] if hook is None else [StepHook(hook)]
