"""``captionfleet train`` / ``python -m captionfleet.trainer``: train or fine-tune a captioning model.

Examples:
    captionfleet train --preset shapes                      # the built-in demo model, into ./out/shapes
    captionfleet train --data captions.jsonl --init-from builtin --out-dir out/ft --max-steps 500
    captionfleet train --data annotations/captions_train2017.json --image-root train2017 \\
        --init-from nlpconnect/vit-gpt2-image-captioning --learning-rate 5e-5
Every setting is also a TRAINER_<FIELD> environment variable (see trainer/settings.py).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from captionfleet.core.failures import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LATEST_UNUSABLE, EXIT_OK, EXIT_USAGE
from captionfleet.core.settings import SettingsError
from captionfleet.trainer.data import DataError
from captionfleet.trainer.presets import PRESETS
from captionfleet.trainer.settings import TrainerSettings, load_trainer_settings

log = logging.getLogger("captionfleet.trainer")  # the package: its modules log at INFO

_NOTHING_TRAINED = "--init-from latest trains nothing until it does (or start from one that loads: --init-from VERSION)"


def _is_nested(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _flag_help(name: str, annotation: Any, default: Any) -> str:
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    text = f"default: {default!r}" if not isinstance(default, Path) else f"default: {default}"
    return f"{'|'.join(map(str, choices))}; {text}" if choices else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captionfleet train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named, recorded group of settings")
    # One flag per flat setting, generated so flags and settings can never drift apart.
    for name, info in TrainerSettings.model_fields.items():
        if _is_nested(info.annotation):
            continue
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=_flag_help(name, info.annotation, info.default),
            )
    parser.add_argument("--num-beams", type=int, default=None, help="decoding for the final evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="decoding for the final evaluation")
    return parser


def settings_from_args(args: argparse.Namespace) -> TrainerSettings:
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    for name in TrainerSettings.model_fields:
        if name in vars(args):
            raw = getattr(args, name)
            values[name] = None if raw in ("", "none", "None") and name in ("run_dir", "image_root") else raw
    decoding = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    if decoding or "decoding" in values:  # flags over the preset's (shapes-git's is greedy) over the environment's
        values["decoding"] = {**TrainerSettings().decoding.model_dump(), **values.get("decoding", {}), **decoding}
    return load_trainer_settings(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        settings = settings_from_args(args)
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE

    # Imported here: torch and transformers take seconds to import, --help should not wait for them.
    from botocore.exceptions import BotoCoreError, ClientError

    from captionfleet.core.model_store import ModelRefError
    from captionfleet.core.s3 import is_storage_error
    from captionfleet.trainer import refresh
    from captionfleet.trainer.model import InitFromError
    from captionfleet.trainer.publish import one_line
    from captionfleet.trainer.registry import RegistryError, VersionNameError
    from captionfleet.trainer.train import train

    command = "captionfleet train " + shlex.join(argv)
    latest_registry: str | None = None
    try:
        latest_registry = refresh.init_from_latest(settings)
        settings = refresh.prepare(settings)  # --init-from latest, s3:// data (refresh runs)
        result = train(settings, command=command.strip())
    except ModelRefError as error:
        if latest_registry is not None and isinstance(error, InitFromError) and not is_storage_error(error):
            # What LATEST names cannot be loaded: say so, not which cache folder failed.
            version = error.ref.rstrip("/").rsplit("/", 1)[-1]
            cause = one_line(error, error.path, error.ref)
            line = refresh.latest_unusable(latest_registry, version, cause, _NOTHING_TRAINED)
            print(f"error: {line}", file=sys.stderr)
            return EXIT_LATEST_UNUSABLE
        print(f"error: {error}", file=sys.stderr)
        # A checkpoint that cannot be used (--init-from, the run's own resume state): nothing to retry. The
        # store failing while fetching it is another matter: running again may well work.
        return EXIT_FAILED if is_storage_error(error) else EXIT_USAGE
    except VersionNameError as error:  # --init-from names no stored version, or several
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ClientError, BotoCoreError) as error:  # reading LATEST or the s3:// data: worth a retry
        print(f"error: object storage: {error}; check TRAINER_S3__ENDPOINT_URL and the credentials", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: run the same command again to resume from the last checkpoint in "
            f"{settings.resolved_run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    info = result.info
    scores = info.get("scores", {})
    print(f"published {info.get('version')} to {result.out_dir} after {result.step} steps")
    print(
        f"exact match {scores.get('exact_match', 0):.1%}  BLEU-4 {scores.get('bleu4', 0):.3f}  "
        f"CIDEr {scores.get('cider', 0):.3f}  repetition {scores.get('repetition_rate', 0):.1%}  "
        f"({scores.get('images', 0)} val images); wall time {result.wall_seconds:.0f}s"
    )
    if settings.publish_to and result.out_dir is not None:
        # Through the quality gate: a rejected version is stored with its scores, LATEST unchanged.
        try:
            outcome = refresh.publish_trained(settings, result.out_dir)
        except (DataError, ModelRefError, RegistryError) as error:
            print(f"error: publishing to {settings.publish_to}: {error}", file=sys.stderr)
            return EXIT_FAILED
        print(outcome.line())
        if outcome.latest_error is not None and not outcome.promoted and outcome.baseline is not None:
            kept = (
                f"{outcome.version} is stored with its own scores but not promoted (promote it by hand: "
                f"captionfleet models --root {settings.publish_to} promote {outcome.version}, or publish with "
                "--promote-unjudged)"
            )
            line = refresh.latest_unusable(settings.publish_to, outcome.baseline, outcome.latest_error, kept)
            print(f"error: {line}", file=sys.stderr)
        # 4: stored but not promoted (automation must not take it for a new LATEST); 5: LATEST is unusable.
        return outcome.exit_status()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
