"""The served families side by side in one run: full-size architectures with random weights, each at every
precision its device runs natively, captioning the same JPEGs through the worker's path.

    python -m bench.families [--quick] [--rounds N] [--out docs] [--work DIR]     (make bench-families)
    python -m bench.families --device cuda --quick --out OUT                      (bench/gpu_session.sh)
    python -m bench.families --tiny --images 2 --rounds 1 ...                     (a smoke test, tests/unit)

Families (bench/family_checkpoints.py, sizes of the hub checkpoints' published configs): ViT-GPT2, BLIP-base,
GIT-base, Florence-2-base, SmolVLM-256M. Precisions: fp32 everywhere; bf16 on a CPU with native bf16
(AVX-512 BF16 or AMX, the test core/fastpath.py's ``auto`` uses; an AVX2-only CPU emulates it, slower than
fp32, so it gets fp32 only); fp16 and bf16 on CUDA. Each family's best measured precision is the one with
the most images/s; its captions are compared with fp32's on the same images (bench/family_report.py).

Each row (bench/family_rows.py): a fresh process loads the checkpoint with core.loading.load_checkpoint,
decodes and prepares the JPEGs as the pipeline's decode threads do (timed apart), then captions them with
caption_inputs in batches of the worker's default batch size on CPU (core/settings.py; 32 on CUDA), greedy,
exactly --tokens new tokens per image, with --threads torch threads (default one: a core's figure). Rounds
interleave every row (family by family, precision by precision, then again); figures are medians over
rounds, each round's figure is kept in the JSON, and so is each row's CPU time (on a shared machine the
wall clock also counts the time neighbours held the cores).

Writes <out>/benchmarks-families[-gpu][-tiny][-quick].json and -table.md, after every row (a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.family_checkpoints import SPECS, TINY, save_checkpoint
from bench.family_report import FamilyRow, build_report, markdown_tables
from bench.family_rows import RowJob, measure
from bench.machine import machine_identity
from bench.workload import realistic_jpegs
from captionfleet.core import fastpath

TOKENS = 16

# On CUDA 32 images a call, the batch this bench's GPU run (bench/gpu_session.sh: 64 images, 420 s) was sized
# with. The worker's GPU default is now up to 128 greedy images (WORKER_BATCH__MAX_SEQUENCES), within its pixel
# limit, which this bench does not apply: larger batches of these families are not measured on a GPU yet.
CUDA_FAMILIES_BATCH = 32
# On CPU 8 images a call, the batch its published figures (docs/benchmarks-families.json) were measured at; one
# caption_inputs call applies no pixel limit, and 32 of SmolVLM's 13-split photos would need ~4x the memory.
CPU_FAMILIES_BATCH = 8


def precisions_for(device: str) -> list[str]:
    """fp32 first (the reference), then the half types the device runs natively."""
    if device == "cuda":
        return ["fp32", "fp16", *(["bf16"] if torch.cuda.is_bf16_supported() else [])]
    return ["fp32", *(["bf16"] if fastpath.cpu_has_native_bf16() else [])]


def cpu_features() -> dict[str, Any]:
    """What decides the CPU rows: torch's kernel level and whether bf16 is native here."""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch: not known
        capability = "unknown"
    return {"torch_cpu_capability": capability, "native_bf16": fastpath.cpu_has_native_bf16()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 4 images")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--images", type=int, default=0, help="images per row (default: one batch; quick 4)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="new tokens per image, exactly")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--families", default=",".join(SPECS), help=f"comma-separated, of {', '.join(SPECS)}")
    # One thread by default: on a shared machine two OpenMP threads on two cores stall at every op's barrier
    # whenever a neighbour holds a core (this bench's first try, load average 10: ViT-GPT2 fp32 took 20 s of
    # wall clock per image at two threads, 2.7 s at one), and a row's figure is then one core's, which more
    # cores multiply (one single-thread process per core measured 1.0-1.08x of one process with a thread
    # per core in docs/benchmarks.md).
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (0: torch's own, a core each)")
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoints and JPEGs here")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--tiny", action="store_true", help="miniature checkpoints and small JPEGs: a smoke test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run this on the GPU machine (bench/gpu_session.sh)")
    unknown = set(args.families.split(",")) - set(SPECS)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; known: {', '.join(SPECS)}")
    if args.work is not None:
        return run(args, args.work)
    # Without --work the ~4.3 GB of checkpoints and the JPEGs are made afresh and removed afterwards.
    with tempfile.TemporaryDirectory(prefix="bench-families-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> int:
    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    batch = CUDA_FAMILIES_BATCH if args.device == "cuda" else CPU_FAMILIES_BATCH
    images = args.images or (4 if args.quick else batch)
    rounds = args.rounds or (1 if args.quick else 3)
    keys = args.families.split(",")
    folder = work / ("jpegs-tiny" if args.tiny else "jpegs")
    jpegs = sorted(folder.glob("*.jpg"))[:images] if folder.exists() else []
    if len(jpegs) < images:  # photo-like 1600x1200 JPEGs, the same as bench.compare's
        jpegs = realistic_jpegs(folder, images, (160, 120) if args.tiny else (1600, 1200))
    checkpoints = {}
    for key in keys:
        made = time.perf_counter()
        name = f"{key}-tiny" if args.tiny else key
        checkpoints[key] = save_checkpoint(key, work / name, shrink=TINY[key] if args.tiny else None)
        print(f"checkpoint {key}: {time.perf_counter() - made:.0f}s", flush=True)
    precisions = precisions_for(args.device)
    rows = [FamilyRow(key, SPECS[key].name, SPECS[key].hub_id, precision) for key in keys for precision in precisions]
    header = {
        "command": "python -m bench.families " + shlex.join(sys.argv[1:] if __name__ == "__main__" else []),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "machine": {**machine_identity(load_at_start), **cpu_features()},
        "tiny": args.tiny,
        "quick": args.quick,
        "rounds": rounds,
        "images_per_row": images,
        "batch": batch,
        "decoding": f"greedy, exactly {args.tokens} new tokens per image (min_new_tokens = max_new_tokens)",
        "jpegs": f"{len(jpegs)} photo-like JPEGs, {'160x120' if args.tiny else '1600x1200'}",
        "weights": "random (transformers' initialisation), full-size architectures" if not args.tiny else "tiny",
    }
    print(f"precisions here: {', '.join(precisions)}; {images} images per row, batch {batch}", flush=True)
    for r in range(rounds):
        for row in rows:
            if row.error:
                continue
            job = RowJob(
                checkpoints[row.family], tuple(jpegs), row.precision, args.device, args.tokens, batch, args.threads
            )
            try:
                row.add_round(measure(job))
            except RuntimeError as error:  # one row's failure is reported, the others still run
                row.error = str(error).strip().splitlines()[-1]
                print(error, file=sys.stderr, flush=True)
            figure = f"{row.images / row.seconds[-1]:7.3f} img/s" if row.measured else f"failed: {row.error}"
            print(f"round {r + 1} {row.name:16s} {row.precision:5s} {figure}", flush=True)
            write_outputs(rows, header, args, started)
    report = write_outputs(rows, header, args, started)
    print(markdown_tables(report))
    print(f"total {report['seconds']}s; wrote {output_name(args)}.json and -table.md under {args.out}")
    return 0 if all(row.measured for row in rows) else 1


def output_name(args: argparse.Namespace) -> str:
    return (
        "benchmarks-families"
        + ("-gpu" if args.device == "cuda" else "")
        + ("-tiny" if args.tiny else "")
        + ("-quick" if args.quick else "")
    )


def write_outputs(
    rows: list[FamilyRow], header: dict[str, Any], args: argparse.Namespace, started: float
) -> dict[str, Any]:
    report = build_report(rows, {**header, "seconds": round(time.perf_counter() - started, 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    name = output_name(args)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}-table.md").write_text(markdown_tables(report) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
