"""Prompts through the real broker: a streaming worker (`python -m captionfleet.worker`) serving a tiny BLIP
answers requests with and without a prompt, each with the caption that model gives that picture and prompt
(checked against the same model in this process), the result naming the prompt used; a request whose prompt
is not text is a dead letter naming the field, and the others are answered all the same."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.stream_models import PRECISION, caption_alone, load, png_pictures
from tests.integration.stream_support import AnswerReader, WorkerProcess, make_topics, new_port, worker_env
from tests.services.kafka import KafkaBroker
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

PICTURES = 3
PROMPT = "a photo of"


def test_requests_with_and_without_a_prompt_get_their_own_captions(
    kafka_broker: KafkaBroker,
    kafka_names: dict[str, str],
    s3_server: SeaweedS3,
    s3_bucket: str,
    tiny_family: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    blip = tiny_family("blip")
    make_topics(kafka_broker, kafka_names, partitions=2)
    client = s3_server.client()
    images = png_pictures(PICTURES)
    for i, data in enumerate(images):
        client.put_object(Bucket=s3_bucket, Key=f"img/{i}.png", Body=data)
    env = worker_env(
        kafka_broker,
        kafka_names,
        s3_server,
        s3_bucket,
        blip,
        tmp_path / "cache",
        "prompted",
        new_port(),
        WORKER_MODEL__PRECISION=PRECISION,
    )
    reader = AnswerReader(kafka_broker, kafka_names)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        producer = kafka_broker.producer(linger_ms=0)
        sent: dict[str, tuple[int, str | None]] = {}
        for i in range(PICTURES):
            for request_id, prompt in ((f"plain-{i}", None), (f"asked-{i}", PROMPT)):
                value = {"id": request_id, "uri": f"s3://{s3_bucket}/img/{i}.png", "tenant": "acme"}
                if prompt is not None:
                    value["prompt"] = prompt
                producer.send(kafka_names["requests"], value=json.dumps(value).encode()).get(timeout=30)
                sent[request_id] = (i, prompt)
        bad = {"id": "bad-prompt", "uri": f"s3://{s3_bucket}/img/0.png", "prompt": {"text": PROMPT}}
        producer.send(kafka_names["requests"], value=json.dumps(bad).encode()).get(timeout=30)
        producer.close(timeout=10)
        answers = reader.wait(lambda a: set(a.ids()) >= {*sent, "bad-prompt"}, 240, worker)
        assert worker.terminate() == 0
    finally:
        worker.close()
        reader.close()

    assert sorted(answers.ids().elements()) == sorted([*sent, "bad-prompt"])  # each answered once
    (dead,) = answers.dead
    assert dead["id"] == "bad-prompt" and dead["kind"] == "malformed"
    assert dead["message"].startswith("the request's prompt must be a string, not dict")
    assert dead["request"]["prompt"] == {"text": PROMPT}

    model = load(blip)
    results = {m["id"]: m for m in answers.results}
    for request_id, (i, prompt) in sent.items():
        result = results[request_id]
        assert result["prompt"] == prompt  # BLIP's default is no prompt: None without one
        assert result["metadata"] == {"tenant": "acme"}  # the prompt is its own field, not metadata
        assert result["caption"] == caption_alone(model, images[i], prompt), request_id
        assert result["mean_logprob"] is not None and result["tokens"] > 0
    # The prompt reached the model: it changes what the model says.
    assert any(results[f"plain-{i}"]["caption"] != results[f"asked-{i}"]["caption"] for i in range(PICTURES))
