"""`captionfleet serve`: the caption API alone (no Kafka): settings -> model -> one pipeline -> HTTP until
SIGTERM, which drains (new requests 503, those being answered finish) within WORKER_SHUTDOWN__GRACE_S.

Exit codes: 0 stopped cleanly; 1 a fatal error (the model thread died); 2 bad settings, model or arguments
(an API reachable beyond loopback without WORKER_HTTP__TOKENS is one); 75 the grace period ran out with
requests unanswered.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from pydantic import ValidationError

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.failures import EXIT_FAILED, EXIT_GRACE_EXCEEDED, EXIT_OK, EXIT_USAGE
from captionfleet.core.settings import SettingsError, WorkerSettings, load_worker_settings, with_overrides
from captionfleet.core.signals import stop_on_signals
from captionfleet.worker.lanes import InteractiveItem

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


class _Inbox:
    """serve's pipeline input: the API's images, in the order offered; cancelled ones are dropped here."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def offer(self, item: InteractiveItem) -> None:
        self._queue.put(item)

    def end(self) -> None:
        self._queue.put(self._END)

    def items(self) -> Iterator[object]:
        from captionfleet.worker.http.items import ApiItem

        while (entry := self._queue.get()) is not self._END:
            assert isinstance(entry, ApiItem)
            if entry.cancelled:
                entry.dropped()
                continue
            yield entry


def serve(settings: WorkerSettings, captioner: CaptionModel | None = None) -> int:
    """Run the API until SIGTERM/SIGINT (``captioner``: a loaded model, for tests; else WORKER_MODEL__REF's)."""
    from captionfleet.core.images import ImageLimits
    from captionfleet.core.loading import warm_up
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.worker.accounting import count_image
    from captionfleet.worker.fetch import Fetcher
    from captionfleet.worker.http.items import ApiItem
    from captionfleet.worker.http.server import HttpPortError, start_api
    from captionfleet.worker.messages import Result
    from captionfleet.worker.metrics import Health, MetricsPortError, WorkerMetrics, serve_metrics
    from captionfleet.worker.pipeline import CaptionPipeline, Item
    from captionfleet.worker.sinks import NullSink
    from captionfleet.worker.stream.metered import MeteredCaptioner
    from captionfleet.worker.watcher import load_serving_model, start_watcher

    name = settings.kafka.client_id or f"captionfleet-{socket.gethostname()}-{os.getpid()}"
    try:
        fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    metrics, health = WorkerMetrics(), Health(consumer=False)
    try:
        metrics_server = serve_metrics(settings.metrics, metrics, health)
    except MetricsPortError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if captioner is None:
            try:
                captioner = load_serving_model(settings)
            except (ModelRefError, OSError, ValueError) as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_USAGE
            log.info("model warmed up in %.2fs", warm_up(captioner))
        model = captioner
        metrics.model.info({"version": model.version, "source": model.source})
        health.set(model_loaded=True)

        def answered(item: Item, result: Result) -> None:
            assert isinstance(item, ApiItem)
            count_image(metrics, result)
            if not result.ok:
                metrics.failures.labels(result.error_kind or "fetch").inc()
            item.answer(result)

        inbox = _Inbox()
        pipeline = CaptionPipeline(
            MeteredCaptioner(model, metrics),
            NullSink(),
            settings.batch,
            ImageLimits.from_settings(settings.images),
            on_item_result=answered,
        )
        failure: list[BaseException] = []

        def run_model() -> None:
            try:
                pipeline.run(inbox.items())  # type: ignore[arg-type]
            except BaseException as error:
                log.exception("the model thread failed")
                failure.append(error)
                health.set(failed=str(error) or type(error).__name__)

        try:
            api = start_api(settings, inbox.offer, lambda: model.version, fetcher, metrics, name)
        except (HttpPortError, SettingsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        model_thread = threading.Thread(target=run_model, name="model", daemon=True)
        model_thread.start()
        watcher = start_watcher(settings, model, metrics)  # polls LATEST; None for a fixed model
        stop = threading.Event()

        def on_signal(signum: int) -> None:
            log.info("signal %s: draining the API", signal.Signals(signum).name)
            api.ctx.state.drain()  # from now on 503; the handler only flags, the main thread drains
            health.set(stopping=True)
            stop.set()

        with stop_on_signals(on_signal, on_windows=True):
            while not stop.wait(0.5):
                if failure or not model_thread.is_alive():
                    break
        try:
            if failure:
                return EXIT_FAILED
            drained = api.drain(settings.shutdown.grace_s)
            inbox.end()
            model_thread.join(timeout=5)
            log.info("stopped %s", "cleanly" if drained else "with API requests unanswered")
            return EXIT_OK if drained else EXIT_GRACE_EXCEEDED
        finally:
            api.close()
            if watcher is not None:
                watcher.stop()
    finally:
        if metrics_server is not None:
            metrics_server.close()


if __name__ == "__main__":
    sys.exit(main())
