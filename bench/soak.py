"""Soak: many images through the bulk pipeline with a small model, RSS sampled every few seconds.

    python -m bench.soak [--images 20000] [--out docs]     (--quick: 2,000 images)

Uses the built-in demo model (small, so the pipeline, not the model, is what runs for a long time)
on shapes pictures written as PNG files to a temporary folder, through ``run_caption_job`` (the
bulk folder path, JSONL output). Passes when RSS after warm-up (the first 10% of samples) grows by
less than 5% and the last third's images/s is not below 90% of the first third's.
Writes <out>/soak.json and <out>/soak_rss.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chart import line_chart
from bench.machine import rss_mb
from captionfleet.core.captioner import ModelInput
from captionfleet.core.generation import Caption
from captionfleet.core.settings import BatchSettings, DecodingSettings, ModelSettings, WorkerSettings
from captionfleet.trainer.shapes import ShapesDataset
from captionfleet.worker.bulk import load_captioner, run_caption_job

if TYPE_CHECKING:
    from captionfleet.worker.bulk import BulkSummary

Sample = tuple[float, float, int]  # (seconds, RSS MB, images captioned)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 images")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    count = 2_000 if args.quick else args.images
    work = Path(tempfile.mkdtemp(prefix="captionfleet-soak-"))
    folder = work / "images"
    folder.mkdir()
    data = ShapesDataset(4040, count, 64)
    for i in range(count):
        data.image(i).save(folder / f"{i:06d}.png")
    out_file = work / "results.jsonl"

    summary, seconds, samples = run_sampled(folder, out_file, args.interval)
    report = build_report(count, summary, seconds, samples)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.out / f"soak{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    if len(samples) >= 2:
        line_chart(
            [t for t, _, _ in samples],
            [r for _, r, _ in samples],
            title=f"soak: RSS while captioning {count:,} images (built-in model, bulk pipeline)",
            x_label="seconds",
            y_label="RSS MB",
            path=args.out / f"soak{suffix}_rss.png",
        )
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    return 0 if report["passed"] else 1


def run_sampled(folder: Path, out_file: Path, interval: float) -> tuple[BulkSummary, float, list[Sample]]:
    """The bulk job over ``folder`` with RSS and progress sampled every ``interval`` seconds."""
    samples: list[Sample] = []
    settings = WorkerSettings(
        model=ModelSettings(ref="builtin", device="cpu"),
        decoding=DecodingSettings(num_beams=1, max_new_tokens=16),
        batch=BatchSettings(max_items=32),
    )
    # Progress is counted at the model (the sink buffers rows, so its file grows in steps).
    captioner = load_captioner(settings)
    captioned = [0]
    inner = captioner.caption_inputs

    def counting(inputs: Sequence[ModelInput], decoding: DecodingSettings | None = None) -> list[Caption]:
        out = inner(inputs, decoding)
        captioned[0] += len(out)
        return out

    captioner.caption_inputs = counting  # type: ignore[method-assign]
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not stop.wait(interval):
            samples.append((time.perf_counter() - start, rss_mb(), captioned[0]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = run_caption_job(str(folder), out_file, settings, overwrite=True, show_progress=False, captioner=captioner)
    stop.set()
    sampler.join()
    return summary, time.perf_counter() - start, samples


def build_report(count: int, summary: BulkSummary, seconds: float, samples: list[Sample]) -> dict[str, Any]:
    """The figures and the verdict: flat RSS after warm-up, and no slow-down from the first third to the last."""
    warm = samples[max(1, len(samples) // 10) :] or samples
    rss_growth = (warm[-1][1] - warm[0][1]) / warm[0][1] if warm else 0.0
    third = max(1, len(samples) // 3)
    first_rate = _rate(samples[:third])
    last_rate = _rate(samples[-third:])
    return {
        "images": count,
        "captioned": summary.done,
        "failed": summary.failed,
        "seconds": round(seconds, 1),
        "images_per_s": round(summary.images_per_second, 1),
        "rss_mb_after_warmup": round(warm[0][1], 1) if warm else None,
        "rss_mb_end": round(warm[-1][1], 1) if warm else None,
        "rss_growth_after_warmup": round(rss_growth, 4),
        "images_per_s_first_third": round(first_rate, 1),
        "images_per_s_last_third": round(last_rate, 1),
        "passed": summary.done == count and rss_growth < 0.05 and last_rate >= 0.9 * first_rate,
        "machine_shared": True,
        "samples": [[round(t, 1), round(r, 1), n] for t, r, n in samples],
    }


def _rate(window: list[Sample]) -> float:
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return 0.0
    return (window[-1][2] - window[0][2]) / (window[-1][0] - window[0][0])


if __name__ == "__main__":
    sys.exit(main())
