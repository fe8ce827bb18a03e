"""The stream's answers: each request's result record, or a dead letter saying why there is none, shaped
(``fit_value``) to fit the topics' message size limit and sent on the output.

Called by the consumer thread only, which owns the output's sends (see the package note).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from captionfleet.core.settings import KafkaSettings
from captionfleet.worker.messages import Result, encoding_problem, fit_value
from captionfleet.worker.metrics import WorkerMetrics
from captionfleet.worker.stream.items import Origin, StreamItem, where
from captionfleet.worker.stream.ports import Output

# The stream's one logger name for all its modules (captionfleet.worker.stream): log queries match on it.
log = logging.getLogger(__package__)

_TIMINGS = ("fetch_ms", "decode_ms", "queue_ms", "inference_ms")


class Answers:
    """``model_version``: the version a dead letter names (the serving model's, which a hot swap changes)."""

    def __init__(
        self,
        output: Output,
        kafka: KafkaSettings,
        metrics: WorkerMetrics,
        worker: str,
        model_version: Callable[[], str],
    ) -> None:
        self.output = output
        self.metrics = metrics
        self.worker = worker
        self._model_version = model_version
        self._result_topic = kafka.result_topic
        self._dead_letter_topic = kafka.dead_letter_topic
        # Room for the key (ids are at most 1024 characters, 4 bytes each in UTF-8) and the record's framing.
        self._max_value_bytes = kafka.max_message_bytes - 8 * 1024

    def result(self, item: StreamItem, result: Result, end_to_end_ms: float | None) -> str | None:
        """Send a captioned request's result, keyed by its id. Returns why it could not be shaped, or None.

        A request whose passed-through fields cannot be encoded (nested past the recursion limit) gets
        no result: the caller sends its dead letter, with a summary of those fields, instead of an error
        that would stop the worker at this offset after every restart."""
        row = result.to_row()
        for absent in ("error_kind", "error_message"):
            row.pop(absent)
        row.update(metadata=item.request.metadata, end_to_end_ms=end_to_end_ms, worker=self.worker)
        problem = encoding_problem(row)
        if problem is not None:
            return f"its answer could not be encoded as JSON ({problem}); its fields are summarised here"
        self.output.send(self._result_topic, item.id, fit_value(row, self._max_value_bytes))
        return None

    def dead_letter(
        self,
        origin: Origin,
        request_id: str | None,
        uri: str | None,
        kind: str,
        message: str,
        *,
        original: Any,
        metadata: dict[str, Any],
        result: Result | None,
    ) -> None:
        """Send (and count) the dead letter of a request that failed, or of a message that could not be read
        (no id)."""
        value: dict[str, Any] = {
            "id": request_id,
            "uri": uri,
            "kind": kind,
            "message": message,
            "request": original,
            "metadata": metadata,
            "source": {**origin.fields(), "timestamp_ms": origin.timestamp_ms},
            "model_version": self._model_version(),
            # The prompt as asked (so a consumer can match the dead letter to what it sent); None for a
            # message that could not be read (its prompt, if any, is in ``request``).
            "prompt": result.prompt if result is not None else None,
            "worker": self.worker,
        }
        if result is not None:
            value["timings"] = {name: getattr(result, name) for name in _TIMINGS}
            value["bytes"] = result.bytes
        # Without an id (a message we could not read), its coordinates are the key: unique and findable.
        key = request_id if request_id is not None else f"{origin.topic}/{origin.partition}/{origin.offset}"
        self.output.send(self._dead_letter_topic, key, fit_value(value, self._max_value_bytes))
        self.metrics.failures.labels(kind).inc()
        log.warning(
            "failed id=%s uri=%s kind=%s at %s: %s",
            request_id,
            uri,
            kind,
            where(origin),
            message,
            extra={"id": request_id, "uri": uri, "kind": kind, **origin.fields()},
        )
