"""What a checkpoint of a family other than ViT-GPT2 must hold to load, and what of its files the
worker follows: a chat model's template, a processor that can prepare an image."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

from captionfleet.core.families.captioner import preparation_digest, preparation_files
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.model_store import HUB_ALLOW_PATTERNS, ModelRefError


def copy_of(tiny_family: Callable[[str], Path], family: str, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_family(family), folder))


def test_the_chat_template_file_is_a_checkpoint_file() -> None:
    # The hub download keeps it (the S3 resolver and the registry's upload read the same list).
    assert "*.jinja" in HUB_ALLOW_PATTERNS


def test_a_chat_model_without_its_template_is_refused_naming_the_file(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = copy_of(tiny_family, "qwen2_vl", tmp_path / "qwen")
    (folder / "chat_template.jinja").unlink()
    refusal = r"qwen2_vl chat model without its chat template: copy chat_template\.jinja"
    with pytest.raises(ModelRefError, match=refusal):
        load_checkpoint(folder, device="cpu", precision="auto")


def test_a_processor_that_cannot_prepare_an_image_refuses_the_checkpoint(
    tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = copy_of(tiny_family, "qwen2_vl", tmp_path / "qwen")
    (folder / "chat_template.jinja").write_text("{{ raise_exception('this template is broken') }}")
    with pytest.raises(ModelRefError, match=r"could not load its processor .*this template is broken"):
        load_checkpoint(folder, device="cpu", precision="auto")


def test_the_preparation_digest_reads_no_weights(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = tiny_family("git")
    sharded = copy_of(tiny_family, "git", tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    AutoModelForImageTextToText.from_pretrained(original).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    read: list[str] = []
    read_bytes = Path.read_bytes

    def recording(self: Path) -> bytes:
        read.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    digest = preparation_digest(sharded)
    assert read and not [name for name in read if name.endswith(".safetensors")]
    assert {file.name for file in preparation_files(sharded)} == {
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    # The same processor files, sharded or not: the same preparation (no input is prepared again).
    assert digest == preparation_digest(original)
