"""Side by side, in one process run: what users would run vs captionfleet, against the machine's limit.

    python -m bench.compare [--quick] [--rounds N] [--out docs]      (make bench / make bench-quick)

Every row captions the same images with the same weights: the full ViT-base/16-224 + GPT-2 124M
architecture of nlpconnect/vit-gpt2-image-captioning built from configs with random weights (its
compute cost is the real one), saved as a real checkpoint by bench/full_checkpoint.py. Random
weights make captions meaningless and generation could stop at a random end-of-text, so every row
generates exactly ``max_new_tokens`` (min_new_tokens = max_new_tokens): equal work per image.

Rows (model card decoding: 4 beams, 16 tokens):
  a  model card: ViTImageProcessor + one image per generate call, fp32
  b  plain batched generate as a user would write it (ViTImageProcessor, batch 8, fp32)
  c  captionfleet: JPEG folder -> CaptionPipeline (decode overlap, batching) with its defaults
Rows (greedy, 16 tokens, batch 32; model only vs the limit of their precision):
  fp32-plain (torch default GEMM), fp32 (oneDNN), bf16, int8, int8-bf16; the process layout of the
  default precision (one process with a thread per core vs one single-thread process per core, run
  at once); and the default precision end to end from JPEGs.

The limit of a precision = the best matmul rate measured in this run for that precision divided by
the FLOPs per image (counted from the model's layer shapes). Peak RSS is per row: the kernel's
high-water mark is reset (/proc/self/clear_refs) after each row's model is loaded and freed.
Rounds interleave all rows (a, b, c, ... then again), and figures are medians over rounds, because
the machine may be shared. Writes <out>/benchmarks.json, <out>/benchmarks-table.md, <out>/benchmarks.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import GenerationConfig, GPT2Config, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chart import bar_chart
from bench.full_checkpoint import save_full_checkpoint
from captionfleet.core import fastpath
from captionfleet.core.captioner import Captioner, Preprocessing
from captionfleet.core.images import ImageLimits
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import BatchSettings, DecodingSettings
from captionfleet.worker.connectors.local import iter_folder
from captionfleet.worker.pipeline import CaptionPipeline

EOS = 50256
TOKENS = 16


# -- measurement helpers ------------------------------------------------------------------------


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(field_name: str) -> int:
    match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


_LOAD_PEAK_MB = 0.0  # the high-water mark before the last reset: imports, loading, warm-up


def reset_peak_rss() -> None:
    global _LOAD_PEAK_MB
    _LOAD_PEAK_MB = max(_LOAD_PEAK_MB, peak_rss_mb())
    gc.collect()
    # Resets VmHWM to the current RSS (Linux >= 4.0); elsewhere peaks are cumulative.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def gen_config(beams: int, eos: int = EOS) -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        num_beams=beams,
        max_new_tokens=TOKENS,
        min_new_tokens=TOKENS,
        early_stopping=False,
        do_sample=False,
    )


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


# -- FLOPs and the limit -------------------------------------------------------------------------


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
            model.generate(pixel_values=pixels[:1], generation_config=gen_config(beams, model.config.eos_token_id))
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
    ops = fastpath._onednn_ops()
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
        q = fastpath.quantize_int8(nn.Sequential(nn.Linear(k, n)))
        kernels["int8 dynamic"] = lambda: q(x)  # noqa: B023
        with torch.inference_mode():
            for name, fn in kernels.items():
                seconds = fastpath._median_seconds(fn, reps)
                out.setdefault(name, {})[f"{m}x{k}x{n}"] = round(flop / seconds / 1e9, 1)
    return out


# -- rows ----------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    group: str  # "card" (4 beams) or "greedy"
    precision: str
    batch: int
    processes: int = 1  # >1: that many processes at once, each with `threads` threads (the layout rows)
    threads: int = 0  # torch threads in the row's process(es); 0: the bench's --threads
    images: int = 0
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    run_peak_rss_mb: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.images / s for s in self.seconds)

    @property
    def peak_mb(self) -> float:
        return max(self.peak_rss_mb)


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


def flops_per_image_by_beams(checkpoint: Path, photo: Path, beams: tuple[int, ...]) -> dict[int, float]:
    plain = load_plain(checkpoint)
    pixels = Preprocessing.from_checkpoint(checkpoint)(_open([photo]))  # the captioner's own preprocessing
    return {b: flops_per_image(plain, pixels, b) for b in beams}


def load_plain(path: Path) -> VisionEncoderDecoderModel:
    model = VisionEncoderDecoderModel.from_pretrained(path, use_safetensors=True)
    return model.eval()


def _open(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def run_model_card(path: Path, photos: list[Path], n: int) -> float:
    """What the model card shows: open, processor, generate, one image at a time."""
    model = load_plain(path)
    processor = ViTImageProcessor.from_pretrained(path)
    config = gen_config(4)
    with torch.inference_mode():
        first = processor(images=_open(photos[:1]), return_tensors="pt").pixel_values
        model.generate(pixel_values=first, generation_config=config)
        reset_peak_rss()
        start = time.perf_counter()
        for image in photos[:n]:
            one = processor(images=_open([image]), return_tensors="pt").pixel_values
            model.generate(pixel_values=one, generation_config=config)
        return time.perf_counter() - start


def run_plain_batched(path: Path, photos: list[Path], n: int, batch: int, beams: int) -> float:
    model = load_plain(path)
    processor = ViTImageProcessor.from_pretrained(path)
    config = gen_config(beams)
    with torch.inference_mode():
        first = processor(images=_open(photos[:1]), return_tensors="pt").pixel_values
        model.generate(pixel_values=first, generation_config=config)
        reset_peak_rss()
        start = time.perf_counter()
        for i in range(0, n, batch):
            pixels = processor(images=_open(photos[i : i + batch]), return_tensors="pt").pixel_values
            model.generate(pixel_values=pixels, generation_config=config)
        return time.perf_counter() - start


def load_captioner(path: Path, precision: str, beams: int, device: str = "cpu") -> Captioner:
    captioner = load_checkpoint(path, device=device, decoding=decoding(beams), precision=precision)
    # Same work per image in every row (see the module docstring).
    base = captioner.generation_config

    def forced(decoding: DecodingSettings) -> GenerationConfig:  # the signature of the method it replaces
        config = base(decoding)
        config.min_new_tokens = decoding.max_new_tokens
        return config

    captioner.generation_config = forced  # type: ignore[method-assign]
    return captioner


def run_captioner_model_only(
    captioner: Captioner, pixels: torch.Tensor, n: int, batch: int, before_start: Callable[[], None] = lambda: None
) -> float:
    captioner.caption_pixels(pixels[:2])  # warm-up: lazy initialisation, oneDNN primitive caches
    reset_peak_rss()
    before_start()
    start = time.perf_counter()
    for i in range(0, n, batch):
        captioner.caption_pixels(pixels[i : i + batch])
    return time.perf_counter() - start


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


def run_pipeline(captioner: Captioner, folder: Path, n: int, batch: BatchSettings) -> float:
    items = list(iter_folder(folder))[:n]
    warm = NullSink()
    CaptionPipeline(captioner, warm, batch, ImageLimits(max_bytes=50 << 20, max_pixels=50_000_000)).run(items[:2])
    reset_peak_rss()
    sink = NullSink()
    start = time.perf_counter()
    CaptionPipeline(captioner, sink, batch, ImageLimits(max_bytes=50 << 20, max_pixels=50_000_000)).run(items)
    seconds = time.perf_counter() - start
    if sink.rows != len(items) or sink.failed:
        raise RuntimeError(f"pipeline wrote {sink.rows} rows ({sink.failed} failed) for {len(items)} images")
    return seconds


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and one round (under 2 minutes)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 1 quick, 3 full)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for benchmarks.json/.md/.png")
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoint and JPEGs here")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (default: torch's, one per core)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        # On a shared machine, 2 OpenMP threads on 2 cores stall at every op's barrier whenever another
        # job holds a core (ms per op); one thread per process does not.
        torch.set_num_threads(args.threads)
    if args.work is not None:
        return run(args, args.work)
    # Without --work the 1 GB checkpoint and the JPEGs are made afresh and removed afterwards.
    with tempfile.TemporaryDirectory(prefix="captionfleet-bench-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> int:
    quick: bool = args.quick
    rounds = args.rounds or (1 if quick else 3)
    # --quick: fewer images, and batch 16 for the greedy rows, to finish in under two minutes.
    n_card, n_batched, n_card_c, n_greedy = (2, 8, 16, 16) if quick else (6, 16, 32, 64)
    greedy_batch = 16 if quick else 32
    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)

    checkpoint, paths = prepare(work / "vit-gpt2-full", work / "jpegs", n_greedy, realistic_jpegs)
    default_precision = fastpath.resolve_precision("auto", torch.device("cpu"))
    rows = make_rows(default_precision, greedy_batch, args.threads)
    print(f"setup {time.perf_counter() - started:.0f}s; default precision here: {default_precision}", flush=True)

    flops = flops_per_image_by_beams(checkpoint, paths[0], (1, 4))
    flops_greedy, flops_beams = flops[1], flops[4]
    # The limit of a row is measured with the threads the row uses in all: --threads, or every core.
    cores = os.cpu_count() or 1
    rates = {torch.get_num_threads(): matmul_rates(quick)}
    if cores not in rates:
        threads_now = torch.get_num_threads()
        torch.set_num_threads(cores)
        rates[cores] = matmul_rates(quick)
        torch.set_num_threads(threads_now)
    print(f"FLOPs/image: greedy {flops_greedy / 1e9:.1f} G, 4 beams {flops_beams / 1e9:.1f} G", flush=True)

    # Each row in a fresh process: its peak RSS is its own (freed memory is rarely returned to the OS,
    # so rows sharing a process would inherit each other's peaks), and rounds interleave the rows.
    for r in range(rounds):
        for i, row in enumerate(rows):
            result = measure_row(i, row, (n_card, n_batched, n_card_c, n_greedy), work, args.threads)
            row.images = result["images"]
            row.seconds.append(result["seconds"])
            row.peak_rss_mb.append(result["peak_rss_mb"])
            row.run_peak_rss_mb.append(result["run_peak_rss_mb"])
            speed = row.images / result["seconds"]
            print(
                f"round {r + 1} {row.name:40s} {speed:7.2f} img/s  peak {result['peak_rss_mb']:6.0f} MB "
                f"(while captioning {result['run_peak_rss_mb']:.0f})",
                flush=True,
            )

    report = build_report(rows, rates, flops_greedy, flops_beams, default_precision, rounds, quick, load_at_start)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(report, args.out)
    print(markdown_table(report))
    print(f"total {report['seconds']}s; wrote benchmarks*.json, *-table.md, *.png under {args.out}")
    return 0


def measure_row(index: int, row: Row, sizes: tuple[int, int, int, int], work: Path, threads: int) -> dict[str, Any]:
    """Run one row in fresh process(es); a layout row starts its processes together and they begin
    captioning at a shared barrier, so the figure is their combined rate while all of them run.

    Processes come from a fork server that imported torch and transformers once (a new interpreter
    per row spent ~3.5 s importing them); each still loads its own model, so its peak RSS is its own.
    """
    import bench.compare as this  # the importable module, not __main__: the fork server pickles by name

    context = multiprocessing.get_context("forkserver")
    # What bench.compare imports (preloading bench.compare itself would clash with it running as __main__).
    context.set_forkserver_preload(
        ["torch", "transformers", "captionfleet.core.captioner", "captionfleet.worker.pipeline", "bench.chart"]
    )
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=work)) if row.processes > 1 else None
    receivers, children = [], []
    for _ in range(row.processes):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=this.run_row_child, args=(row, work, sizes, row.threads or threads, barrier, sender)
        )
        child.start()
        sender.close()
        receivers.append(receiver)
        children.append(child)
    results = []
    for receiver, child in zip(receivers, children, strict=True):
        try:
            status, payload = receiver.recv()
        except EOFError:
            status, payload = "error", "the row's process died without a result"
        child.join()
        if status != "ok":
            raise RuntimeError(f"row {row.name!r} failed:\n{payload}")
        results.append(payload)
    return {  # processes run at once: images add up, the slowest sets the time, memory adds up
        "images": sum(r["images"] for r in results),
        "seconds": max(r["seconds"] for r in results),
        "peak_rss_mb": sum(r["peak_rss_mb"] for r in results),
        "run_peak_rss_mb": sum(r["run_peak_rss_mb"] for r in results),
    }


def run_row_child(
    row: Row, work: Path, sizes: tuple[int, int, int, int], threads: int, barrier: Path | None, sender: Any
) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        paths = sorted((work / "jpegs").glob("*.jpg"))
        sender.send(("ok", run_row(row, work / "vit-gpt2-full", paths, work / "jpegs", sizes, barrier)))
    except BaseException:
        sender.send(("error", traceback.format_exc()))
        raise


def wait_at(barrier: Path, parties: int) -> None:
    """Every process of a layout row starts timing only when all have loaded and warmed up."""
    (barrier / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 600
    while len(list(barrier.glob("ready-*"))) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the other processes of the layout row never reached {barrier}")
        time.sleep(0.005)


def make_rows(default_precision: str, greedy_batch: int = 32, threads: int = 0) -> list[Row]:
    default_batch = BatchSettings()
    cores = os.cpu_count() or 1
    # Process layouts of the default precision and of the lossless fp32 path: one single-thread process
    # per core, next to one process with a thread per core. That one is the model-only row unless
    # --threads says otherwise, in which case it gets a row of its own.
    layout_precisions = list(dict.fromkeys((default_precision, "fp32")))
    one_process = [
        Row(f"model only {precision}, 1 process x {cores} threads", "greedy", precision, greedy_batch, threads=cores)
        for precision in layout_precisions
        if threads not in (0, cores)
    ]
    per_core = [
        Row(f"model only {precision}, {cores} processes x 1 thread", "greedy", precision, greedy_batch, cores, 1)
        for precision in layout_precisions
    ]
    return [
        Row("a model card (1 image/call)", "card", "fp32", 1),
        Row("b plain batched generate", "card", "fp32", 8),
        Row("c captionfleet pipeline, defaults", "card", default_precision, default_batch.max_items),
        Row("plain generate fp32, torch GEMM", "greedy", "fp32-plain", greedy_batch),
        Row("model only fp32 (oneDNN)", "greedy", "fp32", greedy_batch),
        Row("model only bf16", "greedy", "bf16", greedy_batch),
        Row("model only int8", "greedy", "int8", greedy_batch),
        Row("model only int8-bf16", "greedy", "int8-bf16", greedy_batch),
        *one_process,
        *per_core,
        Row(f"end to end JPEGs, {default_precision}", "greedy", default_precision, greedy_batch),
    ]


def run_row(
    row: Row, checkpoint: Path, paths: list[Path], folder: Path, sizes: tuple[int, int, int, int], barrier: Path | None
) -> dict:
    n_card, n_batched, n_card_c, n_greedy = sizes
    if row.name.startswith("a "):
        images, seconds = n_card, run_model_card(checkpoint, paths, n_card)
    elif row.name.startswith("b "):
        images, seconds = n_batched, run_plain_batched(checkpoint, paths, n_batched, 8, 4)
    elif row.name.startswith("c "):
        captioner = load_captioner(checkpoint, row.precision, 4)
        images, seconds = n_card_c, run_pipeline(captioner, folder, n_card_c, BatchSettings())
    elif row.name.startswith("end to end"):
        captioner = load_captioner(checkpoint, row.precision, 1)
        batch = BatchSettings(max_items=row.batch, max_wait_ms=1000)
        images, seconds = n_greedy, run_pipeline(captioner, folder, n_greedy, batch)
    elif row.precision == "fp32-plain":
        images, seconds = n_greedy, run_plain_batched(checkpoint, paths, n_greedy, row.batch, 1)
    else:
        captioner = load_captioner(checkpoint, row.precision, 1)
        pixels = captioner.preprocess(_open(paths[:n_greedy]))
        start_together = (lambda: wait_at(barrier, row.processes)) if barrier else (lambda: None)
        images, seconds = n_greedy, run_captioner_model_only(captioner, pixels, n_greedy, row.batch, start_together)
    return {
        "images": images,
        "seconds": seconds,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork + exec.
        "peak_rss_mb": max(_LOAD_PEAK_MB, peak_rss_mb()),  # the whole process: imports, loading, captioning
        "run_peak_rss_mb": peak_rss_mb(),  # since the reset after warm-up: captioning only
    }


def limit_key(precision: str) -> str:
    return {"fp32-plain": "fp32", "int8-bf16": "int8"}.get(precision, precision)


def build_report(
    rows: list[Row],
    rates_by_threads: dict[int, dict[str, dict[str, float]]],
    flops_greedy: float,
    flops_beams: float,
    default_precision: str,
    rounds: int,
    quick: bool,
    load_at_start: float,
) -> dict[str, Any]:
    best_by_threads = {
        threads: {
            "fp32": max(max(v.values()) for k, v in rates.items() if k.startswith("fp32")),
            "bf16": max(rates["bf16"].values()),
            "int8": max(rates["int8 dynamic"].values()),
        }
        for threads, rates in rates_by_threads.items()
    }
    bench_threads = next(iter(rates_by_threads))  # the first measured: the threads of the plain rows
    card = rows[0].images_per_s
    out_rows = []
    for row in rows:
        flops = flops_beams if row.group == "card" else flops_greedy
        row_threads = row.processes * (row.threads or bench_threads)
        best = best_by_threads.get(row_threads, best_by_threads[bench_threads])
        limit = best[limit_key(row.precision)] * 1e9 / flops
        ips = row.images_per_s
        out_rows.append(
            {
                **{k: v for k, v in asdict(row).items() if k not in ("seconds", "peak_rss_mb", "run_peak_rss_mb")},
                "decoding": "4 beams, 16 tokens" if row.group == "card" else "greedy, 16 tokens",
                "images_per_s": round(ips, 2),
                "ms_per_image": round(1000 / ips, 1),
                "peak_rss_mb": round(row.peak_mb),
                "peak_rss_mb_while_captioning": round(max(row.run_peak_rss_mb)),
                "vs_model_card": round(ips / card, 2),
                "threads_in_all": row_threads,
                "limit_images_per_s": round(limit, 2),
                "fraction_of_limit": round(ips / limit, 2),
                "rounds_images_per_s": [round(row.images / s, 2) for s in row.seconds],
            }
        )
    e2e = out_rows[-1]
    model_only = _model_only(out_rows, e2e["precision"])
    cores = os.cpu_count() or 1
    layouts = {}
    for per_core in (r for r in out_rows if r["name"].endswith(f"{cores} processes x 1 thread")):
        one_process = next(
            (r for r in out_rows if r["name"] == f"model only {per_core['precision']}, 1 process x {cores} threads"),
            None,
        ) or _model_only(out_rows, per_core["precision"])  # without --threads, that row is one thread per core
        layouts[per_core["precision"]] = round(per_core["images_per_s"] / one_process["images_per_s"], 2)
    return {
        "machine": {
            "cpu": _cpu_identity(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            # Other jobs on the machine slow rows down unevenly: what the run started with, for the reader.
            "load_average_1min_at_start": load_at_start,
        },
        "model": "ViT-base/16-224 + GPT-2 124M (nlpconnect/vit-gpt2-image-captioning architecture), random weights",
        "quick": quick,
        "rounds": rounds,
        "default_precision": default_precision,
        "gflop_per_image": {"greedy": round(flops_greedy / 1e9, 1), "4 beams": round(flops_beams / 1e9, 1)},
        "matmul_gflops": {f"{t} threads": rates for t, rates in rates_by_threads.items()},
        "best_gflops": {f"{t} threads": best for t, best in best_by_threads.items()},
        "rows": out_rows,
        "end_to_end_vs_model_only": round(e2e["images_per_s"] / model_only["images_per_s"], 2),
        "processes_per_core_vs_one_process": layouts,
    }


def _model_only(rows: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    """The one-process model-only row of a precision ("model only fp32 (oneDNN)", "model only bf16")."""
    return next(r for r in rows if f"{r['name']} ".startswith(f"model only {precision} "))


def _cpu_identity() -> dict[str, Any]:
    """Name, family/model and the microarchitecture where we know it: "AMD EPYC" alone hides whether
    AVX-512 runs on full-width units (Zen 5) or on 256-bit halves (Zen 4), which halves every limit."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"name": platform.processor()}
    family, model = int(fields.get("cpu family", "-1")), int(fields.get("model", "-1"))
    flags = set(fields.get("flags", "").split())
    return {
        "name": fields.get("model name", platform.processor()),
        "family": family,
        "model": model,
        "microarchitecture": _amd_microarchitecture(fields.get("vendor_id", ""), family, model),
        "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}),
    }


