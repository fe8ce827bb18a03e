"""How fast one CPU core turns photo JPEGs into model inputs, and so how many cores a GPU worker needs.

    python -m bench.decode_rate [--out docs/benchmarks-decode.json]     (make bench-decode)

On one thread, for 1600x1200 photo-like JPEGs (bench.workload.realistic_jpegs) held in memory, rows:

  draft on     PIL decode at the smallest JPEG scale >= 224 px (``Image.draft``) + resize to 224x224
  draft off    PIL full-size decode + resize to 224x224
  worker path  what a decode thread does for ViT-GPT2: ``decode_image`` (sniffing, pixel limit, draft
               mode, orientation, RGB) + the Captioner's preprocessing (resize, rescale, normalise, CHW)

Each row's rate is counted two ways: images per second of wall time, and per second of this thread's
CPU time (``time.thread_time``). The second is the work itself, which other jobs on a shared machine
do not change, so the cores a GPU worker needs to feed the GPU at a target rate are counted from it:
``ceil(target / worker path rate per CPU second)`` decode cores, plus one for the process's own loop
(captionfleet/core/threads.py sizes the decode threads the same way). Rounds interleave the rows;
medians over rounds. Records the CPU (bench.machine) and the load average at start and end.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_identity
from bench.workload import realistic_jpegs
from captionfleet.core.captioner import Preprocessing
from captionfleet.core.images import decode_image

SIDE = 224
# nlpconnect/vit-gpt2-image-captioning's preprocessor_config.json: 224x224, bilinear, 1/255, mean = std = 0.5.
REFERENCE = Preprocessing(
    width=SIDE,
    height=SIDE,
    resample=Image.Resampling.BILINEAR,
    rescale_factor=1 / 255,
    mean=np.full(3, 0.5, dtype=np.float32),
    std=np.full(3, 0.5, dtype=np.float32),
)
# The GPU targets (one H200, fp16, 16 new tokens): greedy end to end from JPEGs, and from decoded tensors.
TARGETS = (2500, 4000)


def draft_on(data: bytes) -> object:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        image.draft("RGB", (SIDE, SIDE))
        return image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)


def draft_off(data: bytes) -> object:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)


def worker_path(data: bytes) -> object:
    return REFERENCE.array(decode_image(data, draft_size=(SIDE, SIDE)))


ROWS: dict[str, Callable[[bytes], object]] = {
    "draft on: decode + resize": draft_on,
    "draft off: decode + resize": draft_off,
    "worker path: decode_image + preprocessing": worker_path,
}


@dataclass
class Row:
    name: str
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    images: int = 0


def measure(fn: Callable[[bytes], object], blobs: list[bytes], passes: int) -> tuple[float, float]:
    """Wall and thread-CPU seconds for ``passes`` passes over ``blobs`` on this thread."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(passes):
        for data in blobs:
            fn(data)
    return time.perf_counter() - wall, time.thread_time() - cpu


def cores_needed(per_core: float, target: float) -> dict[str, float | int]:
    decode = target / per_core
    # One more for the process's own loop: the batcher, the model thread launching kernels, I/O.
    return {"decode_cores": round(decode, 1), "cores_with_the_loop": math.ceil(decode) + 1}


def report(rows: list[Row], size: tuple[int, int], mean_bytes: float, identity: dict[str, Any]) -> dict[str, Any]:
    out_rows: list[dict[str, Any]] = []
    for row in rows:
        wall = statistics.median(row.images / s for s in row.wall_s)
        cpu = statistics.median(row.images / s for s in row.cpu_s)
        out_rows.append(
            {
                "name": row.name,
                "images_per_s_wall": round(wall, 1),
                "images_per_cpu_s": round(cpu, 1),
                "cpu_ms_per_image": round(1000 / cpu, 2),
                "rounds_images_per_cpu_s": [round(row.images / s, 1) for s in row.cpu_s],
            }
        )
    worker = next(r for r in out_rows if r["name"].startswith("worker path"))
    return {
        "what": f"{size[0]}x{size[1]} photo-like JPEGs -> {SIDE}x{SIDE} model input, one thread",
        "mean_jpeg_bytes": round(mean_bytes),
        "machine": identity,
        "rows": out_rows,
        "gpu_worker_cores_for": {
            f"{target} images/s": cores_needed(worker["images_per_cpu_s"], target) for target in TARGETS
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="distinct JPEGs (made once, held in memory)")
    parser.add_argument("--size", default="1600x1200", help="the JPEGs' width x height")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the images per row and round")
    parser.add_argument("--work", type=Path, default=None, help="keep the JPEGs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-decode.json"))
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.lower().split("x"))
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(1)  # one thread is what the rate is per; numpy and PIL use the calling thread
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as temporary:
        folder = args.work or Path(temporary)
        paths = sorted(folder.glob("photo_*.jpg"))[: args.images]
        if len(paths) < args.images or Image.open(paths[0]).size != (width, height):
            paths = realistic_jpegs(folder, args.images, (width, height))
        blobs = [path.read_bytes() for path in paths]
    rows = [Row(name) for name in ROWS]
    for fn in ROWS.values():
        fn(blobs[0])  # warm-up: imports, Pillow's plugin, numpy's first allocations
    for round_index in range(args.rounds):
        for row in rows:
            wall, cpu = measure(ROWS[row.name], blobs, args.passes)
            row.wall_s.append(wall)
            row.cpu_s.append(max(cpu, 1e-9))
            row.images = args.passes * len(blobs)
            print(f"round {round_index + 1} {row.name:44s} {row.images / cpu:8.1f} images per CPU s", flush=True)
    identity = machine_identity(load_at_start)
    identity["load_average_1min_at_end"] = os.getloadavg()[0]
    result = report(rows, (width, height), sum(map(len, blobs)) / len(blobs), identity)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['name']:44s} {row['images_per_cpu_s']:8.1f} img/CPU s  {row['cpu_ms_per_image']:6.2f} CPU ms/img")
    for target, need in result["gpu_worker_cores_for"].items():
        cores, total = need["decode_cores"], need["cores_with_the_loop"]
        print(f"CPU decoding at {target}: {cores} decode cores, {total} with the loop")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
