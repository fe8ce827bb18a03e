"""``captionfleet models list|show|promote|rollback|import``: the published versions of one model in object storage.

The registry root (``s3://bucket/models/<name>``) comes from ``--root`` or TRAINER_PUBLISH_TO; S3
access from the TRAINER_S3__* settings (endpoint, keys), as for ``captionfleet train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.failures import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.registry_layout import VERSIONS
from captionfleet.core.s3 import is_storage_error
from captionfleet.core.settings import SettingsError
from captionfleet.trainer.registry import Registry, RegistryError, VersionNameError
from captionfleet.trainer.settings import TrainerSettings, load_trainer_settings

IMPORT_HELP = (
    "Upload SRC as a new version (its recorded version, else <name>-<weights hash>), record it (family, "
    "processor, default prompt, precision) and pass it through the same gate as a trained version. Exit "
    "status: 0 promoted, 4 stored but not promoted, 5 LATEST cannot be loaded, 2 SRC cannot be used, 1 failed."
)
VERSION_HELP = "a version's full name or an unambiguous start of it (e.g. captioner-3f2a)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captionfleet models", description=__doc__)
    parser.add_argument("--root", help="s3://bucket/models/<name> (default: TRAINER_PUBLISH_TO)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every version: status, scores, parent, date, which is LATEST")
    show = sub.add_parser("show", help="one version's record and captionfleet.json (default: LATEST)")
    show.add_argument("version", nargs="?", help=VERSION_HELP)
    promote = sub.add_parser("promote", help="make a stored version LATEST, whatever its gate said")
    promote.add_argument("version", help=VERSION_HELP)
    promote.add_argument("--reason", default="", help="recorded in the history")
    rollback = sub.add_parser("rollback", help="LATEST back to the version before it (or --to VERSION)")
    rollback.add_argument("--to", help=f"a stored version; {VERSION_HELP}")
    rollback.add_argument("--reason", default="", help="recorded in the history")
    imported = sub.add_parser(
        "import",
        help="publish an existing checkpoint (folder, s3://, hub id, builtin) through the quality gate",
        description=IMPORT_HELP,
    )
    imported.add_argument("source", metavar="SRC", help="a checkpoint folder, s3://bucket/prefix, hub id or builtin")
    imported.add_argument(
        "--name", help="names the version of a checkpoint without a recorded one (default: the registry's name)"
    )
    imported.add_argument(
        "--promote",
        action="store_true",
        help="make it LATEST also when the gate cannot judge it (no evaluation set, a family this captionfleet "
        "cannot score, LATEST unloadable); a version the gate judged worse stays out (models promote does that)",
    )
    return parser


def _score(row: dict[str, Any], name: str) -> str:
    value = (row.get("scores") or {}).get(name)
    if value is None:
        return "-"
    return f"{value:.1%}" if name == "exact_match" else f"{value:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("", "version", "status", "family", "CIDEr", "BLEU-4", "exact", "parent", "created")
    lines = [header]
    for row in rows:
        parent = row.get("parent") or {}
        lines.append(
            (
                "*" if row.get("latest") else "",
                row["version"],
                row.get("status", "?"),
                str((row.get("model") or {}).get("family") or "-"),  # records before families: "-"
                _score(row, "cider"),
                _score(row, "bleu4"),
                _score(row, "exact_match"),
                str(parent.get("version") or parent.get("ref") or "-") if isinstance(parent, dict) else str(parent),
                str(row.get("created") or "-"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _show(registry: Registry, name: str | None) -> int:
    version = registry.resolve_version(name) if name else registry.latest()
    if version is None:
        print(f"error: {registry.root} has no LATEST: name a version (captionfleet models list)", file=sys.stderr)
        return EXIT_FAILED
    record = registry.record(version)
    metadata = registry.metadata(version)
    if record is None and metadata is None:
        print(f"error: no version {version!r} in {registry.root} (captionfleet models list)", file=sys.stderr)
        return EXIT_FAILED
    model = model_of(registry, version, record)
    shown = {
        "version": version,
        "latest": version == registry.latest(),
        "family": model.get("family", "unknown"),
        "model": model,
        "record": record or {"status": "incomplete"},
        "captionfleet.json": {k: v for k, v in (metadata or {}).items() if k not in ("history", "training")},
    }
    print(json.dumps(shown, indent=2, default=str))
    return EXIT_OK


def model_of(registry: Registry, version: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """What the version is (family, processor, default prompt, precision) as its record says; records
    written before they said it get the family from the version's config.json."""
    if record and isinstance(record.get("model"), dict):
        return dict(record["model"])
    try:
        config = registry.get_json(registry.key(VERSIONS, version, "config.json")) or {}
    except ValueError:  # not JSON: the version is broken, which the record shows; the family is unknown
        config = {}
    return {"family": str(config.get("model_type") or "unknown")}


def _import(registry: Registry, settings: TrainerSettings, args: argparse.Namespace) -> int:
    # Imported here: publishing loads models (torch, transformers), which list and show never need.
    from captionfleet.trainer.model_import import import_checkpoint
    from captionfleet.trainer.refresh import latest_unusable

    outcome = import_checkpoint(args.source, registry, settings, name=args.name, promote=args.promote)
    print(outcome.line())
    if outcome.promoted:
        return EXIT_OK
    promote = f"captionfleet models --root {registry.root} promote {outcome.version}"
    if outcome.latest_error is not None and outcome.baseline is not None:
        kept = f"{outcome.version} is stored but not promoted (promote it by hand: {promote}, or import with --promote)"
        print(f"error: {latest_unusable(registry.root, outcome.baseline, outcome.latest_error, kept)}", file=sys.stderr)
    elif not outcome.judged:
        print(
            f"error: {outcome.version} is stored but not LATEST: the gate could not judge it; import it again with "
            f"--promote, or {promote}",
            file=sys.stderr,
        )
    return outcome.exit_status()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_trainer_settings()
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    root = args.root or settings.publish_to
    if not root:
        print("error: no registry: pass --root s3://bucket/models/<name> or set TRAINER_PUBLISH_TO", file=sys.stderr)
        return EXIT_USAGE
    try:
        registry = Registry(root, settings.s3)
        if args.action == "list":
            rows = registry.versions()
            if not rows:
                print(f"no versions under {registry.root} yet: publish one with captionfleet train --publish-to")
            else:
                print(format_table(rows))
                print(f"(* = LATEST, {registry.root}/LATEST)")
        elif args.action == "show":
            return _show(registry, args.version)
        elif args.action == "promote":
            version = registry.resolve_version(args.version)
            previous = registry.promote(version, args.reason)
            print(f"LATEST: {previous} -> {version}")
        elif args.action == "rollback":
            to = registry.resolve_version(args.to) if args.to else None
            old, new = registry.rollback(to, args.reason)
            print(f"LATEST: {old} -> {new} (rolled back)")
        elif args.action == "import":
            return _import(registry, settings, args)
    except VersionNameError as error:  # a name that matches none or several: the command line's to fix
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ModelRefError as error:
        print(f"error: {error}", file=sys.stderr)
        # An import's SRC that cannot be used: nothing to retry, unless the store failed while reading it.
        return EXIT_FAILED if args.action != "import" or is_storage_error(error) else EXIT_USAGE
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ClientError, BotoCoreError) as error:
        print(
            f"error: object storage: {error}; check the root, TRAINER_S3__ENDPOINT_URL and the credentials",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
