"""The caption API beside a bulk job (worker/bulk_api.py), without a model: its signal handler.

The job's signal handler runs on the main thread, which in a bulk job is the model thread; a second Ctrl-C
or SIGTERM can arrive while the first one's handler is still running (Python runs the handler again, from
inside the first, on the same thread). Whatever the first holds then must not block the second."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from captionfleet.core.settings import WorkerSettings
from captionfleet.worker import bulk_api
from captionfleet.worker.bulk_api import BulkApi


def api_settings() -> WorkerSettings:
    return WorkerSettings.model_validate({"http": {"enabled": True, "port": 0}, "metrics": {"enabled": False}})


class SecondSignal(logging.Handler):
    """Delivers a second signal to ``handler`` while the first one's log line is being written, once."""

    def __init__(self, handler: Callable[[int], None]) -> None:
        super().__init__(logging.WARNING)
        self.handler = handler
        self.delivered = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.delivered:
            self.delivered = True
            self.handler(signal.SIGINT)


def test_a_second_signal_while_the_first_is_handled_returns_and_the_job_stops_once_after_the_drain() -> None:
    stops: list[int] = []
    with BulkApi.open(api_settings()) as api:
        handler = api.on_signal(stops.append)
        second = SecondSignal(handler)
        logger = logging.getLogger(bulk_api.__name__)
        level = logger.level
        logger.addHandler(second)
        logger.setLevel(logging.WARNING)
        try:
            first = threading.Thread(target=handler, args=(signal.SIGTERM,), daemon=True)
            first.start()
            first.join(10)
            assert not first.is_alive(), "the second signal blocked inside the first one's handler: a deadlock"
        finally:
            logger.removeHandler(second)
            logger.setLevel(level)
        assert second.delivered
        assert api.server is not None and api.server.ctx.state.draining  # new requests 503 at once
        assert stops == []  # the job's own stop waits for the drain at the end of its input
        api._end_input()  # the input ends (the job took no more): the drain, then the job's stop
        assert len(stops) == 1 and stops[0] in (signal.SIGTERM, signal.SIGINT)
