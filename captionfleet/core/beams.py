"""Beam search without redoing per-image work once per beam.

transformers' beam search expands each image's encoder output to ``num_beams`` identical copies
before decoding. Two costs follow from that, both pure waste because the copies are identical:

- every cross-attention layer projects the encoder output to keys and values once per *beam*
  (a 197 x 768 x 1536 GEMM per layer and beam for ViT-base + GPT-2);
- after every step the cache is reordered to follow the surviving beams, and that includes the
  cross-attention keys and values (batch x beams x 12 layers x 197 x 768 x 2 copied per step), though
  beams are only ever reordered among the beams of one image, whose cross-attention rows are equal.

Profiled on the full ViT-base + GPT-2 architecture (bf16, batch 8, 4 beams, one CPU thread) the
reorder was 27% of the run and the per-beam projections 15%. ``PerImageProjection`` computes the
projection once per image (after checking that the rows really are equal copies, else it computes
them all), and ``SharedCrossAttentionCache`` leaves the cross-attention part of the cache in place.
Captions are unchanged: the values computed are the same, only not computed or copied again.

One cost was left by that: the projection's result was repeated once per beam, so every decoding step's
cross-attention read each image's keys and values ``num_beams`` times (4 x 12 layers x 197 x 768 x 2
floats per image and step), and the repeat itself copied them. Where the decoder attends through
``grouped_cross_attention`` (``use_grouped_decoder_attention``; the CPU fast path), the projection keeps
one row per image and the beams of an image attend together, as ``num_beams`` queries against its one
set of keys and values. An image's rows are computed alike whatever its batch, so captions stay
independent of batching.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

logger = logging.getLogger(__name__)

# The decoder attention implementation registered with transformers by use_grouped_decoder_attention().
GROUPED_ATTENTION = "captionfleet_grouped"


class PerImageProjection(nn.Module):
    """Wraps a cross-attention key/value projection: rows that are ``group`` equal copies (one per
    beam) are projected once and the result repeated; anything else is projected as it is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.group = 1  # set per generate() call by beam_group()
        # One row per image, not per beam: set by beam_group() where the attention groups beams.
        self.per_image = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group > 1 and x.dim() == 3 and x.shape[0] % group == 0:
            copies = x.unflatten(0, (-1, group))
            first = copies[:, :1]
            if _are_beam_copies(x, copies, first, group):
                projected = self.inner(first.squeeze(1))
                return projected if self.per_image else projected.repeat_interleave(group, dim=0)
        return self.inner(x)


# The last tensor found to hold beam copies, and its group. Every cross-attention layer of a decoder gets
# the same encoder output tensor, so the check (a full read of it, 40 ms per layer for 8 images x 4
# beams on one CPU thread) runs once per generate() call instead of once per layer. A weak reference:
# a tensor freed and another allocated at its address is never taken for it. transformers never
# changes the encoder output in place.
_checked: tuple[weakref.ref[torch.Tensor], int] | None = None


def _are_beam_copies(x: torch.Tensor, copies: torch.Tensor, first: torch.Tensor, group: int) -> bool:
    global _checked
    checked = _checked  # read once: another thread may replace it meanwhile
    if checked is not None and checked[0]() is x and checked[1] == group:
        return True
    if not torch.equal(copies, first.expand_as(copies)):  # cheap next to the GEMM it saves
        return False
    _checked = (weakref.ref(x), group)
    return True


class SharedCrossAttentionCache(EncoderDecoderCache):
    """An encoder-decoder cache whose beam reordering leaves the cross-attention entries alone.

    Valid because beam search reorders beams only within an image and every beam of an image holds
    the same cross-attention keys and values (computed from copies of the same encoder output).
    """

    def __init__(self) -> None:
        super().__init__(DynamicCache(), DynamicCache())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def share_cross_attention_projections(model: Any) -> int:
    """Wrap the GPT-2-style cross-attention key/value projections of ``model.decoder``; returns how
    many. Decoders of another layout keep theirs (they still get the cache that skips reordering)."""
    count = 0
    decoder = getattr(model, "decoder", model)
    for module in decoder.modules():
        projection = getattr(module, "c_attn", None)
        cross = getattr(module, "is_cross_attention", False)
        if cross and isinstance(projection, nn.Module) and not isinstance(projection, PerImageProjection):
            module.c_attn = PerImageProjection(projection)
            count += 1
    return count


