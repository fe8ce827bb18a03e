"""Check the captioner on a CUDA device and measure generation throughput there.

Run on a GPU machine: ``python bench/device_check.py``. Prints JSON lines:
- the device and dtype the captioner picks (auto: CUDA in half precision);
- whether batched captions equal one-by-one captions there (tiny model, greedy and beams), for today's path
  and for the new one (static KV cache compiled into CUDA graphs, core/static_decoding.py), and whether the
  new path's captions equal today's;
- the GPU image path (core/gpu_images.py): how many JPEGs nvJPEG decoded, how far its pixels are from the
  CPU path's, and whether the captions of the two agree;
- images/s of the full ViT-base/16 + GPT-2 124M architecture (random weights: real compute cost)
  for the model card's usage (fp32, one image per generate call, 4 beams, 16 tokens) next to
  batched fp16 in the same run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import load_ved, realistic_jpegs
from captionfleet.core.beams import use_grouped_decoder_attention
from captionfleet.core.captioner import Captioner
from captionfleet.core.gpu_images import device_decoder, images_to_pixels
from captionfleet.core.settings import DecodingSettings
from tests.conftest import save_tiny_checkpoint


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def check_tiny() -> None:
    path = save_tiny_checkpoint(Path(tempfile.mkdtemp()))
    captioner = load_ved(path, device="auto", precision="auto")
    emit(check="auto_device", device=str(captioner.device), dtype=str(captioner.dtype))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(16)]
    today: dict[int, list[str]] = {}
    for beams in (1, 4):
        decoding = DecodingSettings(num_beams=beams, max_new_tokens=12)
        batched = captioner.caption(images, decoding)
        singles = [captioner.caption([image], decoding)[0] for image in images]
        same = sum(a == b for a, b in zip(batched, singles, strict=True))
        emit(check="batched_equals_single", beams=beams, identical=same, of=len(images), distinct=len(set(batched)))
        today[beams] = batched
    # The new path: two shapes only (16 images, and 1), so the check compiles two graphs, not every bucket.
    checked = [DecodingSettings(num_beams=beams, max_new_tokens=12) for beams in (1, 4)]
    started = time.perf_counter()
    runs = captioner.use_static_cache(len(images), checked, sizes=[1, len(images)])  # compiles and captures
    emit(check="static_cache_warm_up", runs=runs, seconds=round(time.perf_counter() - started, 1))
    for beams, decoding in zip((1, 4), checked, strict=True):
        assert captioner.static is not None and captioner.static.handles(captioner.generation_config(decoding))
        batched = captioner.caption(images, decoding)
        singles = [captioner.caption([image], decoding)[0] for image in images]
        emit(
            check="static_cache_batched_equals_single",
            beams=beams,
            identical=sum(a == b for a, b in zip(batched, singles, strict=True)),
            equal_to_dynamic=sum(a == b for a, b in zip(batched, today[beams], strict=True)),
            of=len(images),
        )
    captioner.static = None
    check_grouped_attention(captioner, images, today[4])
    check_gpu_images(captioner)


def check_grouped_attention(captioner: Captioner, images: list[Image.Image], per_beam: list[str]) -> None:
    """core/beams.py's grouped cross-attention (the CPU default) on this device: batched == one by one at 4
    beams, and how many captions equal the per-beam path's (a candidate for the GPU path: not on there yet)."""
    before = captioner.model.decoder.config._attn_implementation
    switched = use_grouped_decoder_attention(captioner.model)
    decoding = DecodingSettings(num_beams=4, max_new_tokens=12)
    try:
        batched = captioner.caption(images, decoding)
        singles = [captioner.caption([image], decoding)[0] for image in images]
    finally:  # the next checks run on the attention as it was
        captioner.model.decoder.set_attn_implementation(before)
    emit(
        check="grouped_cross_attention_batched_equals_single",
        switched=switched,
        identical=sum(a == b for a, b in zip(batched, singles, strict=True)),
        equal_to_per_beam=sum(a == b for a, b in zip(batched, per_beam, strict=True)),
        of=len(images),
    )


def check_gpu_images(captioner: Captioner) -> None:
    """nvJPEG vs the CPU path on photo-like JPEGs: pixels and the captions made from them."""
    folder = Path(tempfile.mkdtemp())
    blobs = [path.read_bytes() for path in realistic_jpegs(folder, 8, (640, 480))]
    on_gpu = images_to_pixels(blobs, captioner.preprocess, device=captioner.device, dtype=torch.float32)
    on_cpu = images_to_pixels(blobs, captioner.preprocess, device=captioner.device, dtype=torch.float32, decoder=None)
    # The CPU path decodes with draft mode (a reduced-scale DCT) first: some difference is expected.
    difference = (on_gpu.pixels - on_cpu.pixels).abs()
    decoding = DecodingSettings(num_beams=1, max_new_tokens=12)
    gpu_captions = captioner.caption_pixels(on_gpu.pixels, decoding)
    cpu_captions = captioner.caption_pixels(on_cpu.pixels, decoding)
    emit(
        check="gpu_images",
        decoder=device_decoder(captioner.device) is not None,
        on_device=on_gpu.on_device,
        of=len(blobs),
        failures=len(on_gpu.failures),
        max_abs_pixel_difference=round(float(difference.max()), 4),
        mean_abs_pixel_difference=round(float(difference.mean()), 4),
        same_captions=sum(a == b for a, b in zip(gpu_captions, cpu_captions, strict=True)),
    )


def full_model(dtype: torch.dtype) -> VisionEncoderDecoderModel:
    decoder = GPT2Config(add_cross_attention=True)
    decoder.is_decoder = True
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = 50256
    torch.manual_seed(0)
    return VisionEncoderDecoderModel(config=config).to("cuda", dtype).eval()  # type: ignore[arg-type]


def throughput(model: VisionEncoderDecoderModel, batch: int, beams: int, dtype: torch.dtype, total: int) -> dict:
    gen = GenerationConfig(
        decoder_start_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        num_beams=beams,
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
    )
    pixels = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        model.generate(pixel_values=pixels, generation_config=gen)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        calls = max(1, total // batch)
        start = time.perf_counter()
        for _ in range(calls):
            model.generate(pixel_values=pixels, generation_config=gen)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    images = calls * batch
    return {
        "images_per_s": round(images / seconds, 1),
        "ms_per_image": round(1000 * seconds / images, 2),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20),
    }


def bench_full() -> None:
    fp32 = full_model(torch.float32)
    card = throughput(fp32, batch=1, beams=4, dtype=torch.float32, total=8)
    emit(bench="model_card_fp32_b1_beams4", **card)
    del fp32
    torch.cuda.empty_cache()
    fp16 = full_model(torch.float16)
    for batch, beams in ((32, 4), (128, 1)):
        row = throughput(fp16, batch=batch, beams=beams, dtype=torch.float16, total=batch * 2)
        emit(
            bench=f"captionfleet_fp16_b{batch}_beams{beams}",
            **row,
            ratio_to_card=round(row["images_per_s"] / card["images_per_s"], 1),
        )


if __name__ == "__main__":
    emit(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    check_tiny()
    bench_full()
