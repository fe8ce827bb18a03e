"""The stream's model: the loaded one as it is (no copy), timing each batch for the metrics.

A ``CaptionModel`` by delegation: what it reports (version, family, ...) is read from the wrapped
model at each call, never copied. A hot swap (``worker.hotswap``) happens at the start of a batch, so
right after a batch these name the model that ran it, and its results carry the right model_version.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from captionfleet.core.between_steps import HookFailed, pauses
from captionfleet.core.captioner import CaptionModel, ModelInput, ModelWrapper, PreparationFailed
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.metrics import WorkerMetrics


class MeteredCaptioner(ModelWrapper):
    def __init__(self, inner: CaptionModel, metrics: WorkerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @property
    def wrapped(self) -> CaptionModel:
        return self._inner

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        start = time.perf_counter()
        ran = True
        # A call nested in this one's pause (core/between_steps.py) is timed on its own: not this one's time.
        with pauses() as paused:
            try:
                return self._inner.caption_inputs(inputs, decoding)
            except (PreparationFailed, HookFailed):
                # No model call: after a hot swap some inputs could not be prepared again, and the pipeline
                # captions the rest as a batch of its own, which is the one to count; or the work run in its
                # pause failed and aborted it.
                ran = False
                raise
            finally:
                if ran:
                    self._metrics.batch_size.observe(len(inputs))
                    self._metrics.inference.observe(time.perf_counter() - start - paused.seconds)
