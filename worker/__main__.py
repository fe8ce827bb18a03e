"""`captionfleet worker` / `python -m captionfleet.worker`: caption requests from a Kafka topic until SIGTERM
(or, with --source/--out, this pod's shard of an S3 prefix: see worker/bulk_worker.py).

Settings come from WORKER_* variables (see captionfleet/core/settings.py); the flags below override the most
common ones. On SIGTERM or Ctrl-C the worker stops fetching, finishes the batch in flight, flushes
its results, commits and leaves the group, within WORKER_SHUTDOWN__GRACE_S.

Exit codes: 0 stopped cleanly; 1 a fatal error (the broker stopped acknowledging results, the model
thread died): uncommitted work is redone by whoever takes the partitions; 2 bad settings, model or
arguments: nothing was consumed; 75 the grace period ran out with requests unfinished (not committed,
so redone by the next owner).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from captionfleet.core.failures import EXIT_FAILED, EXIT_USAGE
from captionfleet.core.settings import SettingsError, WorkerSettings, load_worker_settings, with_overrides
from captionfleet.core.signals import stop_on_signals

log = logging.getLogger("captionfleet.worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captionfleet worker",
        description="Caption image requests from a Kafka topic; results and dead letters go to Kafka topics.",
        epilog="Every setting is also a WORKER_* environment variable, e.g. WORKER_KAFKA__BOOTSTRAP.",
    )
    p.add_argument("--model", help="checkpoint dir, s3://bucket/prefix, hub id or 'builtin' (WORKER_MODEL__REF)")
    p.add_argument("--bootstrap", help="Kafka brokers, host:port[,host:port] (WORKER_KAFKA__BOOTSTRAP)")
    p.add_argument("--group-id", help="consumer group (WORKER_KAFKA__GROUP_ID)")
    p.add_argument("--request-topic", help="WORKER_KAFKA__REQUEST_TOPIC")
    p.add_argument("--result-topic", help="WORKER_KAFKA__RESULT_TOPIC")
    p.add_argument("--dead-letter-topic", help="WORKER_KAFKA__DEAD_LETTER_TOPIC")
    p.add_argument("--metrics-port", type=int, help="port for /metrics, /healthz, /readyz (WORKER_METRICS__PORT)")
    p.add_argument(
        "--http",
        action="store_true",
        default=None,
        help="also serve the caption API on WORKER_HTTP__PORT, sharing the model with Kafka (WORKER_HTTP__ENABLED)",
    )
    p.add_argument("--log-format", choices=["text", "json"], help="WORKER_LOG_FORMAT")
    p.add_argument(
        "--source",
        help="bulk mode: caption the objects under s3://bucket/prefix/ (this pod's shard) instead of a Kafka topic",
    )
    p.add_argument("--out", help="bulk mode: s3://bucket/prefix/ for the result parts (with --source)")
    p.add_argument(
        "--input-format",
        choices=["tar", "manifest", "parquet-images", "parquet"],
        help="bulk mode: --source is an archive (tar shards, a manifest, a Parquet dataset; default: from its name)",
    )
    return p


def _apply_overrides(settings: WorkerSettings, args: argparse.Namespace) -> WorkerSettings:
    """Command-line flags win over the environment."""
    return with_overrides(
        settings,
        {
            "model.ref": args.model,
            "kafka.bootstrap": args.bootstrap,
            "kafka.group_id": args.group_id,
            "kafka.request_topic": args.request_topic,
            "kafka.result_topic": args.result_topic,
            "kafka.dead_letter_topic": args.dead_letter_topic,
            "metrics.port": args.metrics_port,
            "http.enabled": args.http,
            "log_format": args.log_format or None,
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = _apply_overrides(load_worker_settings(), args)
        if settings.http.enabled:
            settings.http.check_auth()  # before the model loads: an API open beyond loopback needs tokens
    except SettingsError as error:
        print(f"error: bad setting:\n{error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        first = error.errors()[0]
        print(f"error: bad option {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return EXIT_USAGE

    from captionfleet.core.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.source or args.out:
        if not (args.source and args.out and args.source.startswith("s3://") and args.out.startswith("s3://")):
            print(
                "error: bulk mode needs both --source s3://bucket/images/ and --out s3://bucket/captions/",
                file=sys.stderr,
            )
            return EXIT_USAGE
        from captionfleet.worker.bulk_worker import run_bulk_worker

        return run_bulk_worker(settings, args.source, args.out, args.input_format)
    return _serve(settings)


def _stopping(stop: Callable[[], None]) -> Callable[[int], None]:
    """SIGTERM / Ctrl-C: stop fetching, finish the batch in flight, flush, commit and leave the group."""

    def on_signal(signum: int) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()

    return on_signal


def _serve(settings: WorkerSettings) -> int:
    # Imported here: torch and transformers take seconds to import, and --help should not wait for them.
    from kafka.errors import KafkaError, KafkaTimeoutError

    from captionfleet.core.loading import warm_up
    from captionfleet.core.model_store import ModelRefError
    from captionfleet.worker.connectors.kafka import (
        BootstrapError,
        KafkaOutput,
        KafkaSource,
        bootstrap_servers,
        make_producer,
        security_config,
    )
    from captionfleet.worker.fetch import Fetcher
    from captionfleet.worker.hotswap import HotSwapCaptioner
    from captionfleet.worker.http.server import HttpPortError, start_api, worker_name
    from captionfleet.worker.metrics import Health, MetricsPortError, WorkerMetrics, serve_metrics
    from captionfleet.worker.stream.loop import StreamWorker
    from captionfleet.worker.watcher import load_serving_model, start_watcher

    kafka = settings.kafka
    name = worker_name(settings)
    try:
        bootstrap_servers(kafka)
        security_config(kafka)
        fetcher = Fetcher(settings.fetch, s3=settings.s3, max_bytes=settings.images.max_bytes)
    except (BootstrapError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    metrics, health = WorkerMetrics(), Health()
    try:
        server = serve_metrics(settings.metrics, metrics, health)
    except MetricsPortError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            captioner = load_serving_model(settings)  # a .../LATEST ref: the version it names, hot-swappable
        except (ModelRefError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        # Before reporting ready: the first model call's lazy initialisation must not land on requests.
        log.info("model warmed up in %.2fs", warm_up(captioner))
        health.set(model_loaded=True)
        try:
            source = KafkaSource(kafka, name)
            output = KafkaOutput(make_producer(kafka, name), kafka.produce_timeout_s)
        except KafkaTimeoutError as error:  # what kafka-python 3 raises when no bootstrap server answers
            print(
                f"error: no Kafka broker answered at {kafka.bootstrap} ({error}): check WORKER_KAFKA__BOOTSTRAP "
                "and that the brokers are up",
                file=sys.stderr,
            )
            return EXIT_FAILED
        except KafkaError as error:
            print(f"error: Kafka client setup failed: {error}; check the WORKER_KAFKA__* settings", file=sys.stderr)
            return EXIT_USAGE
        worker = StreamWorker(settings, captioner, source, output, fetcher, metrics=metrics, health=health, name=name)
        if isinstance(captioner, HotSwapCaptioner):
            captioner.on_swap(worker.model_swapped)
        api = None
        if settings.http.enabled:  # the caption API, on the same model thread as the stream
            try:
                api = start_api(settings, worker.offer, lambda: worker.model_version, fetcher, metrics, name)
            except (HttpPortError, SettingsError) as error:
                print(f"error: {error}", file=sys.stderr)
                source.close()
                output.close()
                return EXIT_USAGE
        watcher = start_watcher(settings, captioner, metrics)  # polls LATEST; None for a fixed model

        def stop() -> None:
            if api is not None:
                api.ctx.state.drain()  # new API requests get 503 at once; those admitted finish with the stream
            worker.stop()

        try:
            with stop_on_signals(_stopping(stop), on_windows=True):
                report = worker.run()
        except (KafkaError, RuntimeError, OSError) as error:
            log.error("worker stopped: %s", error)
            return EXIT_FAILED
        finally:
            if watcher is not None:
                watcher.stop()
            if api is not None:
                api.drain(timeout_s=2.0)  # their images were answered by the stream's drain: let the responses go
                api.close()
        if report.abandoned:
            # Threads may still be inside a batch or a fetch; do not wait for them past the grace period.
            logging.shutdown()
            os._exit(report.exit_code)
        return report.exit_code
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
