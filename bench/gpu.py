"""bench.compare's side by side on a CUDA device: what users would run vs captionfleet, against the limit.

    python -m bench.gpu [--quick] [--out docs]             (on the GPU machine: bench/gpu_session.sh)
    python -m bench.gpu --device cpu --checkpoint DIR ...  (a smoke test of this script, tests/unit)

Same images, weights and decoding as bench.compare (the full ViT-base/16-224 + GPT-2 124M
architecture with random weights; every row generates exactly 16 tokens). Rows:

  a    model card: ViTImageProcessor + one image per generate call, fp32, 4 beams
  b    plain batched generate, fp32, batch 8, 4 beams (bench.compare's row b)
  b16  plain batched generate with the model in fp16, batch 64, 4 beams: what a GPU user would write
  c    captionfleet: JPEG folder -> CaptionPipeline with the GPU overlay's settings (k8s/overlays/gpu:
       batch 32, 6 decode threads) and the device's default precision, 4 beams
  greedy, model only, batch 128: fp32, fp16, bf16 (captionfleet's Captioner); the default precision with
       4 beams at batch 32 (today's path from preprocessed host tensors)
  grouped: model only, default precision, 4 beams at batch 32 and 64, with core/beams.py's grouped
       cross-attention switched on (the CPU's default; on CUDA a candidate, measured here first); and
       eager: its control, the decoder in transformers' eager attention without the grouping, batch 32
  end to end: JPEGs through the pipeline, default precision, greedy, batch 128, vs model only
  (c and end to end take the pipeline's default WORKER_BATCH__DEVICE_DECODE=auto: a batch's JPEGs decoded
       on the device where torchvision loads, by the decode threads where it does not)
  new (issue 20), the default precision through kept static KV caches (core/static_decoding.py, compiled
       into CUDA graphs by transformers on CUDA), greedy at batch 128 and 4 beams at batch 32:
       model only from decoded tensors already on the device, and end to end from the JPEG files with
       the GPU image path (core/gpu_images.py: nvJPEG, resize and normalise on the device; each row's
       note says how many images nvJPEG decoded, 0 where torchvision is missing)
  A row that fails records why instead of a figure; the new rows run last (compiling takes a while).

The limit of a precision = the best matmul rate measured here on the model's own GEMM shapes (fp32
with TF32 off, as the rows run it; fp16; bf16) divided by the FLOPs per image (bench.compare's count).
Rows run in this one process (the GPU's memory peak is reset per row); rounds interleave the rows.
Writes <out>/benchmarks-gpu[-quick].json, -table.md and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import ViTImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chart import bar_chart
from bench.limits import flops_per_image_by_beams
from bench.workload import (
    TOKENS,
    NullSink,
    equal_work,
    gen_config,
    load_captioner,
    load_plain,
    open_rgb,
    prepare,
    realistic_jpegs,
)
from captionfleet.core import fastpath
from captionfleet.core.beams import use_grouped_decoder_attention
from captionfleet.core.captioner import Captioner
from captionfleet.core.gpu_images import device_decoder, images_to_pixels
from captionfleet.core.images import ImageLimits
from captionfleet.core.int8_linear import int8_gemm_weight_range
from captionfleet.core.settings import BatchSettings
from captionfleet.core.threads import decode_threads
from captionfleet.worker.connectors.local import iter_folder
from captionfleet.worker.pipeline import CaptionPipeline

# k8s/overlays/gpu/kustomization.yaml: WORKER_BATCH__MAX_ITEMS=128, MAX_SEQUENCES=128 (32 images at row c's
# 4 beams), PREFETCH=256, decode threads auto (the CPU limit but one, here resolved for a GPU worker whatever
# the device: the smoke test on CPU runs the same settings).
GPU_OVERLAY_BATCH = BatchSettings(
    max_items=128, max_sequences=128, prefetch=256, decode_threads=decode_threads(0, on_cuda=True)
)
LIMITS = ImageLimits(max_bytes=50 << 20, max_pixels=50_000_000)


@dataclass
class Row:
    name: str
    beams: int
    precision: str
    batch: int
    seconds: list[float] = field(default_factory=list)
    images: int = 0
    peak_mb: float = 0.0
    error: str = ""
    note: str = ""


class Device:
    """Timing and memory on the device the rows run on (a CPU run is only a smoke test)."""

    def __init__(self, name: str) -> None:
        if name == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA GPU is visible: run this on the GPU machine (bench/gpu_session.sh), or pass "
                "--device cpu with a small --checkpoint to smoke-test the script"
            )
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32, as on the CPU
            torch.backends.cudnn.allow_tf32 = False

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else 0.0

    def name(self) -> str:
        return torch.cuda.get_device_name(0) if self.cuda else "cpu (smoke test)"

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def matmul_rates(device: Device, batch: int, quick: bool) -> dict[str, dict[str, float]]:
    """GFLOP/s per dtype on the model's GEMM shapes at the greedy batch (encoder MLP, lm_head)."""
    shapes = [(batch * 197, 768, 3072), (batch * 197, 3072, 768), (batch, 768, 50257)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.cuda:
        dtypes["fp16"] = torch.float16
    reps = 5 if quick else 20
    out: dict[str, dict[str, float]] = {}
    for name, dtype in dtypes.items():
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device.torch, dtype=dtype)
            b = torch.randn(k, n, device=device.torch, dtype=dtype)
            a @ b  # warm-up: kernel selection
            seconds = device.timed(lambda: [a @ b for _ in range(reps)]) / reps  # noqa: B023
            out.setdefault(name, {})[f"{m}x{k}x{n}"] = round(2.0 * m * k * n / seconds / 1e9, 1)
    # The CPU smoke run's default precision is int8 where the CPU has no native bf16 (an AVX2-only one).
    if not device.cuda and int8_gemm_weight_range() is not None:
        for m, k, n in shapes:
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            w = torch.randint(-63, 64, (n, k), dtype=torch.int8)
            torch._int_mm(x, w.t())  # warm-up
            seconds = device.timed(lambda: [torch._int_mm(x, w.t()) for _ in range(reps)]) / reps  # noqa: B023
            out.setdefault("int8", {})[f"{m}x{k}x{n}"] = round(2.0 * m * k * n / seconds / 1e9, 1)
    return out