def _amd_microarchitecture(vendor: str, family: int, model: int) -> str:
    """AMD's family/model numbers (AMD's processor programming references); "unknown" elsewhere."""
    if vendor != "AuthenticAMD":
        return "unknown"
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "Zen 3"
    if family == 0x17:
        return "Zen / Zen 2"
    return "unknown"


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| row | decoding | precision | batch | threads | images/s | ms/image | peak RSS MB (process / captioning) "
        "| x model card | limit img/s | of limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['decoding']} | {r['precision']} | {r['batch']} | {r['threads_in_all']} | "
            f"{r['images_per_s']} | "
            f"{r['ms_per_image']} | {r['peak_rss_mb']} / {r['peak_rss_mb_while_captioning']} | "
            f"{r['vs_model_card']} | {r['limit_images_per_s']} | {r['fraction_of_limit']} |"
        )
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if report["quick"] else ""
    (out / f"benchmarks{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    bar_chart(
        [(r["name"], r["images_per_s"], r["limit_images_per_s"]) for r in report["rows"]],
        title="images/s (bar) vs the limit of its precision (tick); same weights, one run",
        path=out / f"benchmarks{suffix}.png",
    )
    (out / f"benchmarks{suffix}-table.md").write_text(markdown_table(report) + "\n")


if __name__ == "__main__":
    sys.exit(main())
