"""Batches for training: which pictures and captions each step sees, and ViT-GPT2's labels.

A batch's model inputs are its family's (trainer/family_batches.py); this module picks the items (a pure
function of the seed and the step, so a resumed run sees the batches an uninterrupted one would).

ViT-GPT2's labels are the caption's tokens followed by one end-of-sequence token, padded with -100 (ignored
by the loss). GPT-2 uses a single special token as bos, eos and pad, so padding cannot be told
apart from the real end by its id: the -100s are placed by length, and the first eos after the
caption is kept as a label, which is what teaches the model to stop.
"""

from __future__ import annotations

import functools
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captionfleet.core.captioner import Preprocessing
from captionfleet.trainer.data import CaptionDataset

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index


def preprocessing_for(processor: Any) -> Preprocessing:
    """The worker's preprocessing for an image processor: saved and read back exactly as the worker
    reads ``preprocessor_config.json`` from a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        return Preprocessing.from_checkpoint(Path(tmp))


def encode_captions(tokenizer: Any, captions: Sequence[str], max_tokens: int) -> torch.Tensor:
    """(batch, length) label ids: caption tokens, then eos, then -100 padding.

    ``max_tokens`` counts the eos. A longer caption is cut and gets no eos: teaching the model to
    stop in mid-sentence would be worse than letting the worker's max_new_tokens cut it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token (GPT-2: <|endoftext|>)")
    rows = []
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        rows.append(ids[:max_tokens] if len(ids) >= max_tokens else [*ids, eos])
    width = max(len(r) for r in rows)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, ids in enumerate(rows):
        labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return labels


# Pictures and their captions -> the model's keyword arguments (trainer/family_batches.FamilyBatches).
Encoder = Callable[[Sequence[Image.Image], Sequence[str]], dict[str, torch.Tensor]]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # the model's keyword arguments: pixel_values, labels, and text for GIT/BLIP

    def __len__(self) -> int:
        return int(self.inputs["pixel_values"].shape[0])

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: value.to(device) for name, value in self.inputs.items()}


class BatchMaker:
    """Turns data-set indices into a Batch; which caption of an image is used is a pure function
    of (seed, index, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, dataset: CaptionDataset, encode: Encoder, seed: int) -> None:
        self.dataset = dataset
        self.encode = encode
        self.seed = seed

    def caption_for(self, index: int, epoch: int) -> str:
        captions = self.dataset.captions(index)
        if len(captions) == 1:
            return captions[0]
        return random.Random(f"caption:{self.seed}:{epoch}:{index}").choice(captions)

    def __call__(self, indices: Sequence[int], epoch: int = 0) -> Batch:
        images: list[Image.Image] = [self.dataset.image(i) for i in indices]
        captions = [self.caption_for(i, epoch) for i in indices]
        return Batch(self.encode(images, captions))


def batch_indices(length: int, batch_size: int, seed: int, micro_step: int) -> tuple[list[int], int]:
    """The data-set indices of micro-batch number ``micro_step`` and its epoch.

    Each epoch is a fresh permutation seeded by (seed, epoch), and an epoch's tail shorter than a
    batch is dropped, so the answer depends on nothing but the arguments: resuming needs no
    sampler state.
    """
    per_epoch = max(1, length // batch_size)
    epoch, position = divmod(micro_step, per_epoch)
    if length >= batch_size:
        chunk = _permutation(length, seed, epoch)[position * batch_size : (position + 1) * batch_size]
    else:  # tiny data sets (tests): repeat items to fill the batch
        generator = torch.Generator().manual_seed(hash_seed(seed, epoch, micro_step))
        chunk = torch.randint(0, length, (batch_size,), generator=generator)
    return [int(i) for i in chunk], epoch


@functools.lru_cache(maxsize=2)
def _permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(length, generator=torch.Generator().manual_seed(hash_seed(seed, epoch)))


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of a tuple is not stable across runs)."""
    value = 1469598103934665603
    for part in parts:
        for byte in int(part).to_bytes(8, "little", signed=True):
            value = ((value ^ byte) * 1099511628211) % (1 << 63)
    return value
