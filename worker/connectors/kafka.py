"""Kafka (kafka-python): the request source and the result / dead-letter output.

The stream loop talks to the small protocols of ``worker.stream.ports``, ``Source`` and ``Output``;
this module implements them on a real broker. Tests implement them in memory.

kafka-python 3 runs the group protocol on its own IO thread and calls rebalance listeners there,
while the thread that called ``poll()`` (or ``close()``) waits. Our listener is the async flavour so
it can *await* the offset commit on revocation: the commit then reaches the broker before this
member rejoins, and the partition's next owner starts right after our last result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka import errors as kafka_errors

from captionfleet.core.settings import KafkaSettings
from captionfleet.worker.messages import encode_json, encode_key
from captionfleet.worker.stream.ports import CommitRejectedError, Rebalance

log = logging.getLogger(__name__)

# A commit refused because the group moved on: the partitions' new owners redo the uncommitted work.
_MEMBERSHIP_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.CommitFailedError,
    kafka_errors.RebalanceInProgressError,
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
)


class BootstrapError(ValueError):
    """WORKER_KAFKA__BOOTSTRAP is missing or malformed; the message names the fix."""


class OutputError(Exception):
    """The broker did not acknowledge a result or dead letter: nothing past it may be committed."""


def bootstrap_servers(settings: KafkaSettings) -> list[str]:
    servers = [part.strip() for part in settings.bootstrap.split(",") if part.strip()]
    if not servers:
        raise BootstrapError("WORKER_KAFKA__BOOTSTRAP is empty: set it to host:port, e.g. localhost:9092")
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise BootstrapError(
                f"WORKER_KAFKA__BOOTSTRAP has {server!r}: use host:port[,host:port], e.g. kafka-0.kafka:9092"
            )
    return servers


class KafkaSecurityError(ValueError):
    """The WORKER_KAFKA__ security settings do not fit together; the message names the fix."""


def security_config(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python's security arguments, shared by the consumer and the producer; checked at start-up
    so a missing password or certificate stops the worker with a message, not a stream of reconnects."""
    protocol = settings.security_protocol
    config: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
        if not settings.sasl_username or not password:
            raise KafkaSecurityError(
                f"WORKER_KAFKA__SECURITY_PROTOCOL={protocol} needs WORKER_KAFKA__SASL_USERNAME and "
                "WORKER_KAFKA__SASL_PASSWORD (or set the protocol to PLAINTEXT/SSL)"
            )
        config |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": password,
        }
    tls_files = {
        "SSL_CAFILE": settings.ssl_cafile,
        "SSL_CERTFILE": settings.ssl_certfile,
        "SSL_KEYFILE": settings.ssl_keyfile,
    }
    given = {name: path for name, path in tls_files.items() if path is not None}
    if given and not protocol.endswith("SSL"):
        raise KafkaSecurityError(
            f"WORKER_KAFKA__{next(iter(given))} is set but WORKER_KAFKA__SECURITY_PROTOCOL={protocol} does not "
            "use TLS: set the protocol to SSL or SASL_SSL, or unset the file"
        )
    for name, path in given.items():
        if not path.is_file():
            raise KafkaSecurityError(f"WORKER_KAFKA__{name}={path} is not a readable file: mount it or fix the path")
        config[name.lower()] = str(path)
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        raise KafkaSecurityError(
            "mutual TLS needs both WORKER_KAFKA__SSL_CERTFILE and WORKER_KAFKA__SSL_KEYFILE (or neither)"
        )
    return config


def consumer_config(settings: KafkaSettings, client_id: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": client_id,
        "group_id": settings.group_id,
        # Offsets are committed by the stream loop, after the results they cover are acknowledged.
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "max_poll_records": settings.max_poll_records,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        # Topics are created by whoever owns them; a typo must not silently create an empty one.
        "allow_auto_create_topics": False,
    }
    if settings.group_instance_id:
        config["group_instance_id"] = settings.group_instance_id
    return config | security_config(settings)


