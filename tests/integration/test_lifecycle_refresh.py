"""A refresh run as the CronJob runs it: `python -m captionfleet.trainer --init-from latest --data s3://…manifest
--publish-to s3://…/models/tiny` fine-tunes the version LATEST names on new data from S3 and publishes
the result through the gate, recording its parent; against the real S3 server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.data import ImageCaptionDataset
from captionfleet.trainer.publish import Gate, publish_version, read_eval_set
from captionfleet.trainer.refresh import resolve_init_from
from captionfleet.trainer.registry import Registry, RegistryError
from captionfleet.trainer.settings import TrainerSettings
from captionfleet.trainer.shapes import ShapesDataset
from tests.conftest import save_tiny_checkpoint
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

DECODING = DecodingSettings(num_beams=1, max_new_tokens=8)


def test_refresh_run_fine_tunes_latest_on_s3_data_and_publishes_through_the_gate(
    s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    s3 = s3_settings(s3_server)
    registry = Registry(f"s3://{s3_bucket}/models/tiny", s3)
    shapes = ShapesDataset(seed=11, length=12, image_size=32)
    fixed = ImageCaptionDataset([shapes.image(i) for i in range(3)], [shapes.captions(i) for i in range(3)], "shapes")
    first = publish_version(
        save_tiny_checkpoint(tmp_path / "v1", seed=2),
        registry,
        gate=Gate(),
        decoding=DECODING,
        device="cpu",
        cache_dir=tmp_path / "cache",
        s3=s3,
        eval_source=fixed,
        eval_size=3,
        name="tiny",
    )
    assert first.promoted
    digest = read_eval_set(registry).digest

    # New data: a manifest in S3 with image paths relative to its folder.
    client = s3_server.client()
    lines = []
    for i in range(3, 12):
        buffer = io.BytesIO()
        shapes.image(i).save(buffer, format="PNG")
        client.put_object(Bucket=s3_bucket, Key=f"new/img/{i}.png", Body=buffer.getvalue())
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": shapes.captions(i)[0]}))
    client.put_object(Bucket=s3_bucket, Key="new/captions.jsonl", Body="\n".join(lines).encode())

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    env.update(
        TRAINER_S3__ENDPOINT_URL=s3_server.endpoint_url,
        TRAINER_S3__ACCESS_KEY_ID=s3_server.access_key,
        TRAINER_S3__SECRET_ACCESS_KEY=s3_server.secret_key,
        TRAINER_PUBLISH_TO=registry.root,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    # fmt: off
    command = [
        sys.executable, "-m", "captionfleet.trainer", "--init-from", "latest", "--data", f"s3://{s3_bucket}/new/captions.jsonl",
        "--name", "tiny", "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
        "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--eval-interval", "2", "--eval-batches", "1",
        "--eval-caption-samples", "0", "--val-fraction", "0.25", "--max-val-images", "2", "--threads", "1",
        "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "8", "--no-progress",
        # Two steps cannot be trusted to beat LATEST: a wide tolerance makes this run's outcome certain.
        "--gate-tolerance", "100",
    ]
    # fmt: on
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "promoted to LATEST" in done.stdout, done.stdout

    latest = registry.latest()
    assert latest is not None and latest != first.version and latest.startswith("tiny-")
    record = registry.record(latest)
    assert record is not None and record["status"] == "promoted"
    assert record["parent"]["version"] == first.version
    assert record["parent"]["ref"] == registry.version_uri(first.version)
    assert record["baseline"] == first.version and record["scores"]["eval_set"] == digest[:16]
    metadata = registry.metadata(latest) or {}
    assert metadata["data"]["train"]["source"].endswith("captions.jsonl") and metadata["steps"] == 2
    assert read_eval_set(registry).digest == digest  # the first publish's set, not this run's


def test_refresh_from_latest_needs_a_latest(s3_server: SeaweedS3, s3_bucket: str) -> None:
    settings = TrainerSettings(
        init_from="latest", publish_to=f"s3://{s3_bucket}/models/none", s3=s3_settings(s3_server)
    )
    with pytest.raises(RegistryError, match="LATEST does not exist yet"):
        resolve_init_from(settings)
    with pytest.raises(RegistryError, match="--publish-to"):
        resolve_init_from(settings.model_copy(update={"publish_to": ""}))
