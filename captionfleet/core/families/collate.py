"""Many images' prepared inputs -> one batch for generate(), as the family's processor would pad it.

- Text (``input_ids`` and what is aligned with it) is padded to the longest row, on the family's side:
  left for decoder-only families (every row then ends where generation continues, and the attention
  mask hides the padding; generate() derives position ids from that mask), right for an encoder's input.
- Image tensors whose shapes differ past the first dimension (SmolVLM's number of image splits) are
  padded with zeros, which is how those processors pad a batch (their models drop all-zero images);
  image tensors that differ only in the first dimension (Qwen-VL's patches of every image, one after
  another, with ``image_grid_thw`` saying how many each has) are concatenated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

# Per-token tensors and what padding them holds (the pad id for input_ids is the tokenizer's).
TEXT_PADDING: dict[str, int] = {"attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


def collate(
    features: Sequence[Mapping[str, Any]], *, padding_side: Literal["left", "right"], pad_id: int
) -> dict[str, torch.Tensor]:
    names = list(features[0])
    if any(list(item) != names for item in features):
        raise ValueError("inputs of one batch hold different tensors: they were prepared by different models")
    batch: dict[str, torch.Tensor] = {}
    for name in names:
        values = [torch.as_tensor(item[name]) for item in features]
        if name == "input_ids" or name in TEXT_PADDING:
            fill = pad_id if name == "input_ids" else TEXT_PADDING[name]
            batch[name] = _pad_text(values, padding_side, fill)
        else:
            batch[name] = _stack_images(values)
    return batch


def _pad_text(rows: list[torch.Tensor], side: str, fill: int) -> torch.Tensor:
    longest = max(row.shape[-1] for row in rows)
    padded = []
    for row in rows:
        missing = longest - row.shape[-1]
        padded.append(F.pad(row, (missing, 0) if side == "left" else (0, missing), value=fill))
    return torch.cat(padded)


def _stack_images(values: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(value.shape[1:]) for value in values}
    if len(shapes) == 1:
        return torch.cat(values)
    largest = [max(sizes) for sizes in zip(*shapes, strict=True)]
    padded = []
    for value in values:
        # F.pad takes (before, after) pairs from the last dimension backwards; zeros go after.
        pairs: list[int] = []
        for have, want in reversed(list(zip(value.shape[1:], largest, strict=True))):
            pairs += [0, want - have]
        padded.append(F.pad(value, pairs, value=0) if value.dtype != torch.bool else F.pad(value.int(), pairs).bool())
    return torch.cat(padded)
