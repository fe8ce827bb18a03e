"""The hot swap at the worst moments of one item: between its decoding and its preparation (the new
model must not keep an image decoded for the old one's draft size), and between its preparation and its
batch when the new model cannot prepare it (it alone fails, with its own kind)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import captionfleet.worker.pipeline as pipeline_module
from captionfleet.core.captioner import CaptionModel, own_inputs
from captionfleet.core.failures import MALFORMED
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker.hotswap import HotSwapCaptioner
from captionfleet.worker.pipeline import CaptionPipeline
from tests.unit.test_pipeline import MemorySink

DECODING = DecodingSettings(num_beams=1, max_new_tokens=4)


def jpeg(side: int = 256) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


class Item:
    id, uri = "photo", "mem://photo"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


def same_features(one: dict[str, Any], other: dict[str, Any]) -> bool:
    return one.keys() == other.keys() and all(
        torch.equal(torch.as_tensor(one[name]), torch.as_tensor(other[name])) for name in one
    )


def test_a_swap_between_decoding_and_preparing_is_prepared_again(
    tiny_checkpoint: Path, tiny_family: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ved = load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", decoding=DECODING)  # draft 32x32
    qwen = load_checkpoint(tiny_family("qwen2_vl"), device="cpu", precision="fp32", decoding=DECODING)
    assert ved.draft_size != qwen.draft_size
    hot = HotSwapCaptioner(ved)
    data = jpeg()
    real_decode = pipeline_module.decode_image

    def decode_then_swap(*args: Any, **kwargs: Any) -> Image.Image:
        image = real_decode(*args, **kwargs)
        hot.offer(qwen)
        hot._swap_if_offered()  # what the model thread does at its next batch, while this item decodes
        return image

    monkeypatch.setattr(pipeline_module, "decode_image", decode_then_swap)
    prepared = CaptionPipeline(hot, None, BatchSettings(), ImageLimits())._prepare(Item(data))  # type: ignore[arg-type]
    assert prepared.input is not None and prepared.input.key == qwen.preparation_key  # the new model prepared it...
    assert prepared.width == 32  # ...from the JPEG decoded at the old model's draft size (1/8 of 256 px)

    owned = own_inputs(qwen, [prepared.input])[0]
    expected = qwen.prepare(decode_image(data, draft_size=qwen.draft_size))
    assert same_features(dict(owned.features), dict(expected.features))  # prepared again, as if never swapped
    assert not same_features(dict(prepared.input.features), dict(expected.features))  # (and it mattered)
    assert own_inputs(qwen, [owned])[0] is owned  # once is enough


def test_an_input_prepared_without_a_swap_is_not_prepared_again(tiny_family: Callable[[str], Path]) -> None:
    model: CaptionModel = load_checkpoint(tiny_family("qwen2_vl"), device="cpu", precision="fp32")
    prepared = CaptionPipeline(model, None, BatchSettings(), ImageLimits())._prepare(Item(jpeg()))  # type: ignore[arg-type]
    assert prepared.input is not None
    assert own_inputs(model, [prepared.input])[0] is prepared.input


class PromptedItem(Item):
    prompt = "a photo of"


def test_an_input_the_new_model_cannot_prepare_fails_alone_with_its_own_kind(
    tiny_checkpoint: Path, tiny_family: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    qwen = load_checkpoint(tiny_family("qwen2_vl"), device="cpu", precision="fp32", decoding=DECODING)
    ved = load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", decoding=DECODING)
    hot = HotSwapCaptioner(qwen)
    sink = MemorySink()
    pipeline = CaptionPipeline(hot, sink, BatchSettings(), ImageLimits())  # type: ignore[arg-type]
    batch = [pipeline._prepare(PromptedItem(jpeg())), pipeline._prepare(Item(jpeg(128)))]
    assert all(prepared.input is not None for prepared in batch)  # prompts are qwen2_vl's to take
    hot.offer(ved)  # which takes none: the prompted item cannot be prepared again
    with caplog.at_level(logging.WARNING):
        pipeline._caption_batch(batch)
    kinds = {row.id: (row.error_kind, row.model_version) for row in sink.rows}
    assert len(sink.rows) == 2
    assert sink.rows[0].error_kind == MALFORMED and "takes no prompt" in (sink.rows[0].error_message or "")
    assert sink.rows[1].ok and sink.rows[1].model_version == ved.version, kinds
    assert not [r for r in caplog.records if "one by one" in r.getMessage()]  # the batch was not retried
