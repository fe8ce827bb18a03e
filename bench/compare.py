"""Side by side, in one process run: what users would run vs captionfleet, against the machine's limit.

    python -m bench.compare [--quick] [--rounds N] [--out docs]      (make bench / make bench-quick)

Every row captions the same images with the same weights: the full ViT-base/16-224 + GPT-2 124M
architecture of nlpconnect/vit-gpt2-image-captioning built from configs with random weights (its
compute cost is the real one), saved as a real checkpoint by bench/full_checkpoint.py. Random
weights make captions meaningless and generation could stop at a random end-of-text, so every row
generates exactly ``max_new_tokens`` (end-of-text is never chosen: bench/workload.py): equal work per image.

Rows (model card decoding: 4 beams, 16 tokens):
  a  model card: ViTImageProcessor + one image per generate call, fp32
  b  plain batched generate as a user would write it (ViTImageProcessor, batch 8, fp32)
  c  captionfleet: JPEG folder -> CaptionPipeline (decode overlap, batching) with its defaults
Rows (greedy, 16 tokens, batch 32; model only vs the limit of their precision):
  fp32-plain (torch default GEMM), fp32 (oneDNN), bf16, int8 (per-row scales); the process layout of the
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
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_report import build_report, markdown_table, write_outputs
from bench.cpu_rows import make_rows, measure_row
from bench.limits import flops_per_image_by_beams, matmul_rates
from bench.workload import prepare, realistic_jpegs
from captionfleet.core import fastpath


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
    # --quick: fewer images, and batch 16 for the greedy rows, to finish in under two minutes. Row c gets at
    # least one full batch of the CPU default (32 images), two in the full run: a batch of a steady stream.
    n_card, n_batched, n_card_c, n_greedy = (2, 8, 32, 16) if quick else (6, 16, 64, 64)
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


if __name__ == "__main__":
    sys.exit(main())