def make_producer(settings: KafkaSettings, client_id: str) -> KafkaProducer:
    # Answers sent during a broker outage wait in the producer (retried by it) for the outage budget; a
    # flush still gives up after produce_timeout_s (KafkaOutput), and the stream loop does not flush while
    # the broker is known to be down.
    delivery_ms = int(max(settings.produce_timeout_s, settings.outage_budget_s) * 1000)
    return KafkaProducer(
        bootstrap_servers=bootstrap_servers(settings),
        client_id=client_id,
        # Acknowledged by every in-sync replica: "acknowledged by the broker" must survive a broker loss.
        acks="all",
        # Idempotence (kafka-python's default) keeps retried sends from duplicating results.
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        delivery_timeout_ms=delivery_ms,
        max_request_size=settings.max_message_bytes,
        # kafka-python requires delivery > linger + request timeout: leave room for a retry or two.
        request_timeout_ms=max(500, min(30_000, delivery_ms // 2 - settings.linger_ms)),
        **security_config(settings),
    )


class KafkaOutput:
    """Results and dead letters through one idempotent producer.

    ``send`` may buffer; ``flush`` returns only when everything sent so far is acknowledged by the
    broker, and raises OutputError otherwise (the quix-streams / bytewax sink contract).
    """

    def __init__(self, producer: KafkaProducer, timeout_s: float) -> None:
        self._producer = producer
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._errors: list[str] = []

    def send(self, topic: str, key: str, value: dict[str, Any]) -> None:
        future = self._producer.send(topic, key=encode_key(key), value=encode_json(value))
        future.add_errback(self._failed, topic, key)

    def _failed(self, topic: str, key: str, error: Exception) -> None:
        with self._lock:
            self._errors.append(f"{topic} key={key}: {error}")

    def flush(self, timeout_s: float | None = None) -> bool:
        # timeout_s: a caller's own deadline (a revocation, a periodic commit); running out of it is not a
        # broker failure.
        try:
            self._producer.flush(timeout=self._timeout_s if timeout_s is None else timeout_s)
        except kafka_errors.KafkaTimeoutError as error:
            if timeout_s is not None:
                return False
            raise OutputError(
                f"the broker did not acknowledge results within {self._timeout_s}s "
                "(WORKER_KAFKA__PRODUCE_TIMEOUT_S): is it reachable?"
            ) from error
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise OutputError(f"{len(errors)} results were not delivered, e.g. {errors[0]}")
        return True

    def close(self) -> None:
        self._producer.close(timeout=self._timeout_s)


class KafkaSource:
    """The request topic through a consumer group; offsets are committed only when told."""

    def __init__(self, settings: KafkaSettings, client_id: str, consumer: KafkaConsumer | None = None) -> None:
        self.settings = settings
        self.consumer = consumer or KafkaConsumer(**consumer_config(settings, client_id))

    def subscribe(self, handler: Rebalance) -> None:
        self.consumer.subscribe([self.settings.request_topic], listener=_Listener(self.consumer, handler))

    def poll(self, timeout_s: float, max_records: int) -> list[Any]:
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [record for records in batches.values() for record in records]

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.consumer.resume(*partitions)

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        # Bounded: a broker that stopped answering since the last look must not hold the consumer thread
        # (and /readyz with it) for the consumer's request timeout, nor fail the worker; the commit is put off.
        timeout_ms = min(5_000, self.settings.session_timeout_ms // 2)
        try:
            self.consumer.commit(offsets=_offsets(offsets), timeout_ms=timeout_ms)
        except _MEMBERSHIP_ERRORS as error:
            raise CommitRejectedError(str(error)) from error
        except kafka_errors.KafkaTimeoutError as error:
            raise CommitRejectedError(f"the broker did not answer the commit within {timeout_ms} ms") from error

    def highwater(self, partition: TopicPartition) -> int | None:
        # Not end_offsets(): some brokers (the test broker among them) answer it with the last batch's
        # base offset + 1. The high watermark comes with every fetch response.
        try:
            value = self.consumer.highwater(partition)
        except kafka_errors.IllegalStateError:  # no longer assigned
            return None
        return int(value) if value is not None else None

    def silent_for_s(self) -> float | None:
        # kafka-python has no public view of this: its group coordinator's heartbeat record. Its timestamps
        # are the last heartbeat answer and the last reset, which it does when it finds the coordinator or
        # completes a join (both answers from the broker too). Anything unexpected there reads as unknown.
        coordinator = getattr(self.consumer, "_coordinator", None)
        heartbeat = getattr(coordinator, "heartbeat", None)
        try:
            if coordinator is None or heartbeat is None:
                return None
            if coordinator.coordinator_id is not None and not coordinator.stable():
                return None  # joining: heartbeats pause until the join completes
            if not getattr(coordinator, "_heartbeat_enabled", True):
                return None  # turned off (a fenced static member): silence is not the broker's
            return max(0.0, time.monotonic() - max(heartbeat.last_receive, heartbeat.last_reset))
        except (AttributeError, TypeError):
            return None

    def close(self) -> None:
        # autocommit=False: everything worth committing was committed by the stream loop.
        self.consumer.close(autocommit=False)


def _offsets(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's IO thread while the stream loop's thread waits in poll() or close()."""

    def __init__(self, consumer: KafkaConsumer, handler: Rebalance) -> None:
        self._consumer = consumer
        self._handler = handler

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = sorted(revoked)
        committed = False
        offsets = self._handler.revoking(partitions)
        if offsets:
            try:
                # Awaited, so it lands before our JoinGroup; a blocking commit() is not allowed here.
                await self._consumer.commit_async(offsets=_offsets(offsets))
                committed = True
            except Exception as error:  # the group moved on already: the new owner redoes that work
                log.warning("commit on revocation of %s failed: %s (duplicates possible)", partitions, error)
        self._handler.revoked(partitions, offsets if committed else {})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._handler.assigned(sorted(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self._handler.lost(sorted(lost))
