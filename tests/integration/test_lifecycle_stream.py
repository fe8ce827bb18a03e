"""Hot swap in a running streaming worker (`python -m captionfleet.worker`), against the real broker and S3 server.

The worker follows s3://…/models/tiny/LATEST. Under steady traffic: LATEST moves to a new version and
results switch from the old version to the new one with nothing lost or failed; then LATEST names a
version with only pickled weights, then one with files missing: the worker keeps serving, and its
logs and metrics say why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captionfleet.trainer.checkpoint import weights_version
from captionfleet.trainer.registry import Registry, now
from tests.conftest import save_tiny_checkpoint
from tests.hostile_images import jpeg_bytes
from tests.integration.stream_support import AnswerReader, Traffic, WorkerProcess, make_topics, new_port, worker_env
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3
from tests.unit.stream_fakes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

IMAGES = 5


def publish_unchecked(registry: Registry, folder: Path, version: str | None = None) -> str:
    """Upload + record + LATEST, without the gate (the gate has its own test)."""
    version = version or weights_version(folder, "tiny")
    for path in sorted(folder.iterdir()):
        registry.client.upload_file(str(path), registry.bucket, registry.key("versions", version, path.name))
    registry.put_json(registry.key("versions", version, "captionfleet.json"), {"version": version, "name": "tiny"})
    registry.write_record(version, {"version": version, "status": "candidate", "created": now()})
    registry.set_latest(version, action="test")
    return version


@pytest.fixture
def setup(
    kafka_broker: KafkaBroker, kafka_names: dict[str, str], s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    make_topics(kafka_broker, kafka_names, partitions=1)
    client = s3_server.client()
    for i in range(IMAGES):
        client.put_object(Bucket=s3_bucket, Key=f"img/{i}.jpg", Body=jpeg_bytes())
    registry = Registry(f"s3://{s3_bucket}/models/tiny", s3_settings(s3_server))
    reader = AnswerReader(kafka_broker, kafka_names)
    env = worker_env(
        kafka_broker,
        kafka_names,
        s3_server,
        s3_bucket,
        tmp_path / "unused",
        tmp_path / "cache",
        "follower",
        new_port(),
        WORKER_MODEL__REF=f"{registry.root}/LATEST",
        WORKER_MODEL__POLL_INTERVAL_S="0.5",
        # One fetch thread on one partition: requests reach the model in the order they were sent,
        # so the switch between versions shows as one boundary in that order.
        WORKER_FETCH__CONCURRENCY="1",
    )
    state: dict[str, Any] = {"registry": registry, "reader": reader, "env": env, "workers": []}
    yield state
    for worker in state["workers"]:
        worker.close()
    reader.close()


def test_results_switch_versions_under_traffic_and_bad_versions_never_serve(
    setup: dict[str, Any], kafka_broker: KafkaBroker, kafka_names: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    registry: Registry = setup["registry"]
    reader: AnswerReader = setup["reader"]
    v1 = publish_unchecked(registry, save_tiny_checkpoint(tmp_path / "v1", seed=0))
    worker = WorkerProcess(setup["env"], tmp_path / "follower.log")
    setup["workers"].append(worker)
    worker.wait_ready()
    traffic = Traffic(kafka_broker, kafka_names["requests"], [f"s3://{s3_bucket}/img/{i}.jpg" for i in range(IMAGES)])

    def results_of(version: str, at_least: int) -> Any:
        return lambda answers: sum(m["model_version"] == version for m in answers.results) >= at_least

    def metric(name: str) -> float:
        return worker.metrics().get((name, ()), 0.0)

    try:
        reader.wait(results_of(v1, 10), 120, worker)
        v2 = publish_unchecked(registry, save_tiny_checkpoint(tmp_path / "v2", seed=1))
        assert v2 != v1
        reader.wait(results_of(v2, 10), 120, worker)

        # LATEST -> only pickled weights: refused before anything is downloaded.
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "config.json").write_text((tmp_path / "v2" / "config.json").read_text())
        (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        publish_unchecked(registry, pickled, "tiny-pickled")
        wait_for(lambda: metric("captionfleet_model_load_failures_total") >= 1, 60, what="the pickled version refused")

        # LATEST -> weights and config but no tokenizer or image processor: the load fails.
        incomplete = tmp_path / "incomplete"
        incomplete.mkdir()
        for name in ("config.json", "model.safetensors"):
            (incomplete / name).write_bytes((tmp_path / "v2" / name).read_bytes())
        publish_unchecked(registry, incomplete, "tiny-incomplete")
        wait_for(
            lambda: metric("captionfleet_model_load_failures_total") >= 2, 60, what="the incomplete version refused"
        )

        # Still serving v2, under the same traffic.
        served = sum(m["model_version"] == v2 for m in reader.answers().results)
        reader.wait(results_of(v2, served + 10), 120, worker)
    finally:
        sent = traffic.stop()
    answers = reader.wait(lambda a: set(sent) <= set(a.ids()), 120, worker)
    assert worker.get("/readyz") == (200, "ok\n")
    metrics = worker.metrics()
    assert worker.terminate() == 0

    # Nothing lost, nothing failed, nothing answered twice.
    assert answers.dead == []
    assert sorted(answers.ids().elements()) == sorted(sent)
    # In the order sent: v1 up to one point, v2 from there on; never a broken version.
    versions = [m["model_version"] for m in sorted(answers.results, key=lambda m: m["id"])]
    switch = versions.index(v2)
    assert set(versions[:switch]) == {v1} and set(versions[switch:]) == {v2}
    assert all(m["caption"] is not None for m in answers.results)

    # Metrics: one swap, the info metric names v2, two failed loads with the last one's reason.
    assert metrics[("captionfleet_model_swaps_total", ())] == 1
    infos = [dict(labels) for (name, labels) in metrics if name == "captionfleet_model_info"]
    assert [info["version"] for info in infos] == [v2]
    assert metrics[("captionfleet_model_load_failures_total", ())] == 2
    failure = next(dict(labels) for (name, labels) in metrics if name == "captionfleet_model_load_failure_info")
    assert failure["version"] == "tiny-incomplete"

    # The logs say why, naming each version.
    errors = [line["message"] for line in worker.log_lines() if "failed to load" in line.get("message", "")]
    assert any("tiny-pickled" in e and "pickled" in e.split("failed to load", 1)[1] for e in errors), errors
    assert any("tiny-incomplete" in e for e in errors), errors
    assert all(f"still serving {v2}" in e for e in errors), errors
    # A broken version is tried once, not at every poll.
    assert len(errors) == 2
