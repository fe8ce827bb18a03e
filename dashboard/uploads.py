"""Captioning the files a browser uploads: each decoded on its own, captioned in batches.

A corrupt or oversized file gets its own message and never costs the others their captions; only one
batch of full-size images is alive at a time, and results keep thumbnails. The model comes from
dashboard/model.py. A prompt (the page's box; None: the model family's default) goes with every image,
through the model's two steps as in the worker (``prepare``, ``caption_inputs``): a model that takes no
prompt (ViT-GPT2) refuses it, and each file says so (``malformed``), as the stream's dead letters do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from captionfleet.core.captioner import PromptError
from captionfleet.core.failures import EMPTY_CAPTION, MALFORMED, ImageError
from captionfleet.core.generation import Caption
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.settings import DecodingSettings
from captionfleet.dashboard.model import LoadedModel

# Headlines per failure kind; the decoder's own message follows with the detail.
_HEADLINES = {
    "empty": "is empty",
    "not_an_image": "is not an image",
    "unsupported": "is in an unsupported format",
    "truncated": "is cut short (a corrupt or incomplete file)",
    "too_large": "is too large",
    "decode": "could not be decoded (a corrupt image)",
    MALFORMED: "was not captioned: the model refused the prompt",
    EMPTY_CAPTION: "got no caption (the model generated no text)",
    "forbidden": "was refused",
    "fleet": "was not captioned by the fleet",
}


@dataclass
class UploadResult:
    name: str
    image: Image.Image | None = None
    caption: str | None = None
    prompt: str | None = None  # the one the model used: the box's, else its family's default
    model_version: str = ""
    seconds: float = 0.0  # the model call that captioned it (with the fleet: its request)
    batch: int = 0  # images in that call
    worker: str = ""  # the fleet's worker that answered; empty when the dashboard's own model did
    kind: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.caption is not None

    @property
    def problem(self) -> str:
        return f"{self.name} {_HEADLINES.get(self.kind or '', 'failed')}: {self.message}"


# The longest side of the picture a result keeps for the page (shown 200 px wide; 512 stays sharp on
# high-density screens). Results live in each session's state: a full 50-Mpx image would be ~150 MB.
THUMBNAIL_SIDE = 512


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A new image whose longest side is at most ``side`` (the image itself when it already fits)."""
    width, height = image.size
    if max(width, height) <= side:
        return image
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _decode(
    result: UploadResult, data: bytes, limits: ImageLimits, draft_size: tuple[int, int] | None
) -> Image.Image | None:
    """The upload decoded at full size, or None with the reason recorded in ``result``."""
    try:
        return decode_image(data, limits=limits, draft_size=draft_size)
    except ImageError as error:
        result.kind, result.message = error.kind, error.message
        if error.kind == "too_large":
            result.message += "; the limits are WORKER_IMAGES__MAX_BYTES and WORKER_IMAGES__MAX_PIXELS"
        return None


def _caption_batch(
    model: LoadedModel,
    batch: list[tuple[UploadResult, Image.Image]],
    decoding: DecodingSettings,
    side: int,
    prompt: str | None,
) -> None:
    """One model call for the batch; its results get their captions (or the failure) and thumbnails."""
    with model.lock:
        began = time.perf_counter()
        captions: list[Caption] | None = None
        kind, failure = "model", ""
        try:
            inputs = [model.captioner.prepare(image, prompt) for _, image in batch]
            captions = model.captioner.caption_inputs(inputs, decoding)
            del inputs  # they hold the full-size images
        except PromptError as error:  # the same prompt for every file: each says why
            kind, failure = MALFORMED, f"{error}; empty the Prompt box to use the model's default"
        except Exception as error:  # a model failure is shown per file, like any other
            failure = f"the model failed: {error or 'no reason given'}"
        seconds = time.perf_counter() - began
    for index, (result, image) in enumerate(batch):
        result.image = thumbnail(image, side)
        if captions is None:
            result.kind, result.message = kind, failure
            continue
        caption = captions[index]
        result.model_version, result.prompt = model.version, caption.prompt
        result.seconds, result.batch = seconds, len(batch)
        if caption.text:
            result.caption = caption.text
        else:
            result.kind = EMPTY_CAPTION
            result.message = f"{caption.tokens} tokens, all special or blank; try another prompt or model"


def caption_uploads(
    model: LoadedModel,
    files: Sequence[tuple[str, bytes]],
    decoding: DecodingSettings,
    limits: ImageLimits,
    batch_size: int,
    thumbnail_side: int = THUMBNAIL_SIDE,
    prompt: str | None = None,
) -> list[UploadResult]:
    """Caption (name, bytes) uploads with ``prompt`` (None: the family's default); one result per file, in
    order, failures included.

    Files are decoded as their batch fills and dropped to thumbnails once it is captioned, so at most
    one batch of full-size images is in memory (ten 50-Mpx PNGs decoded up front would be ~1.5 GB).
    """
    results = [UploadResult(name) for name, _ in files]
    batch: list[tuple[UploadResult, Image.Image]] = []
    for result, (_, data) in zip(results, files, strict=True):
        image = _decode(result, data, limits, model.captioner.draft_size)
        if image is None:
            continue
        batch.append((result, image))
        del image  # the batch holds the only reference: captioning it frees the full-size image
        if len(batch) == batch_size:
            _caption_batch(model, batch, decoding, thumbnail_side, prompt)
            batch = []
    if batch:
        _caption_batch(model, batch, decoding, thumbnail_side, prompt)
    return results
