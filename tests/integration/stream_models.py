"""Helpers for the stream's model tests: pictures the tiny models caption, and the caption a model gives one
picture alone in this process, decoded as the worker decodes it (the reference a worker's answer must equal)."""

from __future__ import annotations

import io
from pathlib import Path

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings
from tests.tiny_families import pictures

# As worker_env (tests/integration/stream_support.py) sets them, with fp32: exact captions to compare.
DECODING = DecodingSettings(num_beams=1, max_new_tokens=8)
PRECISION = "fp32"


def png_pictures(count: int) -> list[bytes]:
    """``count`` different pictures as PNG files (the tiny models caption them differently)."""
    encoded = []
    for image in pictures(count):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    return encoded


def load(path: Path) -> CaptionModel:
    return load_checkpoint(path, device="cpu", precision=PRECISION, decoding=DECODING)


def caption_alone(model: CaptionModel, data: bytes, prompt: str | None = None) -> str:
    """What ``model`` captions this picture as, alone (a batch of one), decoded as the worker decodes it."""
    image = decode_image(data, limits=ImageLimits(), draft_size=model.draft_size)
    return model.caption_inputs([model.prepare(image, prompt)], DECODING)[0].text
