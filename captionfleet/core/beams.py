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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache


class PerImageProjection(nn.Module):
    """Wraps a cross-attention key/value projection: rows that are ``group`` equal copies (one per
    beam) are projected once and the result repeated; anything else is projected as it is."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.group = 1  # set per generate() call by beam_group()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group > 1 and x.dim() == 3 and x.shape[0] % group == 0:
            copies = x.unflatten(0, (-1, group))
            first = copies[:, :1]
            if torch.equal(copies, first.expand_as(copies)):  # cheap next to the GEMM it saves
                return self.inner(first.squeeze(1)).repeat_interleave(group, dim=0)
        return self.inner(x)


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


@contextmanager
def beam_group(model: nn.Module, num_beams: int) -> Iterator[dict[str, Any]]:
    """For one generate() call: tell the projections how many beams share an image, and give the
    generate kwargs (the shared cache when beam searching)."""
    wrappers = [m for m in model.modules() if isinstance(m, PerImageProjection)]
    # Restored, not reset to 1: a call nested in a paused one (core/between_steps.py) may have other beams.
    before = [wrapper.group for wrapper in wrappers]
    for wrapper in wrappers:
        wrapper.group = num_beams
    try:
        yield {"cache": SharedCrossAttentionCache()} if num_beams > 1 else {}
    finally:
        for wrapper, group in zip(wrappers, before, strict=True):
            wrapper.group = group
