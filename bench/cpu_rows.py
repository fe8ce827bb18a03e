"""The rows of bench.compare and how each is measured: what users would run (the model card, plain
batched generate) and captionfleet (the pipeline, the model alone per precision and process layout),
every row in fresh process(es) so its peak RSS is its own."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import ViTImageProcessor

from bench.machine import peak_rss_mb, process_peak_rss_mb, reset_peak_rss
from bench.workload import NullSink, equal_work, gen_config, load_captioner, load_plain, open_rgb
from captionfleet.core.captioner import Captioner
from captionfleet.core.images import ImageLimits
from captionfleet.core.settings import BatchSettings, ModelSettings, WorkerSettings
from captionfleet.worker.connectors.local import iter_folder
from captionfleet.worker.pipeline import CaptionPipeline


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


def cpu_worker_batch() -> BatchSettings:
    """A CPU worker's batch settings as it derives them (size, pixel budget, prefetch, decode threads)."""
    return WorkerSettings(model=ModelSettings(device="cpu")).batch


def make_rows(default_precision: str, greedy_batch: int = 32, threads: int = 0) -> list[Row]:
    default_batch = cpu_worker_batch()
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
        *one_process,
        *per_core,
        Row(f"end to end JPEGs, {default_precision}", "greedy", default_precision, greedy_batch),
    ]


def measure_row(index: int, row: Row, sizes: tuple[int, int, int, int], work: Path, threads: int) -> dict[str, Any]:
    """Run one row in fresh process(es); a layout row starts its processes together and they begin
    captioning at a shared barrier, so the figure is their combined rate while all of them run.

    Processes come from a fork server that imported torch and transformers once (a new interpreter
    per row spent ~3.5 s importing them); each still loads its own model, so its peak RSS is its own.
    """
    context = multiprocessing.get_context("forkserver")
    # What the rows import (bench.compare, which imports this module, runs as __main__: not preloaded).
    context.set_forkserver_preload(
        ["torch", "transformers", "captionfleet.core.captioner", "captionfleet.worker.pipeline", "bench.chart"]
    )
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=work)) if row.processes > 1 else None
    receivers, children = [], []
    for _ in range(row.processes):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=run_row_child, args=(row, work, sizes, row.threads or threads, barrier, sender))
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
        images, seconds = n_card_c, run_pipeline(captioner, folder, n_card_c, cpu_worker_batch())
    elif row.name.startswith("end to end"):
        captioner = load_captioner(checkpoint, row.precision, 1)
        batch = BatchSettings(max_items=row.batch, max_wait_ms=1000)
        images, seconds = n_greedy, run_pipeline(captioner, folder, n_greedy, batch)
    elif row.precision == "fp32-plain":
        images, seconds = n_greedy, run_plain_batched(checkpoint, paths, n_greedy, row.batch, 1)
    else:
        captioner = load_captioner(checkpoint, row.precision, 1)
        pixels = captioner.preprocess(open_rgb(paths[:n_greedy]))
        start_together = (lambda: wait_at(barrier, row.processes)) if barrier else (lambda: None)
        images, seconds = n_greedy, run_captioner_model_only(captioner, pixels, n_greedy, row.batch, start_together)
    return {
        "images": images,
        "seconds": seconds,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across fork + exec.
        "peak_rss_mb": process_peak_rss_mb(),  # the whole process: imports, loading, captioning
        "run_peak_rss_mb": peak_rss_mb(),  # since the reset after warm-up: captioning only
    }


def run_model_card(path: Path, photos: list[Path], n: int) -> float:
    """What the model card shows: open, processor, generate, one image at a time."""
    model = load_plain(path)
    processor = ViTImageProcessor.from_pretrained(path, trust_remote_code=False)
    config = gen_config(4)
    with torch.inference_mode():
        first = processor(images=open_rgb(photos[:1]), return_tensors="pt").pixel_values
        model.generate(pixel_values=first, generation_config=config, logits_processor=equal_work())
        reset_peak_rss()
        start = time.perf_counter()
        for image in photos[:n]:
            one = processor(images=open_rgb([image]), return_tensors="pt").pixel_values
            model.generate(pixel_values=one, generation_config=config, logits_processor=equal_work())
        return time.perf_counter() - start


def run_plain_batched(path: Path, photos: list[Path], n: int, batch: int, beams: int) -> float:
    model = load_plain(path)
    processor = ViTImageProcessor.from_pretrained(path, trust_remote_code=False)
    config = gen_config(beams)
    with torch.inference_mode():
        first = processor(images=open_rgb(photos[:1]), return_tensors="pt").pixel_values
        model.generate(pixel_values=first, generation_config=config, logits_processor=equal_work())
        reset_peak_rss()
        start = time.perf_counter()
        for i in range(0, n, batch):
            pixels = processor(images=open_rgb(photos[i : i + batch]), return_tensors="pt").pixel_values
            model.generate(pixel_values=pixels, generation_config=config, logits_processor=equal_work())
        return time.perf_counter() - start


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