def plain_generate(checkpoint: Path, device: Device, photos: list[Path], row: Row, n: int) -> float:
    """Rows a, b, b16: transformers as its model card shows, on the device."""
    dtype = torch.float16 if row.precision == "fp16" else torch.float32
    model = load_plain(checkpoint).to(device.torch, dtype)  # type: ignore[arg-type]  # transformers' stub
    processor = ViTImageProcessor.from_pretrained(checkpoint, trust_remote_code=False)
    eos = model.config.eos_token_id  # the smoke test's model is not GPT-2
    config = gen_config(row.beams, eos)

    def run(paths: list[Path]) -> None:
        for i in range(0, len(paths), row.batch):
            pixels = processor(images=open_rgb(paths[i : i + row.batch]), return_tensors="pt").pixel_values
            pixels = pixels.to(device.torch, model.dtype)
            model.generate(pixel_values=pixels, generation_config=config, logits_processor=equal_work(eos))

    with torch.inference_mode():
        run(photos[: row.batch])  # warm-up
        device.reset_peak()
        return device.timed(lambda: run(photos[:n]))


def pipeline(captioner: Captioner, device: Device, folder: Path, n: int, batch: BatchSettings) -> float:
    items = list(iter_folder(folder))[:n]
    CaptionPipeline(captioner, NullSink(), batch, LIMITS).run(items[: batch.max_items])  # warm-up
    device.reset_peak()
    sink = NullSink()
    seconds = device.timed(lambda: CaptionPipeline(captioner, sink, batch, LIMITS).run(items))
    if sink.rows != len(items) or sink.failed:
        raise RuntimeError(f"pipeline wrote {sink.rows} rows ({sink.failed} failed) for {len(items)} images")
    return seconds


def model_only(captioner: Captioner, device: Device, pixels: torch.Tensor, batch: int) -> float:
    def run() -> None:
        for i in range(0, pixels.shape[0], batch):
            captioner.caption_pixels(pixels[i : i + batch])

    run()  # warm-up: cuBLAS handles, and for the static rows the compilation and graph capture
    device.reset_peak()
    return device.timed(run)


