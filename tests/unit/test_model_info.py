"""What a version's record says the checkpoint is (trainer/model_info.py), read from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from captionfleet.trainer.families import default_prompt, loaded_here
from captionfleet.trainer.model_info import describe_checkpoint


def test_a_vit_gpt2_checkpoint_is_described_from_its_files(tiny_checkpoint: Path) -> None:
    assert describe_checkpoint(tiny_checkpoint) == {
        "family": "vision-encoder-decoder",
        "processor": "ViTImageProcessor",
        "default_prompt": None,
        "precision": "float32",
    }


def test_another_family_is_described_without_loading_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "BlipImageProcessor"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "BlipProcessor"}))
    # Most of the bytes in bfloat16, a little in float32: the precision is the one most weights are in.
    save_file({"big": torch.zeros(64, dtype=torch.bfloat16), "small": torch.zeros(4)}, tmp_path / "model.safetensors")
    info = describe_checkpoint(tmp_path)
    assert info == {
        "family": "blip",
        "processor": "BlipProcessor",  # the processor config's class wins over the image processor's
        "default_prompt": default_prompt("blip"),
        "precision": "bfloat16",
    }
    # The model layer's table (core/family.py) answers both: BLIP captions from the image alone by default.
    assert info["default_prompt"] is None and default_prompt("florence2") == "<CAPTION>"
    assert loaded_here("blip") and loaded_here("vision-encoder-decoder") and not loaded_here("kosmos-2")


def test_unreadable_files_are_unknown_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    assert describe_checkpoint(tmp_path) == {
        "family": "unknown",
        "processor": None,
        "default_prompt": None,
        "precision": "unknown",
    }
