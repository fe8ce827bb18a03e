"""``make demo`` / ``captionfleet demo``: caption a freshly generated shapes archive, offline.

1. draws a small archive of shapes pictures (from a seed the built-in model never trained on)
   into a folder, with the true captions kept aside in truth.jsonl;
2. captions the folder with the built-in model through the same bulk path as
   ``captionfleet caption`` (worker.bulk.run_caption_job) into a Parquet file;
3. prints sample captions next to the truth, the exact-match rate and the speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captionfleet.core.failures import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from captionfleet.trainer.evaluate import normalize, score_captions
from captionfleet.trainer.shapes import render, sample_scene

# Training used seed 1337 (and 1338 for validation); the unit test uses 2024. A different seed
# again, so the demo's pictures are new to the model.
DEMO_SEED = 4242


def write_archive(folder: Path, *, count: int, seed: int, image_size: int) -> dict[str, str]:
    """PNG pictures named shape-00000.png ...; returns {file name: true caption}."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for index in range(count):
        scene = sample_scene(seed, index)
        name = f"shape-{index:05d}.png"
        render(scene, image_size).save(folder / name)
        truth[name] = scene.caption()
    return truth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captionfleet demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="demo folder (default: demo-out)")
    parser.add_argument("--count", type=int, default=200, help="pictures to generate (default: 200)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help=f"picture seed (default: {DEMO_SEED})")
    parser.add_argument("--model", default="builtin", help="model ref to caption with (default: builtin)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side of the generated pictures in pixels (default: 64, the built-in model's input)",
    )
    parser.add_argument("--num-beams", type=int, default=None, help="beam search width (default: the worker's)")
    parser.add_argument("--samples", type=int, default=10, help="captions to print (default: 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_demo(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return EXIT_USAGE

    # Imported here so --help is instant.
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.core.settings import SettingsError, load_worker_settings
    from captionfleet.worker.bulk import run_caption_job
    from captionfleet.worker.sinks import read_rows

    images = args.out / "images"
    print(f"1/3 drawing {args.count} shapes pictures (seed {args.seed}) into {images}/")
    truth = write_archive(images, count=args.count, seed=args.seed, image_size=args.image_size)
    (args.out / "truth.jsonl").write_text(
        "".join(json.dumps({"image": f"images/{name}", "caption": text}) + "\n" for name, text in truth.items())
    )

    try:
        settings = load_worker_settings()
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    settings.model.ref = args.model
    if args.num_beams is not None:
        settings.decoding.num_beams = args.num_beams
    results = args.out / "captions.parquet"
    print(f"2/3 captioning {images}/ with model {args.model!r} into {results} (the `captionfleet caption` path)")
    try:
        summary = run_caption_job(str(images), results, settings, overwrite=True, show_progress=not args.quiet)
    except ModelRefError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED

    rows = {row["id"]: row for row in read_rows(results)}
    captioned = [name for name in truth if rows.get(name, {}).get("caption") is not None]
    print(f"3/3 results ({summary.model_version}):\n")
    width = max(len(truth[name]) for name in truth) + 2
    print(f"    {'image':<16}{'caption':<{width}}truth")
    for name in list(truth)[: args.samples]:
        caption = rows.get(name, {}).get("caption") or f"[failed: {rows.get(name, {}).get('error_kind')}]"
        mark = "ok " if normalize(caption) == normalize(truth[name]) else "BAD"
        print(f"{mark} {name:<16}{caption:<{width}}{truth[name]}")
    print()
    if captioned:
        exact = sum(normalize(rows[n]["caption"]) == normalize(truth[n]) for n in captioned) / len(captioned)
        try:
            scores = score_captions([rows[n]["caption"] for n in captioned], [[truth[n]] for n in captioned])
            extra = f"  (BLEU-4 {scores.bleu4:.3f}, CIDEr {scores.cider:.2f})"
        except ImportError:  # BLEU/CIDEr need pycocoevalcap; the exact-match rate does not
            extra = ""
        print(f"exact match: {exact:.1%} of {len(captioned)} captioned pictures{extra}")
    for line in summary.lines():
        print(line)
    return EXIT_OK if summary.failed == 0 and len(captioned) == len(truth) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(run_demo())