def new_model_only(captioner: Captioner, device: Device, pixels: torch.Tensor, batch: int) -> float:
    """The new path from decoded tensors: already on the device in the model's dtype, static KV cache."""
    # One bucket, the row's batch: the bench's batches are all full, and each bucket compiles on its own.
    captioner.use_static_cache(batch, sizes=[batch])
    return model_only(captioner, device, pixels.to(device.torch, captioner.dtype), batch)


def new_end_to_end(captioner: Captioner, device: Device, paths: list[Path], batch: int, row: Row) -> float:
    """The new path from JPEG files: bytes read, decoded and prepared on the device, static KV cache."""
    captioner.use_static_cache(batch, sizes=[batch])
    decoder = device_decoder(device.torch)
    decoded = [0, 0]  # on the device, all

    def run(chosen: list[Path]) -> None:
        for i in range(0, len(chosen), batch):
            blobs = [path.read_bytes() for path in chosen[i : i + batch]]
            prepared = images_to_pixels(
                blobs, captioner.preprocess, device=device.torch, dtype=captioner.dtype, limits=LIMITS, decoder=decoder
            )
            if prepared.failures:
                raise RuntimeError(f"{len(prepared.failures)} of {len(blobs)} JPEGs failed: {prepared.failures}")
            decoded[0] += prepared.on_device
            decoded[1] += len(blobs)
            captioner.caption_pixels(prepared.pixels)

    run(paths[:batch])  # warm-up: nvJPEG's handles, the compilation and graph capture
    decoded[:] = [0, 0]
    device.reset_peak()
    seconds = device.timed(lambda: run(paths))
    row.note = f"nvJPEG decoded {decoded[0]} of {decoded[1]}"
    return seconds


def make_rows(device: Device, default: str, greedy_batch: int, beams_batch: int) -> list[Row]:
    precisions = ["fp32", "fp16", "bf16"] if device.cuda else ["fp32", "bf16"]
    if default not in precisions:  # a CPU smoke run where int8 is the default: its model-only row too
        precisions.append(default)
    return [
        Row("a model card (1 image/call)", 4, "fp32", 1),
        Row("b plain batched generate", 4, "fp32", 8),
        *([Row("b16 plain batched generate, fp16", 4, "fp16", 64)] if device.cuda else []),
        Row("c captionfleet pipeline, GPU overlay settings", 4, default, GPU_OVERLAY_BATCH.images_at(4)),
        *[Row(f"model only {p}", 1, p, greedy_batch) for p in precisions],
        Row(f"model only {default}, 4 beams", 4, default, beams_batch),
        # The CPU path's grouped cross-attention (core/beams.py), not yet the GPU's: a quarter of the
        # cross-attention reads and KV memory at 4 beams; twice the batch in the memory it frees.
        *[
            Row(f"grouped: model only {default}, 4 beams, batch {batch}", 4, default, batch)
            for batch in (beams_batch, 2 * beams_batch)
        ],
        # Its control: the grouped rows attend with eager attention (self-attention too), the row above with
        # SDPA on CUDA; this one is eager without the grouping.
        Row(f"eager: model only {default}, 4 beams, batch {beams_batch}", 4, default, beams_batch),
        Row(f"end to end JPEGs, {default}", 1, default, greedy_batch),
        # Last: transformers compiles the static-cache decoder on CUDA, which may take minutes.
        Row(f"new: model only {default}, static KV cache", 1, default, greedy_batch),
        Row(f"new: model only {default}, static KV cache, 4 beams", 4, default, beams_batch),
        Row(f"new: end to end JPEGs, {default}, GPU decode + static KV cache", 1, default, greedy_batch),
        Row(f"new: end to end JPEGs, {default}, GPU decode + static KV cache, 4 beams", 4, default, beams_batch),
    ]


