"""Checkpoints that are not what they claim, made from a copy of a good one (the ``tiny_checkpoint``
fixture): code of their own, weights missing or extra, broken weight files. Used by the unit tests of
the loaders and by the command's end-to-end test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# What the checkpoint's own module does when imported: leave a file behind.
EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("checkpoint code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil-captioner"
"""


def copy_checkpoint(good: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(good, tmp_path / name))


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def with_remote_code(ckpt: Path, marker: Path, config_name: str = "config.json") -> Path:
    """auto_map naming a module in the folder, and (in config.json) a model type transformers lacks."""
    config = json.loads((ckpt / config_name).read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    if config_name == "config.json":
        config["model_type"] = "evil-captioner"
    (ckpt / config_name).write_text(json.dumps(config))
    (ckpt / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return ckpt


def with_half_the_weights(ckpt: Path) -> Path:
    weights = tensors(ckpt)
    kept = sorted(weights)[: len(weights) // 2]
    save_file({name: weights[name] for name in kept}, str(ckpt / "model.safetensors"))
    return ckpt


def with_an_extra_tensor(ckpt: Path) -> Path:
    save_file({**tensors(ckpt), "decoder.extra.weight": torch.zeros(3)}, str(ckpt / "model.safetensors"))
    return ckpt


def with_a_broken_header(ckpt: Path) -> Path:
    (ckpt / "model.safetensors").write_bytes(os.urandom(4096))
    return ckpt


def sharded(ckpt: Path, second: str) -> Path:
    """The weights split in two shards named by an index, the second named ``second``: written as
    safetensors or (``*.bin``) pickled, anything else named but not written."""
    weights = tensors(ckpt)
    (ckpt / "model.safetensors").unlink()
    names = sorted(weights)
    first_half, second_half = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({name: weights[name] for name in first_half}, str(ckpt / "model-00001.safetensors"))
    if second.endswith(".bin"):
        torch.save({name: weights[name] for name in second_half}, ckpt / second)
    elif second == "model-00002.safetensors":
        save_file({name: weights[name] for name in second_half}, str(ckpt / second))
    weight_map = {name: "model-00001.safetensors" for name in first_half}
    weight_map.update({name: second for name in second_half})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt
