"""`captionfleet caption`: caption a folder or an S3 prefix into results (the bulk front end).

The root command that dispatches to it lives in ``captionfleet/cli.py``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from captionfleet.core.failures import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    exit_for_access_error,
)
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.prompt_input import PromptRefused, check_prompt
from captionfleet.core.settings import SettingsError, WorkerSettings, load_worker_settings, with_overrides

if TYPE_CHECKING:
    from captionfleet.worker.bulk import BulkSummary  # imported when a job runs: `--help` needs no torch
    from captionfleet.worker.bulk_api import BulkApi


def add_caption_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "caption",
        help="caption every image under a folder or S3 prefix into Parquet or JSONL results (resumable)",
        description=(
            "Caption every image under SRC. Re-running with the same --out resumes. With an s3:// SRC the results "
            "go to whole part files under an s3:// --out, one folder per shard (--shard i/N splits the keys "
            "over N workers)."
        ),
        epilog="With WORKER_HTTP__ENABLED=true the caption API (WORKER_HTTP__*) is served beside the job while it "
        "runs, from the same model.",
    )
    p.add_argument(
        "src",
        help="folder of images (searched recursively), s3://bucket/prefix/, or an archive: tar shards "
        "(shards/{00000..00099}.tar, local or s3://), a manifest of uris (.parquet/.csv/.jsonl), or a Parquet "
        "dataset with images inside",
    )
    p.add_argument(
        "--out",
        required=True,
        help="results file FILE.parquet or FILE.jsonl for a folder; s3://bucket/prefix/ for an s3:// source; "
        "a folder or s3:// prefix for an archive (one output per input file)",
    )
    p.add_argument(
        "--input-format",
        choices=["tar", "manifest", "parquet-images", "folder", "s3-prefix"],
        help="what SRC is (default: from its name: .tar/.tgz tar shards, .csv/.jsonl manifests, .parquet a "
        "dataset with an image column or a manifest, s3:// a prefix of images, else a folder)",
    )
    p.add_argument("--model", help="checkpoint dir, s3://bucket/prefix, hub id, or 'builtin' (WORKER_MODEL__REF)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per batch, at most (WORKER_BATCH__MAX_ITEMS; it lifts the derived sequence limit)",
    )
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (WORKER_BATCH__MAX_WAIT_MS)")
    p.add_argument("--num-beams", type=int, help="beam search width (WORKER_DECODING__NUM_BEAMS)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit (WORKER_DECODING__MAX_NEW_TOKENS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="WORKER_MODEL__DEVICE")

    def prompt(text: str) -> str | None:
        try:
            return check_prompt(text, field="--prompt")
        except PromptRefused as refused:
            raise argparse.ArgumentTypeError(str(refused)) from None

    p.add_argument(
        "--prompt",
        type=prompt,
        metavar="TEXT",
        help="the prompt for every image without one of its own (a manifest's prompt column), e.g. 'a photo of' "
        "for BLIP/GIT or '<DETAILED_CAPTION>' for Florence-2; default: the model family's (WORKER_BULK__PROMPT). "
        "A ViT-GPT2 model takes none",
    )
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

    archives = p.add_argument_group("archives (tar shards, manifests, Parquet datasets)")
    archives.add_argument(
        "--out-format",
        choices=["parquet", "webdataset"],
        help="parquet: the input's rows with the caption fields (default); webdataset: for tar shards, new "
        "shards with the caption as key.txt and in key.json, beside the Parquet",
    )
    archives.add_argument(
        "--uri-column", metavar="NAME", help="a manifest's column of image uris (default: url, then uri)"
    )
    archives.add_argument(
        "--image-column", metavar="NAME", help="a Parquet dataset's image column (bytes/path struct; default: image)"
    )
    archives.add_argument(
        "--prompt-column",
        metavar="NAME",
        help="a manifest's or Parquet dataset's column of per-row prompts (default: prompt, when the file has one "
        "and the model takes prompts); an empty cell is --prompt's, else the family's default",
    )


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
            "bulk.prompt": getattr(args, "prompt", None),
            "bulk.format": getattr(args, "format", None),
            "bulk.rows_per_part": getattr(args, "rows_per_part", None),
            "bulk.suffixes": getattr(args, "suffix", None),
            "bulk.min_size": getattr(args, "min_size", None),
            "bulk.max_size": getattr(args, "max_size", None),
        },
    )


def run_caption(args: argparse.Namespace) -> int:
    """Run ``captionfleet caption`` with parsed arguments; returns the exit status."""
    from pydantic import ValidationError

    try:
        settings = _apply_overrides(load_worker_settings(), args)
    except ValidationError as error:
        print(f"error: bad option: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger().setLevel(settings.log_level)
    if settings.http.enabled:
        settings.http.check_auth()  # SettingsError (exit 2) before the model loads: beyond loopback needs tokens
    from captionfleet.worker.bulk_archive import input_format_from_name

    input_format = args.input_format or input_format_from_name(args.src)
    if input_format in ARCHIVE_INPUTS:
        return _with_api(settings, lambda api: _caption_archive(args, settings, input_format, api))
    archive_flags = ("out_format", "uri_column", "image_column", "prompt_column")
    archive_only = [flag for flag in archive_flags if getattr(args, flag, None)]
    if archive_only:
        flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in archive_only)
        print(f"error: {flags} apply to archives only (tar shards, manifests, Parquet datasets)", file=sys.stderr)
        return EXIT_USAGE
    src_s3, out_s3 = args.src.startswith("s3://"), args.out.startswith("s3://")
    if src_s3 or out_s3:
        if not (src_s3 and out_s3):
            print(
                "error: S3 results need an S3 source and vice versa: use captionfleet caption s3://bucket/images/ "
                "--out s3://bucket/captions/ (or a local folder with --out FILE.parquet)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return _with_api(settings, lambda api: _caption_s3(args, settings, api))
    return _with_api(settings, lambda api: _caption_local(args, settings, api))


ARCHIVE_INPUTS = ("tar", "manifest", "parquet-images", "parquet")


def _with_api(settings: WorkerSettings, job: Callable[[BulkApi], int]) -> int:
    """The job, with the caption API served beside it while it runs when WORKER_HTTP__ENABLED
    (worker/bulk_api.py); exit 2 when the API's port cannot be served."""
    from captionfleet.worker.bulk_api import BulkApi

    if not settings.http.enabled:
        return job(BulkApi.off())
    from captionfleet.worker.http.server import HttpPortError

    try:
        api = BulkApi.open(settings)  # the port is bound before the job writes anything
    except (HttpPortError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    with api:
        try:
            return job(api)
        except HttpPortError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE


def _caption_archive(args: argparse.Namespace, settings: WorkerSettings, input_format: str, api: BulkApi) -> int:
    """Tar shards, manifests or Parquet datasets into outputs beside them, one per input file."""
    from captionfleet.core.s3 import S3AccessError
    from captionfleet.core.settings import load_kubernetes_job_env
    from captionfleet.worker.bulk_archive import ArchiveJobError, ArchiveOptions, run_archive_job
    from captionfleet.worker.sharding import resolve_shard

    ignored = [
        f"--{flag.replace('_', '-')}"
        for flag in ("suffix", "min_size", "max_size", "format")
        if getattr(args, flag, None)
    ]
    if ignored:
        print(f"error: {', '.join(ignored)} apply to folders and S3 prefixes of images, not archives", file=sys.stderr)
        return EXIT_USAGE
    try:
        shard = resolve_shard(args.shard, settings.shard, load_kubernetes_job_env().job_completion_index)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = ArchiveOptions(
        input_format=input_format,
        out_format=args.out_format or "parquet",
        shard=shard,
        retry_failed=None if args.retry_failed is None else frozenset(args.retry_failed),
        any_model_version=args.any_model_version,
        overwrite=args.overwrite,
        uri_column=args.uri_column,
        image_column=args.image_column or "image",
        prompt_column=args.prompt_column,
    )
    try:
        summary = run_archive_job(
            args.src, args.out, settings, options=options, show_progress=not args.no_progress, api=api
        )
    except S3AccessError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_for_access_error(error)
    except (SettingsError, ArchiveJobError, ModelRefError) as error:
        # Only these are usage errors (exit 2 fails the whole Indexed Job): anything else raised while the
        # files are read is a bug or a fault of the moment, and exits 1 so the Job retries the index.
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    code = _report(summary, "outputs", summary.output)
    if code in (EXIT_OK, EXIT_SOME_FAILED) and summary.unfinished:
        print("some input files could not be read to their end: run the same command again to resume", file=sys.stderr)
        return EXIT_TEMPFAIL
    if code == EXIT_OK and summary.files_failed:
        return EXIT_SOME_FAILED
    return code


def _caption_s3(args: argparse.Namespace, settings: WorkerSettings, api: BulkApi) -> int:
    """An s3:// source into s3:// result parts: one shard of its keys."""
    from captionfleet.core.s3 import S3AccessError
    from captionfleet.core.settings import load_kubernetes_job_env
    from captionfleet.worker.bulk_s3 import S3JobError, S3JobOptions, run_s3_caption_job
    from captionfleet.worker.sharding import resolve_shard

    try:
        shard = resolve_shard(args.shard, settings.shard, load_kubernetes_job_env().job_completion_index)
        options = S3JobOptions(
            shard=shard,
            retry_failed=None if args.retry_failed is None else frozenset(args.retry_failed),
            any_model_version=args.any_model_version,
            overwrite=args.overwrite,
        )
        s3_summary = run_s3_caption_job(
            args.src, args.out, settings, options=options, show_progress=not args.no_progress, api=api
        )
    except S3AccessError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_for_access_error(error)
    except (SettingsError, S3JobError, ModelRefError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return _report(s3_summary, "parts", s3_summary.output)


def _caption_local(args: argparse.Namespace, settings: WorkerSettings, api: BulkApi) -> int:
    """A local folder into one results file."""
    from captionfleet.worker.bulk import run_caption_job

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
        summary = run_caption_job(
            args.src, out, settings, overwrite=args.overwrite, show_progress=not args.no_progress, api=api
        )
    except (ModelRefError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return _report(summary, "rows", out)


def _report(summary: BulkSummary, written: str, where: object) -> int:
    """The run's summary lines and where its results are; the exit status says how it ended."""
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        print(f"interrupted: the {written} written so far are in {where}; run the same command again to resume")
        return EXIT_INTERRUPTED
    print(f"results: {where}")
    return EXIT_SOME_FAILED if summary.failed else EXIT_OK
