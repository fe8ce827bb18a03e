"""A captioner whose model can be replaced while it serves: the hot swap.

A worker following ``s3://bucket/models/<name>/LATEST`` (see worker/watcher.py) is given each new
version loaded in the background; ``HotSwapCaptioner`` switches to it at the start of the next batch,
so the batch in flight finishes on the model it started on and every result names the version that
produced it. It implements ``CaptionModel`` by delegating to the model it serves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from captionfleet.core.captioner import Captioner, CaptionModel, ModelWrapper, Preprocessing
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import DecodingSettings

log = logging.getLogger(__name__)


def input_difference(old: Preprocessing, new: Preprocessing) -> str | None:
    """Why images prepared for ``old`` would be wrong for ``new``; None when they are the same."""
    if (old.width, old.height) != (new.width, new.height):
        return f"input size {new.width}x{new.height} differs from the serving model's {old.width}x{old.height}"
    if old.resample != new.resample or old.rescale_factor != new.rescale_factor:
        return "image resampling or rescaling differs from the serving model's"
    for name in ("mean", "std"):
        a, b = getattr(old, name), getattr(new, name)
        if (a is None) != (b is None) or (a is not None and not np.allclose(a, b)):
            return f"image normalisation ({name}) differs from the serving model's"
    return None


class HotSwapCaptioner(ModelWrapper):
    """A CaptionModel whose model can be replaced while serving.

    ``offer(new)`` may be called from any thread; the switch happens at the start of the next
    ``caption_pixels`` call (the model thread, between batches). What it reports (version, source,
    preprocess, ...) is the model that ran the last batch, so a result built right after a batch
    names the version that produced it.
    """

    def __init__(self, initial: Captioner) -> None:
        self._active = initial
        self._pending: Captioner | None = None
        self._lock = threading.Lock()
        self._on_swap: list[Callable[[Captioner, Captioner], None]] = []

    # -- CaptionModel: the model serving now ---------------------------------------------------------

    @property
    def wrapped(self) -> CaptionModel:
        return self._active

    def caption_pixels(self, pixel_values: torch.Tensor, decoding: DecodingSettings | None = None) -> list[str]:
        self._swap_if_offered()
        return self._active.caption_pixels(pixel_values, decoding)

    # -- swapping -------------------------------------------------------------------------------------

    def on_swap(self, callback: Callable[[Captioner, Captioner], None]) -> None:
        """``callback(old, new)`` runs in the model thread right after a swap, before the new model's first batch."""
        self._on_swap.append(callback)

    @property
    def active(self) -> Captioner:
        return self._active

    @property
    def pending_version(self) -> str | None:
        with self._lock:
            return self._pending.version if self._pending is not None else None

    def offer(self, new: Captioner) -> None:
        """Serve ``new`` from the next batch on (an earlier offer not yet taken is dropped)."""
        difference = input_difference(self._active.preprocess, new.preprocess)
        if difference is not None:
            # Decode threads prepare images ahead of the model with the serving model's preprocessing.
            raise ModelRefError(f"{difference}; such a version needs a worker restart, not a hot swap")
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
        log.info("model swapped: %s -> %s (from %s)", old.version, new.version, new.source)
        for callback in self._on_swap:
            try:
                callback(old, new)
            except Exception:  # a metrics or logging hook must not fail a batch
                log.exception("model swap callback failed")
