"""`captionfleet` — one console script for every part: caption, train, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from worker.exit_codes import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, exit_for_access_error
from worker.model_store import ModelRefError
from worker.settings import SettingsError, WorkerSettings, load_worker_settings, with_overrides


def _caption_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "caption",
        help="caption every image under a folder or S3 prefix into Parquet or JSONL results (resumable)",
        description=(
            "Caption every image under SRC. Re-running with the same --out resumes. With an s3:// SRC the results "
            "go to whole part files under an s3:// --out, one folder per shard (--shard i/N splits the keys "
            "over N workers)."
        ),
    )
    p.add_argument("src", help="folder of images (searched recursively), or s3://bucket/prefix/")
    p.add_argument(
        "--out",
        required=True,
        help="results file FILE.parquet or FILE.jsonl for a folder; s3://bucket/prefix/ for an s3:// source",
    )
    p.add_argument("--model", help="checkpoint dir, s3://bucket/prefix, hub id, or 'builtin' (WORKER_MODEL__REF)")
    p.add_argument("--batch-size", type=int, help="images per model call (WORKER_BATCH__MAX_ITEMS)")
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (WORKER_BATCH__MAX_WAIT_MS)")
    p.add_argument("--num-beams", type=int, help="beam search width (WORKER_DECODING__NUM_BEAMS)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit (WORKER_DECODING__MAX_NEW_TOKENS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="WORKER_MODEL__DEVICE")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def size(text: str) -> int:
        units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
        text = text.strip().lower().removesuffix("b").removesuffix("i")
        try:
            return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes, or e.g. 200k, 5M, 1G") from None

    s3 = p.add_argument_group("s3:// sources")
    s3.add_argument(
        "--shard", metavar="I/N", help="caption only shard I of N (from 0; default: all, or WORKER_SHARD__*)"
    )
    s3.add_argument(
        "--retry-failed",
        nargs="*",
        metavar="KIND",
        help="also re-run keys whose rows are failures (of these kinds, e.g. timeout decode; none = all kinds); "
        "the new rows supersede them. Put it after SRC",
    )
    s3.add_argument(
        "--any-model-version",
        action="store_true",
        help="count rows from any model version as done (default: a new model version captions everything again)",
    )
    s3.add_argument(
        "--suffix",
        action="append",
        metavar="SUFFIX",
        help="only keys ending in SUFFIX (repeatable, e.g. --suffix .jpg --suffix .png; default: every key)",
    )
    s3.add_argument(
        "--min-size", type=size, metavar="BYTES", help="skip smaller objects (e.g. 1k; WORKER_BULK__MIN_SIZE)"
    )
    s3.add_argument(
        "--max-size", type=size, metavar="BYTES", help="skip larger objects (e.g. 20M; WORKER_BULK__MAX_SIZE)"
    )
    s3.add_argument("--format", choices=["parquet", "jsonl"], help="result part format (default parquet)")
    s3.add_argument("--rows-per-part", type=int, metavar="N", help="rows per result part (WORKER_BULK__ROWS_PER_PART)")


def _apply_overrides(settings: WorkerSettings, args: argparse.Namespace) -> WorkerSettings:
    """Command-line flags win over the environment."""
    return with_overrides(
        settings,
        {
            "model.ref": args.model or None,
            "model.device": args.device or None,
            "batch.max_items": args.batch_size,
            "batch.max_wait_ms": args.max_wait_ms,
            "decoding.num_beams": args.num_beams,
            "decoding.max_new_tokens": args.max_new_tokens,
            "bulk.format": getattr(args, "format", None),
            "bulk.rows_per_part": getattr(args, "rows_per_part", None),
            "bulk.suffixes": getattr(args, "suffix", None),
            "bulk.min_size": getattr(args, "min_size", None),
            "bulk.max_size": getattr(args, "max_size", None),
        },
    )


def _cmd_caption(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from worker.bulk import run_caption_job

    try:
        settings = _apply_overrides(load_worker_settings(), args)
    except ValidationError as error:
        print(f"error: bad option: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger().setLevel(settings.log_level)
    src_s3, out_s3 = args.src.startswith("s3://"), args.out.startswith("s3://")
    if src_s3 or out_s3:
        if not (src_s3 and out_s3):
            print(
                "error: S3 results need an S3 source and vice versa: use captionfleet caption s3://bucket/images/ "
                "--out s3://bucket/captions/ (or a local folder with --out FILE.parquet)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        # The S3 bulk job (worker/bulk_s3.py).
        from worker.bulk_s3 import S3JobError, S3JobOptions, run_s3_caption_job
        from worker.connectors.s3 import S3AccessError
        from worker.settings import load_kubernetes_job_env
        from worker.sharding import resolve_shard

        try:
            shard = resolve_shard(args.shard, settings.shard, load_kubernetes_job_env().job_completion_index)
            options = S3JobOptions(
                shard=shard,
                retry_failed=None if args.retry_failed is None else frozenset(args.retry_failed),
                any_model_version=args.any_model_version,
                overwrite=args.overwrite,
            )
            s3_summary = run_s3_caption_job(
                args.src, args.out, settings, options=options, show_progress=not args.no_progress
            )
        except S3AccessError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_for_access_error(error)
        except (SettingsError, S3JobError, ModelRefError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        for line in s3_summary.lines():
            print(line)
        if s3_summary.interrupted:
            print(
                f"interrupted: the parts written so far are in {s3_summary.output}; "
                "run the same command again to resume"
            )
            return 130
        print(f"results: {s3_summary.output}")
        return EXIT_SOME_FAILED if s3_summary.failed else EXIT_OK
    s3_only_flags = ["shard", "retry_failed", "any_model_version", "suffix", "min_size", "max_size"]
    s3_only_flags += ["format", "rows_per_part"]
    s3_only = [
        f"--{flag.replace('_', '-')}" for flag in s3_only_flags if getattr(args, flag, None) not in (None, False)
    ]
    if s3_only:
        print(f"error: {', '.join(s3_only)} apply to s3:// sources only: drop them for a local folder", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    try:
        summary = run_caption_job(args.src, out, settings, overwrite=args.overwrite, show_progress=not args.no_progress)
    except (ModelRefError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        print(f"interrupted: the rows written so far are in {out}; run the same command again to resume")
        return 130
    print(f"results: {out}")
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK


def _cmd_train(argv: list[str]) -> int:
    from trainer.__main__ import main as train_main

    return train_main(argv)


def _cmd_worker(argv: list[str]) -> int:
    from worker.__main__ import main as worker_main

    return worker_main(argv)


def _cmd_models(argv: list[str]) -> int:
    from trainer.models_cli import main as models_main

    return models_main(argv)


def _cmd_demo(argv: list[str]) -> int:
    from trainer.demo import run_demo

    return run_demo(argv)


def _cmd_dashboard(argv: list[str]) -> int:
    from dashboard.__main__ import main as dashboard_main

    return dashboard_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # worker, train and demo parse their own options.
    own_parsers = {"worker": _cmd_worker, "train": _cmd_train, "demo": _cmd_demo, "dashboard": _cmd_dashboard}
    own_parsers["models"] = _cmd_models
    if argv and argv[0] in own_parsers:
        return own_parsers[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="captionfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{caption,worker,train,demo,dashboard}")
    _caption_parser(sub)
    sub.add_parser("worker", help="run a streaming worker (captionfleet worker --help)")
    sub.add_parser("train", help="train or fine-tune a model (captionfleet train --help)")
    sub.add_parser("demo", help="caption a generated shapes archive with the built-in model")
    sub.add_parser("models", help="published model versions: list, show, promote, rollback")
    sub.add_parser("dashboard", help="serve the Streamlit dashboard (captionfleet dashboard --help)")
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
