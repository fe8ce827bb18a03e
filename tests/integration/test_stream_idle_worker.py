"""More workers than partitions (a rollout's surge pod with KEDA at its maximum): the worker left
without a partition joins the group and reports ready, so a rolling update never waits on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.stream_support import WorkerProcess, make_topics, new_port, worker_env
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3
from tests.unit.stream_fakes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ASSIGNED = ("captionfleet_assigned_partitions", ())


def test_a_worker_without_partitions_is_ready(
    kafka_broker: KafkaBroker,
    kafka_names: dict[str, str],
    s3_server: SeaweedS3,
    s3_bucket: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    make_topics(kafka_broker, kafka_names, partitions=1)
    workers: list[WorkerProcess] = []
    try:
        for name in ("first", "second"):
            env = worker_env(
                kafka_broker, kafka_names, s3_server, s3_bucket, tiny_checkpoint, tmp_path / "cache", name, new_port()
            )
            workers.append(WorkerProcess(env, tmp_path / f"{name}.log"))
            workers[-1].wait_ready()
        first, second = workers

        def one_owner() -> bool:
            return sorted(w.metrics().get(ASSIGNED, -1) for w in workers) == [0, 1]

        wait_for(one_owner, 60, what="the single partition owned by exactly one of the two workers")
        idle = first if first.metrics()[ASSIGNED] == 0 else second
        status, why = idle.get("/readyz")
        assert status == 200 and "no partitions" in why
        assert idle.get("/healthz")[0] == 200
        for worker in workers:
            assert worker.terminate() == 0
    finally:
        for worker in workers:
            worker.close()
