"""What a checkpoint of a family other than ViT-GPT2 must hold to load, and what of its files the
worker follows: a chat model's template, a processor that can prepare an image, the processor files (not
the weights) for its preparation key, the token settings (not the decoding) of its generation config."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, GenerationConfig

from captionfleet.core import checkpoint_load
from captionfleet.core.families.captioner import preparation_digest, preparation_files
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.model_store import HUB_ALLOW_PATTERNS, ModelRefError
from captionfleet.core.settings import DecodingSettings
from tests.tiny_families import pictures

GREEDY = DecodingSettings(num_beams=1, max_new_tokens=6)


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


# What a checkpoint's generation_config.json may say that the worker's decoding settings decide instead.
DECODING_FLAGS = {
    "sequence_bias": [[[5], 100.0]],  # made every caption of the tiny qwen2_vl empty
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 3,
    "num_beams": 3,
    "max_length": 5,
    "output_hidden_states": True,
    "output_attentions": True,
}


@pytest.mark.parametrize("family", ["qwen2_vl", "florence2", "vision-encoder-decoder"])
def test_the_checkpoint_s_generation_config_keeps_only_its_token_settings(
    family: str, tiny_family: Callable[[str], Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    original = tiny_checkpoint if family == "vision-encoder-decoder" else tiny_family(family)
    tampered = Path(shutil.copytree(original, tmp_path / "tampered"))
    saved = json.loads((tampered / "generation_config.json").read_text())
    (tampered / "generation_config.json").write_text(json.dumps({**saved, **DECODING_FLAGS}))
    model = load_checkpoint(tampered, device="cpu", precision="fp32", decoding=GREEDY)
    reference = load_checkpoint(original, device="cpu", precision="fp32", decoding=GREEDY)
    kept = model.model.generation_config  # type: ignore[attr-defined]
    for name in DECODING_FLAGS:
        assert getattr(kept, name, None) in (None, False, 1, 1.0, 20, 50), name  # transformers' own defaults
    assert kept.eos_token_id == saved["eos_token_id"] and kept.pad_token_id == saved["pad_token_id"]
    images = pictures(3)
    ours = [c.text for c in model.caption_inputs([model.prepare(image) for image in images])]
    theirs = [c.text for c in reference.caption_inputs([reference.prepare(image) for image in images])]
    assert ours == theirs and any(ours)


def test_the_token_settings_are_the_ids_and_the_forced_and_suppressed_tokens() -> None:
    saved = GenerationConfig(
        bos_token_id=0,
        eos_token_id=[2, 7],
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        suppress_tokens=[3],
        sequence_bias={(5,): 100.0},
        bad_words_ids=[[4]],
        do_sample=True,
    )
    assert checkpoint_load.token_settings(saved) == {
        "bos_token_id": 0,
        "eos_token_id": [2, 7],
        "forced_bos_token_id": 0,
        "forced_eos_token_id": 2,
        "suppress_tokens": [3],
    }


def test_a_chat_model_without_its_template_is_refused_before_its_weights_load(
    tiny_family: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_of(tiny_family, "qwen2_vl", tmp_path / "qwen")
    (folder / "chat_template.jinja").unlink()
    loads: list[Path] = []
    monkeypatch.setattr(checkpoint_load, "load_image_text_model", lambda path, dtype: loads.append(path))
    with pytest.raises(ModelRefError, match="without its chat template"):
        load_checkpoint(folder, device="cpu", precision="auto")
    assert loads == []  # a 7B model's weights are not read to find a missing template
