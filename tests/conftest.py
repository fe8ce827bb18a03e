"""Fixtures shared by every test layer: a tiny but real VisionEncoderDecoder checkpoint, and tiny
checkpoints of the other model families (tests/tiny_families.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import GPT2LMHeadModel

from captionfleet.trainer.scratch import ScratchSizes, build_model

TINY_CAPTIONS = [
    "a red circle",
    "two blue squares",
    "a small green star above a yellow triangle",
    "three purple hexagons on a white background",
    "a large orange circle left of a blue square",
] * 4


def save_tiny_checkpoint(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    model, processor, tokenizer = build_model(TINY_CAPTIONS, ScratchSizes(image_size=image_size), seed=seed)
    # Untrained weights tend to predict end-of-text first, which would make every caption empty
    # and tests comparing captions toothless: damp that one token (bos = eos = pad in GPT-2).
    decoder = cast(GPT2LMHeadModel, model.decoder)
    with torch.no_grad():
        decoder.transformer.wte.weight[tokenizer.eos_token_id] *= 0.2
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT + GPT-2 checkpoint small enough to run in milliseconds; random weights."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_family("qwen2_vl")``: that family's tiny random checkpoint, built once per session."""
    from tests.tiny_families import build

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get
