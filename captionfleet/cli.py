"""`captionfleet` — one console script for every part: caption, worker, serve, train, models, demo, dashboard.

The front door: it dispatches to the applications below it (``worker``, ``trainer``, ``dashboard``) and is
the only place that imports all of them, so no arrow runs from one application up to another.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from captionfleet.core.failures import EXIT_USAGE
from captionfleet.core.settings import SettingsError


def _cmd_serve(argv: list[str]) -> int:
    from captionfleet.worker.serve import main as serve_main

    return serve_main(argv)


def _cmd_train(argv: list[str]) -> int:
    from captionfleet.trainer.__main__ import main as train_main

    return train_main(argv)


def _cmd_worker(argv: list[str]) -> int:
    from captionfleet.worker.__main__ import main as worker_main

    return worker_main(argv)


def _cmd_models(argv: list[str]) -> int:
    from captionfleet.trainer.models_cli import main as models_main

    return models_main(argv)


def _cmd_demo(argv: list[str]) -> int:
    from captionfleet.demo import run_demo

    return run_demo(argv)


def _cmd_dashboard(argv: list[str]) -> int:
    from captionfleet.dashboard.__main__ import main as dashboard_main

    return dashboard_main(argv)


# Subcommands that parse their own options.
OWN_PARSERS: dict[str, Callable[[list[str]], int]] = {
    "worker": _cmd_worker,
    "serve": _cmd_serve,
    "train": _cmd_train,
    "demo": _cmd_demo,
    "dashboard": _cmd_dashboard,
    "models": _cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    from captionfleet.worker.cli import add_caption_parser, run_caption

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in OWN_PARSERS:
        return OWN_PARSERS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="captionfleet", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{caption,worker,serve,train,models,demo,dashboard}"
    )
    add_caption_parser(sub)
    sub.add_parser("worker", help="run a streaming worker (captionfleet worker --help)")
    sub.add_parser("serve", help="serve the caption API alone, no Kafka (captionfleet serve --help)")
    sub.add_parser("train", help="train or fine-tune a model (captionfleet train --help)")
    sub.add_parser("demo", help="caption a generated shapes archive with the built-in model")
    sub.add_parser("models", help="published model versions: list, show, promote, rollback, import")
    sub.add_parser("dashboard", help="serve the Streamlit dashboard (captionfleet dashboard --help)")
    args = parser.parse_args(argv)
    try:
        if args.command == "caption":
            return run_caption(args)
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
