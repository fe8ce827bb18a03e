"""What differs between the families the trainer trains: how pictures and captions become model inputs.

The one training loop (train.py) calls ``model(**inputs)`` and reads ``.loss``; ``inputs`` are the family's:

- ``vision-encoder-decoder`` (ViT-GPT2): ``pixel_values`` from the worker's own numpy preprocessing and
  ``labels`` = the caption's tokens + eos, -100 after (the model makes its decoder's inputs from them);
- ``git``: ``pixel_values`` from the checkpoint's image processor, ``input_ids`` = start + caption + end,
  ``attention_mask``, and ``labels`` = ``input_ids`` with the padding at -100. GIT puts the image tokens
  first and shifts the labels itself; served, it continues after the start token (core/families/prompts.py);
- ``blip``: the same layout; BLIP's text decoder starts at [DEC] and ends at [SEP].

The start and end tokens are core/family.py's ``caption_bounds``, the rule serving starts captions with, so a
model learns to stop exactly where the worker's captioner stops it. The images are sized here too
(``image_fit``): as the family's image processor sizes them, so training sees what serving sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captionfleet.core.family import VED, caption_bounds
from captionfleet.core.model_store import ModelRefError
from captionfleet.trainer.preprocess import IGNORE_INDEX, encode_captions, preprocessing_for

# The families `captionfleet train` fine-tunes (and, for the first two, builds from scratch: settings.family).
TRAINED_FAMILIES: tuple[str, ...] = (VED, "git", "blip")
SCRATCH_FAMILIES: tuple[str, ...] = (VED, "git")


def check_trainable(path: Path | str, model_type: str) -> None:
    """ModelRefError (one line, exit 2 from the command) for a checkpoint of a family the trainer cannot train."""
    if model_type not in TRAINED_FAMILIES:
        raise ModelRefError(
            f"{str(path)!r} is a {model_type or 'model of no model_type'} checkpoint: captionfleet train fine-tunes "
            f"{', '.join(TRAINED_FAMILIES)} checkpoints. Serve this one as it is (WORKER_MODEL__REF, or publish it "
            "through the gate with captionfleet models import)"
        )


# -- image size --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFit:
    """How the data loader sizes pictures for a model (trainer/data.py ``fit_image``): exactly ``size``, or
    (``keep_aspect``) with the shorter side at ``size[0]``, the processor cropping afterwards."""

    size: tuple[int, int]  # (width, height)
    resample: Image.Resampling
    keep_aspect: bool = False


def _size_field(size: Any, name: str) -> int | None:
    # transformers 5 gives processors a SizeDict (not a dict); a processor built by hand may hold a dict.
    value = size.get(name) if hasattr(size, "get") else getattr(size, name, None)
    return int(value) if value else None


def image_fit(image_processor: Any) -> ImageFit:
    """The sizing rule of ``image_processor`` (height/width: ViT, BLIP; shorter side + crop: CLIP, as GIT's)."""
    size = getattr(image_processor, "size", None)
    resample = Image.Resampling(int(getattr(image_processor, "resample", None) or Image.Resampling.BILINEAR))
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height and width:
        return ImageFit((width, height), resample)
    shortest = _size_field(size, "shortest_edge")
    if shortest and not _size_field(size, "longest_edge"):
        return ImageFit((shortest, shortest), resample, keep_aspect=True)
    raise ModelRefError(
        f"the checkpoint's image processor ({type(image_processor).__name__}) sizes images by {size}: the trainer "
        "reads height/width or shortest_edge sizes; save it with one of those (image_processor.size)"
    )


def checkpoint_fit(path: Path) -> ImageFit:
    """A saved checkpoint's sizing rule, read from its image processor alone (the model is not loaded)."""
    from captionfleet.core import checkpoint_load

    return image_fit(checkpoint_load.load_image_processor(path))


# -- captions -----------------------------------------------------------------------------------------


def bounds(model_type: str, config: Any) -> tuple[int, int]:
    """The start and end tokens of a GIT or BLIP checkpoint's captions; ModelRefError when its config has none."""
    try:
        return caption_bounds(model_type, config)
    except (TypeError, AttributeError) as error:
        blip = model_type == "blip"
        what = "text_config's bos_token_id and sep_token_id" if blip else "bos_token_id and eos_token_id"
        raise ModelRefError(
            f"this {model_type} checkpoint's config.json lacks its {what}, which start and end every caption; "
            "set them in config.json (the tokenizer's [CLS]/[SEP], or <|endoftext|> for a GPT-2 tokenizer)"
        ) from error


def caption_token_limit(model_type: str, config: Any) -> int:
    """The most tokens a caption may take, its end token included: the text positions after the start token."""
    if model_type == VED:
        return int(config.decoder.n_positions) - 1
    if model_type == "blip":
        return int(config.text_config.max_position_embeddings) - 1
    return int(config.max_position_embeddings) - 1


def prefix_inputs(
    tokenizer: Any, captions: Sequence[str], *, start: int, end: int, pad: int, max_tokens: int
) -> dict[str, torch.Tensor]:
    """``input_ids`` (start, caption, end; right-padded), ``attention_mask`` and ``labels`` for GIT and BLIP.

    ``max_tokens`` counts the end token. A longer caption is cut and gets no end, as encode_captions does:
    teaching a model to stop in mid-sentence would be worse than letting max_new_tokens cut it. The padding
    is told apart by length, not by id (a GPT-2 tokenizer pads with the very token that ends a caption).
    """
    rows = []
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        rows.append([start, *(ids[:max_tokens] if len(ids) >= max_tokens else [*ids, end])])
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, 1 : len(row)] = input_ids[i, 1 : len(row)]  # the start token is given, never predicted
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class FamilyBatches:
    """Pictures and their captions -> one family's model inputs (a training batch's ``inputs``).

    Safe to call from the batch-making thread: the image processor is stateless per call and the tokenizer is
    called without padding or truncation (padding happens here), so its settings never change."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any, *, max_caption_tokens: int) -> None:
        config = model.config
        self.family = str(config.model_type)
        check_trainable("the model", self.family)
        self.tokenizer = tokenizer
        self.max_tokens = min(max_caption_tokens, caption_token_limit(self.family, config))
        if self.family == VED:
            # The worker's own numpy preprocessing (core/captioner.py), read from the processor's saved settings.
            self._preprocess = preprocessing_for(processor)
            self._image_processor = None
            return
        self._image_processor = getattr(processor, "image_processor", processor)
        self.start, self.end = bounds(self.family, config)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self._image_processor is None:
            return self._preprocess(images)
        # As the worker's FamilyCaptioner prepares them (core/families/prompts.py): the image processor's own call.
        return torch.as_tensor(self._image_processor(images=list(images), return_tensors="pt")["pixel_values"])

    def __call__(self, images: Sequence[Image.Image], captions: Sequence[str]) -> dict[str, torch.Tensor]:
        pixel_values = self.pixel_values(images)
        if self.family == VED:
            return {"pixel_values": pixel_values, "labels": encode_captions(self.tokenizer, captions, self.max_tokens)}
        text = prefix_inputs(
            self.tokenizer, captions, start=self.start, end=self.end, pad=self.pad, max_tokens=self.max_tokens
        )
        return {"pixel_values": pixel_values, **text}
