"""Beam search with an image's beams attending together (core/beams.py, ``grouped_cross_attention``)
against per-beam copies of its cross-attention keys and values, in one process, alternating.

    python -m bench.grouped_attention [--precision int8] [--batch 8] [--images 16] [--rounds 3]

Full ViT-base + GPT-2 architecture with random weights (bench/full_checkpoint.py), 4 beams, 16 tokens,
photo-like JPEGs preprocessed once; the same Captioner switched between the two attentions (per-beam
copies = transformers' eager attention, which turns the grouping off). Prints CPU ms per image (the
process's CPU time, less disturbed by other jobs than wall time) per round, the minimum of each, and
whether the captions are the same. Use one thread (OMP_NUM_THREADS=1) for the per-core figure; limit the
CPU to AVX2 with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_identity
from bench.workload import load_captioner, open_rgb, prepare, realistic_jpegs
from captionfleet.core.beams import GROUPED_ATTENTION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int8", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="keep the checkpoint and JPEGs here")
    args = parser.parse_args(argv)
    if args.work is not None:
        return run(args, args.work)
    with tempfile.TemporaryDirectory(prefix="captionfleet-bench-") as work:
        return run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> int:
    checkpoint, paths = prepare(work / "vit-gpt2-full", work / "jpegs", args.images, realistic_jpegs)
    captioner = load_captioner(checkpoint, args.precision, 4)
    pixels = captioner.preprocess(open_rgb(paths[: args.images]))
    decoder = captioner.model.decoder
    ms: dict[str, list[float]] = {"grouped": [], "per-beam copies": []}
    captions: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for mode in ms:
            decoder.set_attn_implementation(GROUPED_ATTENTION if mode == "grouped" else "eager")
            captioner.caption_pixels(pixels[:2])  # warm-up after the switch
            started = time.process_time()
            out: list[str] = []
            for i in range(0, args.images, args.batch):
                out += captioner.caption_pixels(pixels[i : i + args.batch])
            ms[mode].append((time.process_time() - started) / args.images * 1000)
            captions[mode] = out
            print(f"{mode}: {ms[mode][-1]:.0f} CPU ms/image", flush=True)
    summary = {
        "cpu": cpu_identity(),
        "precision": captioner.precision,
        "batch": args.batch,
        "images": args.images,
        "best_cpu_ms_per_image": {mode: round(min(values), 1) for mode, values in ms.items()},
        "same_captions": captions["grouped"] == captions["per-beam copies"],
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
