"""The stream's model: the loaded one as it is (no copy), timing each batch for the metrics.

A ``CaptionModel`` by delegation: what it reports (version, preprocessing, ...) is read from the wrapped
model at each call, never copied. A hot swap (``worker.hotswap``) happens at the start of a batch, so
right after a batch these name the model that ran it, and its results carry the right model_version.
"""

from __future__ import annotations

import time

import torch

from captionfleet.core.captioner import CaptionModel, ModelWrapper
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.metrics import WorkerMetrics


class MeteredCaptioner(ModelWrapper):
    def __init__(self, inner: CaptionModel, metrics: WorkerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @property
    def wrapped(self) -> CaptionModel:
        return self._inner

    def caption_pixels(self, pixel_values: torch.Tensor, decoding: DecodingSettings | None = None) -> list[str]:
        start = time.perf_counter()
        try:
            return self._inner.caption_pixels(pixel_values, decoding)
        finally:
            self._metrics.batch_size.observe(int(pixel_values.shape[0]))
            self._metrics.inference.observe(time.perf_counter() - start)
