"""A chat model published to the registry on the real S3 server (SeaweedFS) and served from its LATEST:
every file it needs travels, its chat template (transformers 5's chat_template.jinja) included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from captionfleet.core.families.captioner import FamilyCaptioner
from captionfleet.core.loading import load_checkpoint, load_model
from captionfleet.core.settings import DecodingSettings, ModelSettings, WorkerSettings
from captionfleet.trainer.registry import Registry
from tests.integration.test_lifecycle_registry import s3_settings
from tests.services.seaweedfs import SeaweedS3
from tests.tiny_families import pictures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DECODING = DecodingSettings(num_beams=1, max_new_tokens=6)


def test_a_published_chat_model_loads_from_latest(
    s3_server: SeaweedS3, s3_bucket: str, tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    local = tiny_family("qwen2_vl")
    assert (local / "chat_template.jinja").is_file()  # where transformers 5 writes the template
    s3 = s3_settings(s3_server)
    root = f"s3://{s3_bucket}/models/chat"
    registry = Registry(root, s3)
    registry.upload(local, "chat-1", {"version": "chat-1"})
    registry.write_record("chat-1", {"version": "chat-1", "status": "unjudged"})
    registry.promote("chat-1")
    stored = {key.rsplit("/", 1)[-1] for key in registry.list_keys(registry.key("versions") + "/")}
    assert "chat_template.jinja" in stored

    settings = WorkerSettings(
        model=ModelSettings(ref=f"{root}/LATEST", cache_dir=tmp_path / "cache", device="cpu"),
        decoding=DECODING,
        s3=s3,
    )
    served = load_model(settings)
    assert isinstance(served, FamilyCaptioner)
    assert served.family == "qwen2_vl" and served.version == "chat-1"
    image = pictures(1)[0]
    original = load_checkpoint(local, device="cpu", precision="auto", decoding=DECODING)
    assert served.caption([image]) == original.caption([image])
