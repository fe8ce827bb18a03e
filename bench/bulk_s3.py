"""Images/s of the S3 bulk job end to end (S3 in, S3 out) against the model alone, in the same run.

    python -m bench.bulk_s3 --quick                 # tiny model, 96 photos: ~1-2 minutes on a small CPU
    python -m bench.bulk_s3 --model full --images 256 --batch-size 32 --decode-threads 8   # on a GPU box

It starts its own SeaweedFS (tests/services/seaweedfs.py), uploads realistic JPEGs (1600x1200,
photo-like content, a few hundred KB each) and, for each model, measures:

- model only: ``caption_inputs`` (the jobs' model call, confidence included) on batches decoded and prepared
  beforehand (the ceiling);
- data path only: the whole job with a model that answers instantly (list, fetch, decode, write);
- end to end: the whole job with the real model (``run_s3_caption_job``, from the call to its return).

The ratio end-to-end / model-only is what the data path costs: 1.0 means the model never waits on I/O.
The three are interleaved over several rounds and reported as best and median: on a shared machine a
neighbour's burst would otherwise decide the ratio. Each also reports this process's CPU milliseconds
per image (all threads; the S3 server is another process): unlike wall-clock rates it does not move
with the neighbours' load, and on a CPU-only box it is what the data path takes from the model.
Models: ``tiny`` (the test checkpoint: shows the data path's own ceiling, since the model is nearly
free) and ``full`` (ViT-base/16 + GPT-2 124M with random weights: the production compute cost).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import load_ved
from captionfleet.core.captioner import Captioner, CaptionModel, ModelInput, ModelWrapper
from captionfleet.core.generation import Caption
from captionfleet.core.images import decode_image
from captionfleet.core.settings import BatchSettings, BulkS3Settings, DecodingSettings, S3Settings, WorkerSettings
from captionfleet.worker.bulk_s3 import run_s3_caption_job
from tests.services.seaweedfs import SeaweedS3

BUCKET = "bench"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- data ------------------------------------------------------------------------------------------------


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth gradients, soft shapes and sensor-like noise, so it compresses (and
    decodes) like a camera picture rather than like flat colour or pure noise."""
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), dtype=np.float32)
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 3)), int(rng.integers(height // 20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(3))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 7, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same picture with a JPEG comment segment: distinct bytes and ETag, same decoding cost."""
    body = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def make_archive(count: int, size: tuple[int, int], seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    bases = [photo(rng, *size) for _ in range(min(count, 8))]
    return {f"photos/{i % 10}/{i:05d}.jpg": with_comment(bases[i % len(bases)], f"photo {i}") for i in range(count)}


# -- models ----------------------------------------------------------------------------------------------


def build_checkpoint(kind: str, where: Path) -> Path:
    if kind == "tiny":
        from tests.conftest import save_tiny_checkpoint

        return save_tiny_checkpoint(where)
    from bench.full_checkpoint import save_full_checkpoint

    return save_full_checkpoint(where)


class InstantCaptioner(ModelWrapper):
    """The real captioner's version and preprocessing, with a model that answers at once."""

    def __init__(self, real: Captioner) -> None:
        self._real = real

    @property
    def wrapped(self) -> Captioner:
        return self._real

    def caption_inputs(self, inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        return [Caption("instant", 0.0, 1)] * len(inputs)  # not empty: an empty caption is a failure row


def model_only(captioner: Captioner, archive: dict[str, bytes], batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the model on batches decoded and prepared beforehand: the same model
    call the jobs make (``caption_inputs``, which also records each caption's confidence), nothing else."""
    inputs = [captioner.prepare(decode_image(data, draft_size=captioner.draft_size)) for data in archive.values()]
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    captioner.caption_inputs(batches[0])  # warm-up: first-call allocations and kernel selection
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        captioner.caption_inputs(batch)
    sync()
    return len(inputs) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(inputs)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def job(captioner: CaptionModel, settings: WorkerSettings, out: str, expected: int) -> tuple[float, float]:
    """(images/s from call to return, CPU ms per image) for one whole S3 job."""
    start, cpu = time.perf_counter(), time.process_time()
    summary = run_s3_caption_job(f"s3://{BUCKET}/photos/", out, settings, show_progress=False, captioner=captioner)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if summary.done != expected or not summary.complete:
        raise SystemExit(f"bench run incomplete: {summary.lines()}")
    return expected / wall, 1000 * cpu / expected


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 96 photos (about 1-2 minutes on a CPU)")
    parser.add_argument("--model", choices=["tiny", "full", "both"], default="tiny")
    parser.add_argument("--images", type=int, help="photos to caption (default 96 quick, 256 otherwise)")
    parser.add_argument("--size", default="1600x1200", help="photo size WxH (default 1600x1200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4, help="as the reference model card (4)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--decode-threads", type=int, default=BatchSettings().decode_threads)
    parser.add_argument("--fetch-concurrency", type=int, default=BulkS3Settings().fetch_concurrency)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    count = args.images or (96 if args.quick else 256)
    width, height = (int(v) for v in args.size.lower().split("x"))
    models = ["tiny", "full"] if args.model == "both" else [args.model]
    logging.basicConfig(level=logging.WARNING)

    emit(
        bench="bulk_s3",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        images=count,
        size=f"{width}x{height}",
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        decode_threads=args.decode_threads,
        fetch_concurrency=args.fetch_concurrency,
    )
    started = time.perf_counter()
    archive = make_archive(count, (width, height))
    sizes = [len(data) for data in archive.values()]
    emit(stage="photos", seconds=round(time.perf_counter() - started, 1), mean_kb=round(np.mean(sizes) / 1024))

    with SeaweedS3() as server, tempfile.TemporaryDirectory() as tmp:
        settings = upload_archive(server, archive, args)
        decoding = DecodingSettings(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        for kind in models:
            path = build_checkpoint(kind, Path(tmp) / kind)
            captioner = load_ved(path, device=args.device, precision="auto", decoding=decoding)
            measure_model(kind, captioner, archive, settings, count, args)
            del captioner
    emit(stage="done", seconds=round(time.perf_counter() - started, 1))
    return 0


def upload_archive(server: SeaweedS3, archive: dict[str, bytes], args: argparse.Namespace) -> WorkerSettings:
    """Puts the photos in the bucket; the worker settings that read them with the bench's batch flags."""
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), archive.items()))
    return WorkerSettings(
        s3=S3Settings(
            endpoint_url=server.endpoint_url,
            access_key_id=SecretStr(server.access_key),
            secret_access_key=SecretStr(server.secret_key),
        ),
        batch=BatchSettings(
            max_items=args.batch_size, prefetch=max(32, 4 * args.batch_size), decode_threads=args.decode_threads
        ),
        bulk=BulkS3Settings(fetch_concurrency=args.fetch_concurrency),
    )


def measure_model(
    kind: str,
    captioner: Captioner,
    archive: dict[str, bytes],
    settings: WorkerSettings,
    count: int,
    args: argparse.Namespace,
) -> None:
    """Interleaved rounds of model only, data path only and end to end for one model; emits each round and
    the summary."""
    rates: dict[str, list[float]] = {"model_only": [], "data_path_only": [], "end_to_end": []}
    cpu_ms: dict[str, list[float]] = {name: [] for name in rates}
    # Warm-up, untimed: the first pass over a batch shape or caption length is many times slower
    # (kernel selection, allocations); both paths see every shape once before anything is timed.
    model_only(captioner, archive, args.batch_size)
    job(captioner, settings, f"s3://{BUCKET}/out/{kind}-warmup/", count)
    for r in range(args.rounds):
        measured = {
            "model_only": model_only(captioner, archive, args.batch_size),
            "data_path_only": job(InstantCaptioner(captioner), settings, f"s3://{BUCKET}/out/{kind}-data-{r}/", count),
            "end_to_end": job(captioner, settings, f"s3://{BUCKET}/out/{kind}-e2e-{r}/", count),
        }
        for name, (rate, ms) in measured.items():
            rates[name].append(rate)
            cpu_ms[name].append(ms)
        emit(
            model=kind,
            round=r,
            images_per_s={name: round(v[-1], 2) for name, v in rates.items()},
            cpu_ms_per_image={name: round(v[-1], 1) for name, v in cpu_ms.items()},
        )
    best = {name: max(values) for name, values in rates.items()}
    median = {name: float(np.median(values)) for name, values in rates.items()}
    cpu = {name: float(np.median(values)) for name, values in cpu_ms.items()}
    emit(
        model=kind,
        device=str(captioner.device),
        images_per_s_best={name: round(v, 2) for name, v in best.items()},
        images_per_s_median={name: round(v, 2) for name, v in median.items()},
        cpu_ms_per_image_median={name: round(v, 1) for name, v in cpu.items()},
        ratio_end_to_end_to_model_only_best=round(best["end_to_end"] / best["model_only"], 3),
        ratio_end_to_end_to_model_only_median=round(median["end_to_end"] / median["model_only"], 3),
        # On a CPU-only machine: the throughput ratio if the model had every core to itself.
        ratio_by_cpu_time=round(cpu["model_only"] / cpu["end_to_end"], 3),
    )


if __name__ == "__main__":
    sys.exit(main())
