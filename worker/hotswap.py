"""A captioner whose model can be replaced while it serves: the hot swap.

A worker following ``s3://bucket/models/<name>/LATEST`` (see worker/watcher.py) is given each new
version loaded in the background; ``HotSwapCaptioner`` switches to it at the start of the next batch,
so the batch in flight finishes on the model it started on and every result names the version that
produced it. It implements ``CaptionModel`` by delegating to the model it serves.

The new version may be of another family or input size: inputs the decode threads prepared for the old
model are prepared again by the new one before it captions them (``core.captioner.own_inputs``, from
each item's bytes), so none is lost and none is captioned with the wrong preprocessing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence

from captionfleet.core.between_steps import in_nested_call
from captionfleet.core.captioner import CaptionModel, ModelInput, ModelWrapper
from captionfleet.core.fastpath import return_freed_heap
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings

log = logging.getLogger(__name__)


class HotSwapCaptioner(ModelWrapper):
    """A CaptionModel whose model can be replaced while serving.

    ``offer(new)`` may be called from any thread; the switch happens at the start of the next
    ``caption_inputs`` call (the model thread, between batches). What it reports (version, source,
    family, ...) is the model that ran the last batch, so a result built right after a batch names the
    version that produced it.
    """

    def __init__(self, initial: CaptionModel) -> None:
        self._active = initial
        self._pending: CaptionModel | None = None
        self._lock = threading.Lock()
        self._on_swap: list[Callable[[CaptionModel, CaptionModel], None]] = []

    # -- CaptionModel: the model serving now ---------------------------------------------------------

    @property
    def wrapped(self) -> CaptionModel:
        return self._active

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        # Never inside a call nested in a paused one (core/between_steps.py): the paused batch finishes, and
        # names, the model it started on, and the nested one runs on that model too.
        if not in_nested_call():
            self._swap_if_offered()
        # Inputs prepared for the model swapped out are prepared again by the one serving now.
        return self._active.caption_inputs(inputs, decoding)

    # -- swapping -------------------------------------------------------------------------------------

    def on_swap(self, callback: Callable[[CaptionModel, CaptionModel], None]) -> None:
        """``callback(old, new)`` runs in the model thread right after a swap, before the new model's first batch."""
        self._on_swap.append(callback)

    @property
    def active(self) -> CaptionModel:
        return self._active

    @property
    def pending_version(self) -> str | None:
        with self._lock:
            return self._pending.version if self._pending is not None else None

    def offer(self, new: CaptionModel) -> None:
        """Serve ``new`` from the next batch on (an earlier offer not yet taken is dropped)."""
        with self._lock:
            self._pending = new

    def withdraw(self) -> tuple[str, str | None]:
        """Drop an offer not yet taken. Returns (the active version, the withdrawn one or None), read
        together under the lock: no swap can slip in between, so the active version is the one that
        serves the next batch."""
        with self._lock:
            dropped, self._pending = self._pending, None
            return self._active.version, dropped.version if dropped is not None else None

    def _swap_if_offered(self) -> None:
        with self._lock:  # _active changes under the lock too: see withdraw()
            new, self._pending = self._pending, None
            if new is None:
                return
            old = self._active
            self._active = new
        log.info("model swapped: %s -> %s (%s, from %s)", old.version, new.version, new.family, new.source)
        for callback in self._on_swap:
            try:
                callback(old, new)
            except Exception:  # a metrics or logging hook must not fail a batch
                log.exception("model swap callback failed")
        # The old model's memory back to the OS once it is gone: the C heap keeps what is freed (fastpath.
        # reuse_freed_memory), and the new model's loader trimmed the heap while the old one still held it. When
        # the last reference goes, not here: a decode thread may still be inside the old model's prepare().
        weakref.finalize(old, return_freed_heap)
        del old
