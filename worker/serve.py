"""`captionfleet serve`: the caption API alone (no Kafka): settings -> model -> one pipeline -> HTTP until
SIGTERM, which drains (new requests 503, those being answered finish) within WORKER_SHUTDOWN__GRACE_S.

Exit codes: 0 stopped cleanly; 1 a fatal error (the model thread died); 2 bad settings, model or arguments
(an API reachable beyond loopback without WORKER_HTTP__TOKENS is one); 75 the grace period ran out with
requests unanswered.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

from captionfleet.core.failures import EXIT_USAGE
from captionfleet.core.settings import SettingsError, WorkerSettings, load_worker_settings, with_overrides
from captionfleet.core.signals import stop_on_signals

log = logging.getLogger("captionfleet.serve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captionfleet serve",
        description="Serve the caption API (POST /v1/captions, POST /v1/chat/completions, GET /v1/models) alone.",
        epilog="Every setting is also a WORKER_* environment variable, e.g. WORKER_HTTP__TOKENS (from a Secret).",
    )
    p.add_argument("--model", help="checkpoint dir, s3://bucket/prefix, hub id or 'builtin' (WORKER_MODEL__REF)")
    p.add_argument("--host", help="address to bind (WORKER_HTTP__HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="the API's port (WORKER_HTTP__PORT, default 8080; 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="port for /metrics, /healthz, /readyz (WORKER_METRICS__PORT)")
    p.add_argument("--log-format", choices=["text", "json"], help="WORKER_LOG_FORMAT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = with_overrides(
            load_worker_settings(),
            {
                "model.ref": args.model,
                "http.host": args.host,
                "http.port": args.port,
                "metrics.port": args.metrics_port,
                "log_format": args.log_format or None,
            },
        )
        settings.http.check_auth()
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        first = error.errors()[0]
        print(f"error: bad option {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return EXIT_USAGE

    from captionfleet.core.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return serve(settings)


def serve(settings: WorkerSettings) -> int:
    """Load WORKER_MODEL__REF and run the API until SIGTERM/SIGINT."""
    # Imported here: torch and transformers take seconds to import, and --help should not wait for them.
    from captionfleet.core.loading import warm_up
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.worker.api_worker import ApiWorker
    from captionfleet.worker.http.server import HttpPortError, worker_name
    from captionfleet.worker.metrics import Health, MetricsPortError, WorkerMetrics, serve_metrics
    from captionfleet.worker.watcher import load_serving_model, start_watcher

    name = worker_name(settings)
    metrics, health = WorkerMetrics(), Health(consumer=False)
    try:
        metrics_server = serve_metrics(settings.metrics, metrics, health)
    except MetricsPortError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            captioner = load_serving_model(settings)  # a .../LATEST ref: the version it names, hot-swappable
            worker = ApiWorker(settings, captioner, metrics, health, name)
        except (ModelRefError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        log.info("model warmed up in %.2fs", warm_up(captioner))
        try:
            worker.start()
        except (HttpPortError, SettingsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        watcher = start_watcher(settings, captioner, metrics)  # polls LATEST; None for a fixed model

        def on_signal(signum: int) -> None:
            log.info("signal %s: draining the API", signal.Signals(signum).name)
            worker.stop()

        try:
            with stop_on_signals(on_signal, on_windows=True):
                return worker.run()
        finally:
            if watcher is not None:
                watcher.stop()
    finally:
        if metrics_server is not None:
            metrics_server.close()


if __name__ == "__main__":
    sys.exit(main())