def grouped_cross_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, except where the keys and values hold one row per image and the
    queries one per beam (a PerImageProjection with ``per_image``): there each image's beams attend
    together, as one query block against the image's keys and values, which are read once."""
    rows, images = query.shape[0], key.shape[0]
    if rows == images:
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    group = rows // images
    if attention_mask is not None or rows != images * group:
        # Never the case for a ViT encoder's output (no padding, no mask); attend as transformers does.
        key, value = key.repeat_interleave(group, dim=0), value.repeat_interleave(group, dim=0)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    heads, length, width = query.shape[1:]
    # [images * beams, heads, length, d] -> [images, heads, beams * length, d]: one block per image.
    grouped = query.view(images, group, heads, length, width).transpose(1, 2).reshape(images, heads, -1, width)
    output, weights = eager_attention_forward(module, grouped, key, value, None, **kwargs)
    # output [images, beams * length, heads, d] and weights [images, heads, beams * length, keys], back
    # to one row per beam as transformers returns them.
    output = output.reshape(rows, length, heads, width)
    weights = weights.view(images, heads, group, length, -1).transpose(1, 2).reshape(rows, heads, length, -1)
    return output, weights


def use_grouped_decoder_attention(model: Any) -> bool:
    """Make a GPT-2 decoder attend through ``grouped_cross_attention`` (transformers' eager attention
    otherwise); True if switched. Left as they are: other decoders (their own eager kernels may differ:
    GPTBigCode's softmax in fp32), decoders without PerImageProjection layers, and GPT-2 configs asking for
    ``reorder_and_upcast_attn``, which transformers applies under its own eager attention only."""
    decoder = getattr(model, "decoder", None)
    config = getattr(decoder, "config", None)
    setter = getattr(decoder, "set_attn_implementation", None)
    if decoder is None or setter is None or getattr(config, "model_type", None) != "gpt2":
        return False
    if getattr(config, "reorder_and_upcast_attn", False):
        return False
    if not any(isinstance(m, PerImageProjection) for m in decoder.modules()):
        return False
    AttentionInterface.register(GROUPED_ATTENTION, grouped_cross_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # additive float masks, as eager's
    try:
        setter(GROUPED_ATTENTION)
    except Exception as error:  # a decoder that cannot switch: eager (use_eager_decoder_attention), slower
        logger.info("decoder attention not grouped (%s)", error)
        return False
    return True


def _attends_grouped(model: nn.Module) -> bool:
    decoder = getattr(model, "decoder", None)
    return getattr(getattr(decoder, "config", None), "_attn_implementation", None) == GROUPED_ATTENTION


@contextmanager
def beam_group(model: nn.Module, num_beams: int, *, per_image: bool = True) -> Iterator[dict[str, Any]]:
    """For one generate() call: tell the projections how many beams share an image, and whether they
    may keep one row per image (``per_image``, where the decoder attends through
    grouped_cross_attention; a cache laid out per beam, as the static one, needs False), and give the
    generate kwargs (the shared cache when beam searching)."""
    wrappers = [m for m in model.modules() if isinstance(m, PerImageProjection)]
    per_image = per_image and _attends_grouped(model)
    # Restored, not reset: a call nested in a paused one (core/between_steps.py) may have other beams.
    before = [(wrapper.group, wrapper.per_image) for wrapper in wrappers]
    for wrapper in wrappers:
        wrapper.group = num_beams
        wrapper.per_image = per_image
    try:
        yield {"cache": SharedCrossAttentionCache()} if num_beams > 1 else {}
    finally:
        for wrapper, (group, kept) in zip(wrappers, before, strict=True):
            wrapper.group = group
            wrapper.per_image = kept
