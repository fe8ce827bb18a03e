"""The Kafka connector's configuration and output contract, without a broker (the real one is in
tests/integration/test_stream_*.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError

from captionfleet.core.settings import KafkaSettings
from captionfleet.worker.connectors.kafka import BootstrapError, KafkaOutput, bootstrap_servers, consumer_config
from captionfleet.worker.messages import encode_json


def test_consumer_commits_nothing_by_itself() -> None:
    config = consumer_config(KafkaSettings(bootstrap="a:9092, b:9093", group_id="g"), "worker-1")
    assert config["enable_auto_commit"] is False
    assert config["bootstrap_servers"] == ["a:9092", "b:9093"]
    assert config["group_id"] == "g" and config["client_id"] == "worker-1"
    assert "group_instance_id" not in config


def test_static_membership_is_opt_in() -> None:
    config = consumer_config(KafkaSettings(bootstrap="a:9092", group_instance_id="worker-0"), "w")
    assert config["group_instance_id"] == "worker-0"


@pytest.mark.parametrize("value", ["", " , ", "kafka", "kafka:port", ":9092"])
def test_bootstrap_errors_name_the_fix(value: str) -> None:
    with pytest.raises(BootstrapError, match="WORKER_KAFKA__BOOTSTRAP"):
        bootstrap_servers(KafkaSettings(bootstrap=value))


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_errback(self, callback: Any, *args: Any) -> None:
        if self.error is not None:
            callback(*args, self.error)


class FakeProducer:
    def __init__(self, fail: Exception | None = None, flush_error: Exception | None = None) -> None:
        self.fail = fail
        self.flush_error = flush_error
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes) -> FakeFuture:
        self.sent.append((topic, key, value))
        return FakeFuture(self.fail)

    def flush(self, timeout: float) -> None:
        if self.flush_error is not None:
            raise self.flush_error

    def close(self, timeout: float) -> None:
        pass


def test_output_sends_json_keyed_by_id() -> None:
    producer = FakeProducer()
    output = KafkaOutput(producer, timeout_s=1)  # type: ignore[arg-type]
    output.send("results", "id-é", {"id": "id-é", "caption": "a cat", "n": 1})
    output.flush()
    assert producer.sent == [("results", "id-é".encode(), encode_json({"id": "id-é", "caption": "a cat", "n": 1}))]


def test_flush_raises_when_a_send_was_not_acknowledged() -> None:
    output = KafkaOutput(FakeProducer(fail=RuntimeError("NotEnoughReplicas")), timeout_s=1)  # type: ignore[arg-type]
    output.send("results", "x", {"id": "x"})
    with pytest.raises(Exception, match="NotEnoughReplicas"):
        output.flush()
    output.flush()  # reported once; later flushes are about later sends


def test_flush_timeout_names_the_setting() -> None:
    output = KafkaOutput(FakeProducer(flush_error=KafkaTimeoutError()), timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="WORKER_KAFKA__PRODUCE_TIMEOUT_S"):
        output.flush()


def test_fit_value_summarises_passed_through_fields_then_cuts_long_text() -> None:
    from captionfleet.worker.messages import fit_value

    small = {"id": "a", "metadata": {"album": 7}}
    assert fit_value(small, 1000) is small
    big = {"id": "a", "uri": "s3://b/" + "k" * 5000, "request": {"blob": "x" * 5000}, "metadata": {"m": "y" * 5000}}
    fitted = fit_value(big, 4000)
    assert fitted["request"]["truncated"] and fitted["metadata"]["truncated"]
    assert fitted["uri"].endswith("...[truncated]") and len(encode_json(fitted)) <= 4000
    assert big["request"] == {"blob": "x" * 5000}  # the original is not changed
