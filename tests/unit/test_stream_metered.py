"""The stream's metered model counts model calls: a batch that could not be prepared again is not one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from captionfleet.core.captioner import ModelInput, PreparationFailed
from captionfleet.core.generation import Caption
from captionfleet.core.settings import DecodingSettings
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.metered import MeteredCaptioner


class Model:
    def __init__(self, fail: Exception | None) -> None:
        self.fail = fail

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        if self.fail is not None:
            raise self.fail
        return [Caption("a caption", -0.5, 3) for _ in inputs]


def calls(metrics: WorkerMetrics) -> float:
    value = metrics.registry.get_sample_value("captionfleet_batch_size_count")
    return value or 0.0


def metered(fail: Exception | None) -> tuple[MeteredCaptioner, WorkerMetrics]:
    metrics = WorkerMetrics()
    model: Any = Model(fail)
    return MeteredCaptioner(model, metrics), metrics


def test_a_model_call_is_counted_once() -> None:
    captioner, metrics = metered(None)
    captioner.caption_inputs([object(), object()])  # type: ignore[list-item]
    assert calls(metrics) == 1


def test_a_failed_model_call_is_still_counted() -> None:
    captioner, metrics = metered(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError):
        captioner.caption_inputs([object()])  # type: ignore[list-item]
    assert calls(metrics) == 1


def test_inputs_not_prepared_again_after_a_swap_are_no_model_call() -> None:
    captioner, metrics = metered(PreparationFailed({0: ValueError("no prompt")}, [None, None]))
    with pytest.raises(PreparationFailed):
        captioner.caption_inputs([object(), object()])  # type: ignore[list-item]
    assert calls(metrics) == 0
