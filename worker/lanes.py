"""The interactive lane's items, as the shared engine sees them: images a client waits for (the caption
API), answered one by one through their own ``answer`` instead of the stream's or the bulk job's output,
and cancelled when their request times out or its client goes away.

The engine (pipeline, stream stages) takes them through this protocol only, so it never imports the API.
"""

from __future__ import annotations

from typing import Protocol

from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.messages import Result


class InteractiveItem(Protocol):
    """A ``pipeline.Item`` that someone waits for."""

    @property
    def id(self) -> str: ...
    @property
    def uri(self) -> str: ...
    def read(self) -> bytes: ...

    # Per-request decoding (None: the worker's own).
    @property
    def decoding(self) -> DecodingSettings | None: ...

    @property
    def cancelled(self) -> bool:
        """Nobody waits for it any more: drop it if its batch has not started."""
        ...

    def answer(self, result: Result) -> None: ...

    def dropped(self) -> None:
        """Called once when the engine drops it unanswered (it was cancelled before its batch)."""
        ...
