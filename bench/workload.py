"""The work every benchmark row does, on the CPU (bench.compare) and on a GPU (bench.gpu): the same
full-architecture checkpoint and photo-like JPEGs, loaded the same way, decoding exactly ``TOKENS`` tokens
per image (random weights could stop at a random end-of-text: equal work per image in every row).

Every row gets that through the same in-place processor (``NoEndOfText``). transformers' own way,
``min_new_tokens``, adds two processors that each copy the whole score matrix and rewrite it every step
(``clone`` + ``where``: 13 ms of an image's 663 on the CPU, 4 beams, batch 8, one thread, limited to AVX2),
a cost that no production decoding pays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, VisionEncoderDecoderModel

from bench.full_checkpoint import save_full_checkpoint
from captionfleet.core.captioner import Captioner
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings

EOS = 50256


TOKENS = 16


def gen_config(beams: int, eos: int = EOS) -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        num_beams=beams,
        max_new_tokens=TOKENS,
        early_stopping=False,
        do_sample=False,
    )


class NoEndOfText(LogitsProcessor):
    """End-of-text is never chosen, so every row decodes exactly max_new_tokens (see the module's docstring)."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.eos] = -float("inf")  # in place: the scores are generate()'s own copy
        return scores


def equal_work(eos: int = EOS) -> LogitsProcessorList:
    """The ``logits_processor`` for a plain ``generate`` call with ``gen_config``."""
    return LogitsProcessorList([NoEndOfText(eos)])


def decoding(beams: int) -> DecodingSettings:
    return DecodingSettings(num_beams=beams, max_new_tokens=TOKENS)


def realistic_jpegs(folder: Path, count: int, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields plus texture and noise, ~300-600 KB at quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        fx, fy = rng.uniform(0.002, 0.02, 2).tolist()
        phase = rng.uniform(0, 6.28)
        base = np.stack([np.sin(xx * fx + phase + c) * np.cos(yy * fy - c) for c in (0.0, 2.1, 4.2)], axis=-1)
        noise = rng.normal(0, 0.12, (h // 4, w // 4, 3)).astype(np.float32).repeat(4, 0).repeat(4, 1)
        pixels = np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def prepare(
    checkpoint: Path, folder: Path, n: int, make_jpegs: Callable[[Path, int], list[Path]]
) -> tuple[Path, list[Path]]:
    """The full-architecture checkpoint and at least ``n`` JPEGs, made once and kept in ``--work``."""
    if not (checkpoint / "model.safetensors").exists():
        save_full_checkpoint(checkpoint)
    paths = sorted(folder.glob("*.jpg")) if folder.exists() else []
    if len(paths) < n:
        paths = make_jpegs(folder, n)
    return checkpoint, paths


def load_plain(path: Path) -> VisionEncoderDecoderModel:
    model = VisionEncoderDecoderModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    return model.eval()


def open_rgb(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def load_ved(path: Path, *, device: str, precision: str, decoding: DecodingSettings | None = None) -> Captioner:
    """A ViT-GPT2 checkpoint through the worker's loader; these benchmarks measure that family's fast path."""
    captioner = load_checkpoint(path, device=device, precision=precision, decoding=decoding)
    if not isinstance(captioner, Captioner):
        raise SystemExit(f"{path} is a {captioner.family} checkpoint: this benchmark measures vision-encoder-decoder")
    return captioner


def load_captioner(path: Path, precision: str, beams: int, device: str = "cpu") -> Captioner:
    captioner = load_ved(path, device=device, decoding=decoding(beams), precision=precision)
    # Same work per image in every row (see this module's docstring), on every path of the captioner.
    generate = captioner._generate

    def forced(pixel_values: torch.Tensor, config: GenerationConfig, **kwargs: Any) -> Any:  # what it replaces
        # First, as transformers runs min_new_tokens' processors before the caller's (the confidence recorder).
        own = kwargs.pop("logits_processor", [])
        processors = LogitsProcessorList([NoEndOfText(int(config.eos_token_id)), *own])
        return generate(pixel_values, config, logits_processor=processors, **kwargs)

    captioner._generate = forced  # type: ignore[method-assign]
    return captioner


class NullSink:
    def __init__(self) -> None:
        self.rows = 0
        self.failed = 0

    def write(self, results: Any) -> None:
        for result in results:
            self.rows += 1
            self.failed += 0 if result.ok else 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def done_ids(self) -> set[str]:
        return set()
