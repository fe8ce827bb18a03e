"""The registry's fixed evaluation set: written once (atomically, even by racing first publishes), and
every image checked against the manifest's sha256 when it is read."""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pytest
from PIL import Image

from captionfleet.core.registry_layout import EVAL, EVAL_MANIFEST
from captionfleet.trainer.data import ImageCaptionDataset
from captionfleet.trainer.publish import read_eval_set, write_eval_set
from captionfleet.trainer.registry import Registry, RegistryError
from tests.unit.test_publish_race import RegistryS3

ROOT = "s3://bucket/models/x"


def source(red: int, n: int = 3) -> ImageCaptionDataset:
    images = [Image.new("RGB", (8, 8), (red, i * 40, 0)) for i in range(n)]
    return ImageCaptionDataset(images, [[f"red {red} number {i}"] for i in range(n)], f"shades of {red}")


@pytest.fixture
def registry() -> Registry:
    s3 = RegistryS3()
    s3.buckets.add("bucket")
    return Registry(ROOT, client=s3)  # type: ignore[arg-type]


def test_written_once_and_read_back_checked(registry: Registry) -> None:
    write_eval_set(registry, source(200), size=2)
    eval_set = read_eval_set(registry)
    assert len(eval_set.dataset) == 2 and eval_set.dataset.captions(1) == ["red 200 number 1"]
    with pytest.raises(RegistryError, match="written once"):
        write_eval_set(registry, source(10), size=2)
    assert read_eval_set(registry).digest == eval_set.digest


def test_an_image_replaced_after_it_was_written_is_refused(registry: Registry) -> None:
    write_eval_set(registry, source(200), size=2)
    info = registry.get_json(registry.key(EVAL, "info.json"))
    assert info is not None
    key = registry.key(EVAL, info["folder"], "images", "00001.png")
    registry.client.put_object(
        Bucket=registry.bucket,
        Key=key,
        Body=registry.client.get_object(
            Bucket=registry.bucket, Key=registry.key(EVAL, info["folder"], "images", "00000.png")
        )["Body"].read(),
    )
    with pytest.raises(RegistryError, match=r"00001\.png changed after it was written: restore it"):
        read_eval_set(registry)


def test_two_first_publishes_racing_agree_on_one_set(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_eval_set(registry, source(200), size=3)
    winner = read_eval_set(registry).digest
    # The second publish checked for a set before the first had finished, so it writes one too.
    monkeypatch.setattr("captionfleet.trainer.publish.eval_set_exists", lambda _registry: False)
    with caplog.at_level(logging.WARNING, logger="captionfleet.trainer.publish"):
        write_eval_set(registry, source(90), size=3)
    assert "another publish stored the evaluation set first" in caplog.text
    assert read_eval_set(registry).digest == winner  # info.json was not replaced: one set for both


def test_a_set_in_the_earlier_layout_still_reads(registry: Registry) -> None:
    image = Image.new("RGB", (8, 8), (5, 6, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    registry.client.put_object(
        Bucket=registry.bucket, Key=registry.key(EVAL, "images", "00000.png"), Body=buffer.getvalue()
    )
    manifest = (json.dumps({"image": "images/00000.png", "captions": ["a dot"]}) + "\n").encode()
    registry.client.put_object(Bucket=registry.bucket, Key=registry.key(EVAL, EVAL_MANIFEST), Body=manifest)
    registry.put_json(registry.key(EVAL, "info.json"), {"images": 1, "sha256": hashlib.sha256(manifest).hexdigest()})
    eval_set = read_eval_set(registry)
    assert len(eval_set.dataset) == 1 and eval_set.dataset.captions(0) == ["a dot"]


def test_an_evaluation_set_cider_cannot_score_is_never_stored(registry: Registry) -> None:
    from captionfleet.trainer.data import DataError

    with pytest.raises(DataError, match="at least 2"):
        write_eval_set(registry, source(200, n=1), size=200)
    assert registry.get_json(registry.key(EVAL, "info.json")) is None