def run_row(row: Row, checkpoint: Path, device: Device, photos: list[Path], folder: Path, n: int) -> None:
    card_images = max(2, n // 16)
    if row.name.startswith(("a ", "b ", "b16 ")):
        images = card_images if row.name.startswith("a ") else n // 2
        row.images, seconds = images, plain_generate(checkpoint, device, photos, row, images)
    elif row.name.startswith("c "):
        captioner = load_captioner(checkpoint, row.precision, row.beams, device.torch.type)
        row.images, seconds = n, pipeline(captioner, device, folder, n, GPU_OVERLAY_BATCH)
    elif row.name.startswith("end to end"):
        captioner = load_captioner(checkpoint, row.precision, 1, device.torch.type)
        batch = BatchSettings(max_items=row.batch, max_wait_ms=1000, decode_threads=12, prefetch=2 * row.batch)
        row.images, seconds = n, pipeline(captioner, device, folder, n, batch)
    elif row.name.startswith("new: end to end"):
        captioner = load_captioner(checkpoint, row.precision, row.beams, device.torch.type)
        images = n if row.beams == 1 else n // 2
        row.images, seconds = images, new_end_to_end(captioner, device, photos[:images], row.batch, row)
    else:
        captioner = load_captioner(checkpoint, row.precision, row.beams, device.torch.type)
        if row.name.startswith("grouped: "):  # on CUDA too (fastpath does it on the CPU only)
            row.note = "grouped" if use_grouped_decoder_attention(captioner.model) else "not grouped: switch refused"
        elif row.name.startswith("eager: "):
            row.note = "eager" if fastpath.use_eager_decoder_attention(captioner.model) else "eager refused"
        images = n if row.beams == 1 else n // 2
        pixels = captioner.preprocess(open_rgb(photos[:images]))
        timing = new_model_only if row.name.startswith("new: ") else model_only
        row.images, seconds = images, timing(captioner, device, pixels, row.batch)
    row.seconds.append(seconds)
    row.peak_mb = max(row.peak_mb, device.peak_mb())


def report(rows: list[Row], rates: dict[str, dict[str, float]], flops: dict[int, float], device: Device) -> dict:
    best = {name: max(by_shape.values()) for name, by_shape in rates.items()}
    measured = [r for r in rows if r.seconds]
    card_row = rows[0]
    card = statistics.median(card_row.images / s for s in card_row.seconds) if card_row.seconds else float("nan")
    out_rows: list[dict[str, Any]] = []
    for row in rows:
        ips = statistics.median(row.images / s for s in row.seconds) if row.seconds else 0.0
        limit = best[row.precision] * 1e9 / flops[row.beams]
        out_rows.append(
            {
                "name": row.name,
                "decoding": f"{row.beams} beams, {TOKENS} tokens" if row.beams > 1 else f"greedy, {TOKENS} tokens",
                "precision": row.precision,
                "batch": row.batch,
                "images_per_s": round(ips, 2),
                "ms_per_image": round(1000 / ips, 2) if ips else None,
                "peak_gpu_mb": round(row.peak_mb),
                "vs_model_card": round(ips / card, 2),
                "limit_images_per_s": round(limit, 1),
                "fraction_of_limit": round(ips / limit, 3),
                "rounds_images_per_s": [round(row.images / s, 2) for s in row.seconds],
                "error": row.error,
                "note": row.note,
            }
        )
    by_name = {r["name"]: r for r in out_rows}
    e2e = next(r for r in out_rows if r["name"].startswith("end to end"))
    return {
        "device": device.name(),
        "torch": torch.__version__,
        "gflop_per_image": {f"{beams} beams": round(f / 1e9, 1) for beams, f in flops.items()},
        "matmul_gflops": rates,
        "rows": out_rows,
        "end_to_end_vs_model_only": round(
            e2e["images_per_s"] / (by_name[f"model only {e2e['precision']}"]["images_per_s"] or float("nan")), 2
        ),
        "rows_measured": len(measured),
        "targets": targets(out_rows),
    }


# The targets for the new path on one H200 (fp16, 16 new tokens), by the start of a row's name.
TARGETS = {
    "new: model only": {1: 4000.0, 4: 1000.0},
    "new: end to end JPEGs": {1: 2500.0, 4: 1000.0},
}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each new row against its target (met only on the device the targets are for: read the device)."""
    out = []
    for r in rows:
        for start, by_beams in TARGETS.items():
            beams = 4 if r["decoding"].startswith("4 beams") else 1
            if r["name"].startswith(start) and not r["error"]:
                target = by_beams[beams]
                out.append({"row": r["name"], "target_images_per_s": target, "met": r["images_per_s"] >= target})
    return out


def markdown_table(result: dict) -> str:
    lines = [
        "| row | decoding | precision | batch | images/s | ms/image | peak GPU MB | x model card | limit img/s "
        "| of limit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        figures = (
            f"{r['images_per_s']} | {r['ms_per_image']} | {r['peak_gpu_mb']} | {r['vs_model_card']}"
            if not r["error"]
            else f"failed: {r['error'][:80]} | | | "
        )
        name = f"{r['name']} ({r['note']})" if r.get("note") else r["name"]
        lines.append(
            f"| {name} | {r['decoding']} | {r['precision']} | {r['batch']} | {figures} | "
            f"{r['limit_images_per_s']} | {r['fraction_of_limit']} |"
        )
    return "\n".join(lines)


def jpegs(folder: Path, n: int, distinct: int = 32) -> list[Path]:
    """n files from `distinct` photo-like JPEGs: making one takes ~0.4 s of a CPU core, and a GPU row
    needs hundreds; copies decode at the same cost as originals."""
    originals = realistic_jpegs(folder, min(n, distinct))
    for i in range(len(originals), n):
        shutil.copyfile(originals[i % len(originals)], folder / f"photo_{i:04d}.jpg")
    return sorted(folder.glob("*.jpg"))[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer images, one round")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 1 quick, 2 full)")
    parser.add_argument("--images", type=int, default=0, help="images per greedy row (default 256 quick, 1024)")
    parser.add_argument("--batch", type=int, default=128, help="batch of the greedy rows")
    parser.add_argument("--beams-batch", type=int, default=32, help="batch of the 4-beam model-only and new rows")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the full architecture, made here")
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoint and JPEGs here")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    device = Device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temporary:
        work = args.work or Path(temporary)
        return run(args, device, work)


def run(args: argparse.Namespace, device: Device, work: Path) -> int:
    started = time.perf_counter()
    n = args.images or (256 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 2)
    folder = work / "jpegs"
    checkpoint, photos = prepare(args.checkpoint or work / "vit-gpt2-full", folder, n, jpegs)
    flops = flops_per_image_by_beams(checkpoint, photos[0], (1, 4))
    rates = matmul_rates(device, args.batch, args.quick)
    default = fastpath.resolve_precision("auto", device.torch)
    rows = make_rows(device, default, args.batch, args.beams_batch)
    print(f"{device.name()}: default precision {default}; setup {time.perf_counter() - started:.0f}s", flush=True)
    result = write_outputs(report(rows, rates, flops, device), args.out, args.quick, started)  # the limits
    for r in range(rounds):
        for row in rows:
            if row.error:
                continue
            try:
                run_row(row, checkpoint, device, photos, folder, n)
            except Exception as error:  # one row's failure (say, static cache unsupported) is reported
                row.error = f"{type(error).__name__}: {error}".splitlines()[0]
                traceback.print_exc()
            figure = f"{row.images / row.seconds[-1]:8.2f} img/s" if row.seconds and not row.error else row.error
            print(f"round {r + 1} {row.name:48s} {figure}  peak GPU {device.peak_mb():.0f} MB", flush=True)
            if device.cuda:
                torch.cuda.empty_cache()
            # After every row: a run stopped by its time limit still leaves what it measured.
            result = write_outputs(report(rows, rates, flops, device), args.out, args.quick, started)
    bar_chart(
        [(r["name"], r["images_per_s"], r["limit_images_per_s"]) for r in result["rows"]],
        title=f"images/s on {result['device']} (bar) vs the limit of its precision (tick)",
        path=args.out / f"benchmarks-gpu{'-quick' if args.quick else ''}.png",
    )
    print(markdown_table(result))
    print(f"total {result['seconds']}s; wrote benchmarks-gpu*.json, -table.md, .png under {args.out}")
    return 0


def write_outputs(result: dict[str, Any], out: Path, quick: bool, started: float) -> dict[str, Any]:
    result["seconds"] = round(time.perf_counter() - started, 1)
    suffix = "-quick" if quick else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"benchmarks-gpu{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"benchmarks-gpu{suffix}-table.md").write_text(markdown_table(result) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
