"""Hot swap across families under streaming load, as an operator runs it, against the real broker and S3 server.

A worker (`python -m captionfleet.worker`) follows s3://…/models/tiny/LATEST, serving a tiny ViT-GPT2 under
steady traffic. `captionfleet models import` publishes a tiny BLIP (another family, another input size,
another processor) with --promote: the worker hot-swaps to it; `models show` names its family, and so does
the dashboard's model line. `captionfleet models rollback` brings ViT-GPT2 back, and the worker swaps back.
Then the same for a decoder-only family with a default prompt, qwen2_vl: imported, swapped to, rolled back.
Nothing is lost or answered twice, and every result's caption is the one its model_version's model gives
that picture alone (checked against the three models loaded in this process). Every other family makes the
same round trip under a streaming load in tests/unit/test_swap_every_family.py, with an in-memory source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from captionfleet.cli import main as cli_main
from captionfleet.trainer.checkpoint import weights_version
from tests.conftest import save_tiny_checkpoint
from tests.integration.stream_models import PRECISION, caption_alone, load, png_pictures
from tests.integration.stream_support import AnswerReader, Traffic, WorkerProcess, make_topics, new_port, worker_env
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3
from tests.unit.test_dashboard_uploads import APP

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

IMAGES = 5
SERVED = 10  # results of each model before the next step


@pytest.fixture
def models_cli(
    s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``captionfleet models --root ROOT ARGS...`` in this process -> (exit status, stdout, stderr)."""
    for name, value in (
        ("TRAINER_S3__ENDPOINT_URL", s3_server.endpoint_url),
        ("TRAINER_S3__ACCESS_KEY_ID", s3_server.access_key),
        ("TRAINER_S3__SECRET_ACCESS_KEY", s3_server.secret_key),
        ("TRAINER_CACHE_DIR", str(tmp_path / "trainer-cache")),
        ("TRAINER_DEVICE", "cpu"),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRAINER_PUBLISH_TO", raising=False)

    def run(root: str, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(["models", "--root", root, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def setup(
    kafka_broker: KafkaBroker, kafka_names: dict[str, str], s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    make_topics(kafka_broker, kafka_names, partitions=1)
    reader = AnswerReader(kafka_broker, kafka_names)
    root = f"s3://{s3_bucket}/models/tiny"
    env = worker_env(
        kafka_broker,
        kafka_names,
        s3_server,
        s3_bucket,
        tmp_path / "unused",
        tmp_path / "worker-cache",
        "follower",
        new_port(),
        WORKER_MODEL__REF=f"{root}/LATEST",
        WORKER_MODEL__POLL_INTERVAL_S="0.5",
        WORKER_MODEL__PRECISION=PRECISION,
        # One fetch thread on one partition: requests reach the model in the order they were sent, so each
        # switch between models shows as one boundary in that order.
        WORKER_FETCH__CONCURRENCY="1",
    )
    state: dict[str, Any] = {"root": root, "reader": reader, "env": env, "workers": []}
    yield state
    for worker in state["workers"]:
        worker.close()
    reader.close()


def dashboard_model_line(root: str, s3_server: SeaweedS3, cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The dashboard's model line, the dashboard following the same LATEST as the worker."""
    for name, value in {
        "WORKER_MODEL__REF": f"{root}/LATEST",
        "WORKER_MODEL__DEVICE": "cpu",
        "WORKER_MODEL__CACHE_DIR": str(cache),
        "WORKER_S3__ENDPOINT_URL": s3_server.endpoint_url,
        "WORKER_S3__ACCESS_KEY_ID": s3_server.access_key,
        "WORKER_S3__SECRET_ACCESS_KEY": s3_server.secret_key,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("DASHBOARD_PROMETHEUS__URL", "DASHBOARD_SCRAPE__URLS"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    (line,) = [c.value for c in at.caption if c.value.startswith("Model ")]
    return str(line)


def test_a_worker_swaps_to_another_family_and_back_under_traffic(
    setup: dict[str, Any],
    models_cli: Callable[..., tuple[int, str, str]],
    kafka_broker: KafkaBroker,
    kafka_names: dict[str, str],
    s3_server: SeaweedS3,
    s3_bucket: str,
    tiny_family: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, reader = setup["root"], setup["reader"]
    ved_dir, blip_dir, qwen_dir = (
        save_tiny_checkpoint(tmp_path / "ved", seed=0),
        tiny_family("blip"),
        tiny_family("qwen2_vl"),
    )
    ved, blip, qwen = load(ved_dir), load(blip_dir), load(qwen_dir)
    # Pictures every model captions with some text (an empty caption is a failure row, not a result).
    candidates = png_pictures(3 * IMAGES)
    images = [data for data in candidates if all(caption_alone(m, data) for m in (ved, blip, qwen))][:IMAGES]
    assert len(images) == IMAGES
    client = s3_server.client()
    for i, data in enumerate(images):
        client.put_object(Bucket=s3_bucket, Key=f"img/{i}.png", Body=data)

    code, out, err = models_cli(root, "import", str(ved_dir), "--name", "ved", "--promote")
    assert code == 0, err
    ved_version = weights_version(ved_dir, "ved")
    worker = WorkerProcess(setup["env"], tmp_path / "follower.log")
    setup["workers"].append(worker)
    worker.wait_ready()
    traffic = Traffic(kafka_broker, kafka_names["requests"], [f"s3://{s3_bucket}/img/{i}.png" for i in range(IMAGES)])

    def served(version: str, at_least: int) -> Callable[[Any], bool]:
        return lambda answers: sum(m["model_version"] == version for m in answers.results) >= at_least

    try:
        reader.wait(served(ved_version, SERVED), 180, worker)

        # Another family becomes LATEST through the same import and gate (unjudged: no evaluation set).
        code, out, err = models_cli(root, "import", str(blip_dir), "--name", "blip", "--promote")
        assert code == 0, err
        blip_version = weights_version(blip_dir, "blip")
        assert out.startswith(f"{blip_version}: promoted to LATEST"), out
        reader.wait(served(blip_version, SERVED), 180, worker)

        code, out, err = models_cli(root, "show", blip_version)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["family"] == "blip" and shown["latest"] is True and shown["model"]["family"] == "blip"
        line = dashboard_model_line(root, s3_server, tmp_path / "dashboard-cache", monkeypatch)
        assert line.startswith(f"Model {blip_version} · family blip"), line

        # Rollback: ViT-GPT2 again.
        code, out, err = models_cli(root, "rollback")
        assert code == 0, err
        assert out.strip() == f"LATEST: {blip_version} -> {ved_version} (rolled back)"
        before = sum(m["model_version"] == ved_version for m in reader.answers().results)
        reader.wait(served(ved_version, before + SERVED), 180, worker)

        # A decoder-only family with a default prompt, and back again.
        code, out, err = models_cli(root, "import", str(qwen_dir), "--name", "qwen", "--promote")
        assert code == 0, err
        qwen_version = weights_version(qwen_dir, "qwen")
        assert out.startswith(f"{qwen_version}: promoted to LATEST"), out
        reader.wait(served(qwen_version, SERVED), 180, worker)
        code, out, err = models_cli(root, "rollback")
        assert code == 0, err
        assert out.strip() == f"LATEST: {qwen_version} -> {ved_version} (rolled back)"
        before = sum(m["model_version"] == ved_version for m in reader.answers().results)
        reader.wait(served(ved_version, before + SERVED), 180, worker)
    finally:
        sent = traffic.stop()
    answers = reader.wait(lambda a: set(sent) <= set(a.ids()), 180, worker)
    assert worker.get("/readyz") == (200, "ok\n")
    metrics = worker.metrics()
    assert worker.terminate() == 0

    # Nothing lost, nothing failed, nothing answered twice.
    assert answers.dead == []
    assert sorted(answers.ids().elements()) == sorted(sent)
    # In the order sent: ViT-GPT2, BLIP, ViT-GPT2, qwen2_vl, ViT-GPT2; four swaps, each one boundary.
    versions = [m["model_version"] for m in sorted(answers.results, key=lambda m: m["id"])]
    runs = [version for i, version in enumerate(versions) if i == 0 or versions[i - 1] != version]
    assert runs == [ved_version, blip_version, ved_version, qwen_version, ved_version]
    assert metrics[("captionfleet_model_swaps_total", ())] == 4
    # Each caption is its model's for that picture alone: the right model and the right preprocessing.
    by_version = {ved_version: ved, blip_version: blip, qwen_version: qwen}
    expected = {
        (version, i): caption_alone(model, data)
        for version, model in by_version.items()
        for i, data in enumerate(images)
    }
    for message in answers.results:
        picture = int(message["uri"].rsplit("/", 1)[1].split(".")[0])
        assert message["caption"] == expected[(message["model_version"], picture)], message
        # ViT-GPT2 and BLIP take no default prompt; qwen2_vl captions with its own.
        assert message["prompt"] == by_version[message["model_version"]].default_prompt, message
