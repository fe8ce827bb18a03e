"""One image and its prompt -> a family's model inputs for that image, in a decode thread.

Each family's prompt style (core/family.py) decides the text; the family's processor does
the rest (resizing, normalising, a dynamic-resolution family's patches and grid, image tokens in the
text). The result holds tensors with a batch dimension of 1 and no padding: core/families/collate.py
pads a batch at the model thread.

Thread safety: the processor's image processor is stateless per call; its tokenizer is only ever
called without padding or truncation (collate.py pads), so the Rust tokenizer's settings, which a call
with other settings would change, never change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from transformers.image_utils import SizeDict

from captionfleet.core.captioner import PromptError
from captionfleet.core.family import Family, caption_bounds


def text_for(family: Family, processor: Any, prompt: str | None) -> str | None:
    """The text the processor gets for ``prompt`` (None: the family's default)."""
    prompt = family.default_prompt if prompt is None else prompt
    if family.prompt_style == "chat":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or ""}]}]
        # Rendered by the tokenizer with the processor's template: some processors' own
        # apply_chat_template reads their video part (SmolVLM's), which is not loaded (core/processors.py).
        template = getattr(processor, "chat_template", None)
        text = processor.tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        return str(text)
    image_token = getattr(processor, "image_token", None)
    if (
        family.prompt_style == "text"
        and prompt is not None
        and isinstance(image_token, str)
        and image_token not in prompt
    ):
        # PaliGemma's processor wants the image token first (it guesses, with a warning per call, without it).
        return image_token + prompt
    return prompt


def encode(family: Family, processor: Any, config: Any, image: Image.Image, prompt: str | None) -> dict[str, Any]:
    """The model inputs for one image (tensors of batch size 1). A processor that refuses the request's
    prompt (Florence-2's "<CAPTION> a photo": a task token must be alone) raises PromptError: the item
    fails as malformed, not as an undecodable image with a stack trace."""
    try:
        return _encode(family, processor, config, image, prompt)
    except Exception as error:
        if prompt is None:
            raise
        # Whose fault: the same image with the family's default prompt tells (this costs only on failure).
        try:
            _encode(family, processor, config, image, None)
        except Exception:
            raise error from None
        message = " ".join(str(error).split())[:300]
        raise PromptError(
            f"the {family.model_type} processor cannot take this prompt ({type(error).__name__}: {message}); "
            "send another prompt, or none for the model's default"
        ) from error


def _encode(family: Family, processor: Any, config: Any, image: Image.Image, prompt: str | None) -> dict[str, Any]:
    text = text_for(family, processor, prompt)
    if family.prompt_style == "decoder_prefix":
        return _decoder_prefix(family, processor, config, image, text)
    if text is None:
        features = dict(processor(images=[image], return_tensors="pt"))
    else:
        features = dict(processor(images=[image], text=[text], return_tensors="pt"))
    features.pop("labels", None)  # PaliGemma's processor makes training labels; generate() takes none
    return features


def _decoder_prefix(
    family: Family, processor: Any, config: Any, image: Image.Image, text: str | None
) -> dict[str, Any]:
    """BLIP and GIT: the prompt is the caption's start, after the decoder's start token.

    BLIP's generate() makes the first token its decoder's bos and drops the last one (the [SEP] its
    processor appends), so the ids are [bos] + prompt + [sep]; GIT's are [CLS] + prompt, as in their
    model cards' conditional captioning examples. Without a prompt both reduce to what their generate()
    starts from alone."""
    features = dict(processor.image_processor(images=[image], return_tensors="pt"))
    words = processor.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    start, end = caption_bounds(family.model_type, config)
    ids = [start, *words, end] if family.model_type == "blip" else [start, *words]
    features["input_ids"] = torch.tensor([ids], dtype=torch.long)
    features["attention_mask"] = torch.ones_like(features["input_ids"])
    return features


def visual_cost(features: dict[str, Any], image_processor: Any) -> int:
    """The pixels the vision encoder processes for one prepared image (what the batcher's limit counts):
    a dynamic-resolution family's grid of patches, or the image (each split of it) as resized."""
    grid = features.get("image_grid_thw")
    if grid is not None:
        patch = int(getattr(image_processor, "patch_size", 14))
        return int(grid[:, 1:].prod(dim=-1).sum()) * patch * patch
    pixels = features["pixel_values"]
    if pixels.dim() < 4:
        return int(pixels.shape[0])
    return math.prod(pixels.shape[1:-3]) * int(pixels.shape[-2]) * int(pixels.shape[-1])


def sized_by_area(image_processor: Any) -> bool:
    """Whether the processor resizes each image to an area between two bounds (Qwen-VL's dynamic
    resolution: ``size`` holds pixel counts, ``longest_edge`` the most), not to a side length."""
    size = getattr(image_processor, "size", None)
    return hasattr(image_processor, "merge_size") and size is not None and "longest_edge" in size


def cap_visual_pixels(image_processor: Any, max_pixels: int) -> int | None:
    """Lower an area-sized processor's largest image to ``max_pixels`` (its own bound when smaller);
    returns the bound in force, or None for a processor with a fixed size or fixed splits.

    Qwen2-VL's checkpoints allow 12.8 MP, Qwen3-VL's 16.8 MP: a 12 MP photo becomes 61k patches
    (275 MiB of pixel values, and attention over them). Set once at load, before any decode thread
    prepares an image: the processor is only read after that."""
    if not sized_by_area(image_processor):
        return None
    size = dict(image_processor.size)
    longest = min(int(size["longest_edge"]), max_pixels)
    size["longest_edge"] = longest
    if "shortest_edge" in size:
        size["shortest_edge"] = min(int(size["shortest_edge"]), longest)
    image_processor.size = type(image_processor.size)(**size)
    return longest


def draft_size(image_processor: Any) -> tuple[int, int] | None:
    """The smallest size a JPEG may be decoded at (``core.images.decode_image``) without losing what the
    processor keeps; None (decode in full) for a size rule not recognised here."""
    size = getattr(image_processor, "size", None)
    if isinstance(size, SizeDict):  # what transformers 5's image processors hold: not a dict
        size = dict(size)
    if not isinstance(size, dict):
        return None
    if sized_by_area(image_processor):
        # Qwen-VL's size is in pixels (min and max area): both sides at least sqrt(max) keep every pixel used.
        side = math.isqrt(int(size["longest_edge"]))
        return (side, side)
    if "height" in size and "width" in size:
        return (int(size["width"]), int(size["height"]))
    for key in ("shortest_edge", "longest_edge"):
        if key in size:
            return (int(size[key]), int(size[key]))
    return None
