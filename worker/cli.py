"""`captionfleet` — one console script for every part: caption, train, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from worker.model_store import ModelRefError
from worker.settings import SettingsError, WorkerSettings, load_worker_settings

EXIT_OK = 0
EXIT_SOME_FAILED = 3  # the run completed, but some images have failure rows
EXIT_USAGE = 2  # bad arguments, settings or model reference: nothing was captioned


def _caption_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "caption",
        help="caption every image under a folder into a Parquet or JSONL file (resumable)",
        description="Caption every image under SRC. Re-running with the same --out resumes.",
    )
    p.add_argument("src", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="results file: FILE.parquet or FILE.jsonl")
    p.add_argument("--model", help="checkpoint dir, s3://bucket/prefix, hub id, or 'builtin' (WORKER_MODEL__REF)")
    p.add_argument("--batch-size", type=int, help="images per model call (WORKER_BATCH__MAX_ITEMS)")
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (WORKER_BATCH__MAX_WAIT_MS)")
    p.add_argument("--num-beams", type=int, help="beam search width (WORKER_DECODING__NUM_BEAMS)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit (WORKER_DECODING__MAX_NEW_TOKENS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="WORKER_MODEL__DEVICE")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _apply_overrides(settings: WorkerSettings, args: argparse.Namespace) -> WorkerSettings:
    """Command-line flags win over the environment; validated like the environment is."""
    data = settings.model_dump()
    if args.model:
        data["model"]["ref"] = args.model
    if args.device:
        data["model"]["device"] = args.device
    if args.batch_size is not None:
        data["batch"]["max_items"] = args.batch_size
    if args.max_wait_ms is not None:
        data["batch"]["max_wait_ms"] = args.max_wait_ms
    if args.num_beams is not None:
        data["decoding"]["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        data["decoding"]["max_new_tokens"] = args.max_new_tokens
    return WorkerSettings.model_validate(data)


def _cmd_caption(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.bulk import run_caption_job

    try:
        settings = _apply_overrides(load_worker_settings(), args)
    except ValidationError as error:
        print(f"error: bad option: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger().setLevel(settings.log_level)
    try:
        summary = run_caption_job(
            args.src, args.out, settings, overwrite=args.overwrite, show_progress=not args.no_progress
        )
    except (ModelRefError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        print(f"interrupted: the rows written so far are in {args.out}; run the same command again to resume")
        return 130
    print(f"results: {args.out}")
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def _cmd_train(argv: list[str]) -> int:
    from trainer.__main__ import main as train_main

    return train_main(argv)


def _cmd_demo(argv: list[str]) -> int:
    from trainer.demo import run_demo

    return run_demo(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # train and demo parse their own options.
    if argv and argv[0] == "train":
        return _cmd_train(argv[1:])
    if argv and argv[0] == "demo":
        return _cmd_demo(argv[1:])
    parser = argparse.ArgumentParser(prog="captionfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{caption,train,demo}")
    _caption_parser(sub)
    sub.add_parser("train", help="train or fine-tune a model (captionfleet train --help)")
    sub.add_parser("demo", help="caption a generated shapes archive with the built-in model")
    args = parser.parse_args(argv)
    try:
        if args.command == "caption":
            return _cmd_caption(args)
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
