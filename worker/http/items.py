"""An image sent to the API, on its way to the model and back: a ``worker.lanes.InteractiveItem`` carrying a
future that the model side answers, and ``Lane``, what the API needs of that model side."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.messages import Result


@dataclass(eq=False)
class ApiItem:
    """One image of an API request. ``data`` is its bytes (uploaded, or fetched by the API before it is
    queued, so the model's decode threads never wait on a remote host)."""

    id: str
    uri: str
    data: bytes = b""
    # The model family's prompt for it (None: the family's default); a family that takes no prompt answers
    # the image as malformed. Echoed in its answer.
    prompt: str | None = None
    # Per-request decoding (None: the worker's WORKER_DECODING__*), already capped by the API's limits.
    decoding: DecodingSettings | None = None
    fetch_ms: float | None = None
    future: Future[Result] = field(default_factory=Future)
    # Why it was cancelled ("deadline", "disconnect"), for the count of images dropped unanswered.
    drop_reason: str = ""
    on_drop: Callable[[ApiItem], None] | None = None

    def read(self) -> bytes:
        return self.data

    @property
    def cancelled(self) -> bool:
        """Its request timed out or its client went away: the model side drops it if it has not started it."""
        return self.future.cancelled()

    def cancel(self, reason: str) -> None:
        if not self.future.done():
            self.drop_reason = reason
            self.future.cancel()

    def answer(self, result: Result) -> None:
        """Set its result, unless it was cancelled meanwhile (its answer then has no one to go to)."""
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(result)

    def dropped(self) -> None:
        """The model side dropped it unanswered (``worker.lanes.InteractiveItem``)."""
        if self.on_drop is not None:
            self.on_drop(self)

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(error)


class QueueFull(Exception):
    """The interactive queue has no room for a request's images: answered 429 with Retry-After."""


class Lane(Protocol):
    """The model side as the API sees it."""

    @property
    def version(self) -> str:
        """The model version answering now (a hot swap changes it)."""
        ...

    def submit(self, items: list[ApiItem]) -> None:
        """Queue the images for the model, all or none; raises QueueFull when there is no room for them.
        Each item's future gets its Result; a cancelled item is dropped if the model has not started it."""
        ...
