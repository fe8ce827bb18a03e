"""One row of bench.families: one family's checkpoint at one precision, captioning the same JPEGs the way a
worker does, in a fresh process (its peak memory is its own).

The path is the worker's: ``core.loading.load_checkpoint`` (the family's captioner and its precision
handling), then per image the pipeline's decode step (``decode_image`` at the captioner's draft size) and
``prepare`` (what the decode threads run), then ``caption_inputs`` on batches of the worker's batch size
(what the model thread runs). Both steps are timed apart: in the pipeline the decode threads overlap the
model thread, so the model thread's time is what bounds images/s (bench.compare measured the whole
pipeline at 0.95 of it for ViT-GPT2); the prepare time says what the decode threads need to keep up.

Decoding is greedy with exactly ``tokens`` new tokens per image (min_new_tokens = max_new_tokens): random
weights would end captions at a random end token, and rows would do unequal work. The generated token ids
are recorded (the captioner's own generate call, wrapped) so the report can compare precisions token by token.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from bench.machine import peak_rss_mb, process_peak_rss_mb, reset_peak_rss
from captionfleet.core.captioner import CaptionModel, ModelInput
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.settings import DecodingSettings


@dataclass(frozen=True)
class RowJob:
    checkpoint: Path
    jpegs: tuple[Path, ...]
    precision: str
    device: str  # "cpu" or "cuda"
    tokens: int  # new tokens per image, exactly
    batch: int
    threads: int  # torch's intra-op threads in the row's process (0: as torch starts)


def force_new_tokens(captioner: Any) -> None:
    """Every caption gets exactly max_new_tokens tokens: the end token is held back until then."""
    base: Callable[[DecodingSettings], GenerationConfig] = captioner.generation_config

    def forced(decoding: DecodingSettings) -> GenerationConfig:  # the signature of the method it replaces
        config = base(decoding)
        config.min_new_tokens = decoding.max_new_tokens
        return config

    captioner.generation_config = forced


def record_tokens(captioner: Any, tokens: int) -> list[list[int]]:
    """The last ``tokens`` ids of every sequence the captioner's model generates from now on (all of a
    row's new tokens: every caption has exactly that many)."""
    recorded: list[list[int]] = []
    generate = captioner.model.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        output = generate(*args, **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        recorded.extend(sequences[:, -tokens:].tolist())
        return output

    captioner.model.generate = recording
    return recorded


def prepare_all(captioner: CaptionModel, jpegs: tuple[Path, ...]) -> tuple[list[ModelInput], float]:
    """The pipeline's decode step for every JPEG (bytes read before timing, as a fetcher would hand them over)."""
    blobs = [path.read_bytes() for path in jpegs]
    limits = ImageLimits(max_bytes=50 << 20, max_pixels=50_000_000)
    start = time.perf_counter()
    inputs = [captioner.prepare(decode_image(data, limits=limits, draft_size=captioner.draft_size)) for data in blobs]
    return inputs, time.perf_counter() - start


def run_row(job: RowJob) -> dict[str, Any]:
    if job.threads:
        torch.set_num_threads(job.threads)
    cuda = job.device == "cuda"
    decoding = DecodingSettings(num_beams=1, max_new_tokens=job.tokens)
    started = time.perf_counter()
    captioner = load_checkpoint(job.checkpoint, device=job.device, precision=job.precision, decoding=decoding)
    load_seconds = time.perf_counter() - started
    force_new_tokens(captioner)
    inputs, prepare_seconds = prepare_all(captioner, job.jpegs)
    started = time.perf_counter()
    captioner.caption_inputs(inputs[:1])  # warm-up: lazy initialisation, kernel and allocator caches
    warm_seconds = time.perf_counter() - started
    recorded = record_tokens(captioner, job.tokens)
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    captions = []
    cpu_start, start = time.process_time(), time.perf_counter()
    for i in range(0, len(inputs), job.batch):
        # caption_inputs returns after the ids are on the CPU: on CUDA the GPU's work is inside the time.
        captions += captioner.caption_inputs(inputs[i : i + job.batch])
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model = getattr(captioner, "model", None)
    features = inputs[0].features
    return {
        "images": len(inputs),
        "seconds": seconds,
        # The CPU time of all the process's threads: on a shared machine, what the work costs when the
        # wall clock also counts the time other jobs held the cores.
        "cpu_seconds": cpu_seconds,
        "prepare_seconds": prepare_seconds,
        "load_seconds": load_seconds,
        "warm_seconds": warm_seconds,
        "precision": str(getattr(captioner, "precision", job.precision)),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0,
        # What one image costs the model: the pixels its vision encoder sees, the length of its prompt.
        "encoder_pixels_per_image": inputs[0].cost,
        "prompt_tokens": int(features["input_ids"].shape[-1]) if "input_ids" in features else 0,
        "tokens": recorded,
        "captions": [caption.text for caption in captions],
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
        "peak_rss_mb": process_peak_rss_mb(),
        "run_peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def _child(job: RowJob, sender: Any) -> None:
    try:
        sender.send(("ok", run_row(job)))
    except BaseException:
        sender.send(("error", traceback.format_exc()))
        raise


def measure(job: RowJob) -> dict[str, Any]:
    """``run_row`` in a fresh process from a fork server that imported torch and transformers once; a
    failure comes back as RuntimeError with the child's traceback."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "captionfleet.core.loading"])
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(job, sender))
    child.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        child.join()
        status, payload = "error", f"the row's process died without a result (exit status {child.exitcode})"
    child.join()
    if status != "ok":
        raise RuntimeError(payload)
    return dict(payload)
