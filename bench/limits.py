"""The limit a row is measured against: the FLOPs one image needs (counted from the model's layer shapes)
and the best matmul rate this machine reaches per precision on the model's own GEMM shapes. The limit of a
precision = that rate divided by the FLOPs per image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, VisionEncoderDecoderModel, ViTConfig

from bench.workload import TOKENS, equal_work, gen_config, load_plain, open_rgb
from captionfleet.core import int8_linear, onednn
from captionfleet.core.captioner import Preprocessing


def flops_per_image(model: VisionEncoderDecoderModel, pixels: torch.Tensor, beams: int) -> float:
    """Matmul FLOPs one image needs: every Linear/Conv1D/Conv2d of a generate call counted from its
    shapes by forward hooks, plus attention's two matmuls per layer from the sequence lengths, less the
    per-beam copies of the cross-attention projections."""
    total = 0.0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            out_pixels = output.shape[-1] * output.shape[-2]
            total += (
                2.0
                * x.shape[0]
                * out_pixels
                * module.out_channels
                * module.in_channels
                * int(np.prod(module.kernel_size))
            )
        else:
            weight = cast(torch.Tensor, module.weight)
            k = x.shape[-1]
            n = weight.shape[1] if weight.shape[0] == k and type(module).__name__ == "Conv1D" else weight.shape[0]
            total += 2.0 * (x.numel() // k) * k * n

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d) or type(m).__name__ == "Conv1D"
    ]
    try:
        with torch.inference_mode():
            eos = model.config.eos_token_id
            config = gen_config(beams, eos)
            model.generate(pixel_values=pixels[:1], generation_config=config, logits_processor=equal_work(eos))
    finally:
        for handle in handles:
            handle.remove()
    enc, dec = model.config.encoder, model.config.decoder
    assert isinstance(enc, ViTConfig) and isinstance(dec, GPT2Config), "a ViT + GPT-2 checkpoint"
    # ViTConfig allows (height, width) pairs; the bench's checkpoint has square images and patches.
    assert isinstance(enc.image_size, int) and isinstance(enc.patch_size, int)
    seq = (enc.image_size // enc.patch_size) ** 2 + 1
    total += enc.num_hidden_layers * 2 * 2.0 * seq * seq * enc.hidden_size  # ViT QK^T and AV
    # Each beam of an image gets the same cross-attention keys and values: the work needed counts them
    # once (transformers projects them per beam; captionfleet once per image, captionfleet/core/beams.py).
    total -= (beams - 1) * dec.n_layer * 2.0 * seq * dec.n_embd * 2 * dec.n_embd
    rows = beams
    for step in range(1, TOKENS + 1):  # decoder self-attention over `step` tokens, cross over `seq`
        total += dec.n_layer * 2 * 2.0 * rows * (step + seq) * dec.n_embd
    return total


def matmul_rates(quick: bool) -> dict[str, dict[str, float]]:
    """GFLOP/s of each kernel on the model's own GEMM shapes; the best per precision is the limit."""
    shapes = [(32 * 197, 768, 3072), (32 * 197, 3072, 768), (128, 768, 50257)]
    reps = 3 if quick else 8
    out: dict[str, dict[str, float]] = {}
    ops = onednn._onednn_ops()
    for m, k, n in shapes:
        x = torch.randn(m, k)
        lin = nn.Linear(k, n)
        flop = 2.0 * m * k * n
        # Each callable is measured before the next shape rebinds these names (B023 is harmless here).
        kernels: dict[str, Callable[[], object]] = {"fp32 torch": lambda: lin(x)}  # noqa: B023
        if ops is not None:
            packed = ops[0](lin.weight.detach(), None)
            kernels["fp32 oneDNN"] = lambda: ops[1](x, packed, lin.bias, "none", [], "")  # noqa: B023
        xb, linb = x.bfloat16(), nn.Linear(k, n).bfloat16()
        kernels["bf16"] = lambda: linb(xb)  # noqa: B023
        if int8_linear.int8_gemm_weight_range() is not None:  # the GEMM alone, as for the float kernels
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            wq = torch.randint(-63, 64, (n, k), dtype=torch.int8)
            kernels["int8 _int_mm"] = lambda: torch._int_mm(xq, wq.t())  # noqa: B023
        with torch.inference_mode():
            for name, fn in kernels.items():
                seconds = onednn._median_seconds(fn, reps)
                out.setdefault(name, {})[f"{m}x{k}x{n}"] = round(flop / seconds / 1e9, 1)
    return out


def flops_per_image_by_beams(checkpoint: Path, photo: Path, beams: tuple[int, ...]) -> dict[int, float]:
    plain = load_plain(checkpoint)
    pixels = Preprocessing.from_checkpoint(checkpoint)(open_rgb([photo]))  # the captioner's own preprocessing
    return {b: flops_per_image(plain, pixels, b) for b in beams}


def limit_key(precision: str) -> str:
    return {"fp32-plain": "fp32"}.get(precision, precision)


def best_rates(rates: dict[str, dict[str, float]]) -> dict[str, float]:
    """The best GFLOP/s per precision over every kernel and shape of that precision."""
    best = {
        "fp32": max(max(v.values()) for k, v in rates.items() if k.startswith("fp32")),
        "bf16": max(rates["bf16"].values()),
    }
    # Without an exact int8 GEMM the int8 row runs fp32 (fastpath.resolve_precision): so does its limit.
    best["int8"] = max(rates["int8 _int_mm"].values()) if "int8 _int_mm" in rates else best["fp32"]
    return best
