"""``captionfleet models list|show|promote|rollback``: the published versions of one model in object storage.

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
from captionfleet.core.settings import SettingsError
from captionfleet.trainer.registry import Registry, RegistryError, VersionNameError
from captionfleet.trainer.settings import load_trainer_settings

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
    return parser


def _score(row: dict[str, Any], name: str) -> str:
    value = (row.get("scores") or {}).get(name)
    if value is None:
        return "-"
    return f"{value:.1%}" if name == "exact_match" else f"{value:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("", "version", "status", "CIDEr", "BLEU-4", "exact", "parent", "created")
    lines = [header]
    for row in rows:
        parent = row.get("parent") or {}
        lines.append(
            (
                "*" if row.get("latest") else "",
                row["version"],
                row.get("status", "?"),
                _score(row, "cider"),
                _score(row, "bleu4"),
                _score(row, "exact_match"),
                str(parent.get("version") or parent.get("ref") or "-") if isinstance(parent, dict) else str(parent),
                str(row.get("created") or "-"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


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
            version = registry.resolve_version(args.version) if args.version else registry.latest()
            if version is None:
                print(
                    f"error: {registry.root} has no LATEST: name a version (captionfleet models list)", file=sys.stderr
                )
                return EXIT_FAILED
            record = registry.record(version)
            metadata = registry.metadata(version)
            if record is None and metadata is None:
                print(f"error: no version {version!r} in {registry.root} (captionfleet models list)", file=sys.stderr)
                return EXIT_FAILED
            shown = {
                "version": version,
                "latest": version == registry.latest(),
                "record": record or {"status": "incomplete"},
                "captionfleet.json": {k: v for k, v in (metadata or {}).items() if k not in ("history", "training")},
            }
            print(json.dumps(shown, indent=2, default=str))
        elif args.action == "promote":
            version = registry.resolve_version(args.version)
            previous = registry.promote(version, args.reason)
            print(f"LATEST: {previous} -> {version}")
        elif args.action == "rollback":
            to = registry.resolve_version(args.to) if args.to else None
            old, new = registry.rollback(to, args.reason)
            print(f"LATEST: {old} -> {new} (rolled back)")
    except VersionNameError as error:  # a name that matches none or several: the command line's to fix
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, ModelRefError) as error:
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
