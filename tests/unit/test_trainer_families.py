"""The trainer beyond ViT-GPT2: GIT and BLIP fine-tuned, GIT from scratch, by the one training loop.

Tiny checkpoints (tests/tiny_families.py), a few steps each: the tests assert behaviour (the loss falls, the
checkpoint is what the worker loads and captions with, the captions start and stop where serving expects),
never a score.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captionfleet.core.captioner import CaptionModel
from captionfleet.core.families.captioner import FamilyCaptioner
from captionfleet.core.family import caption_bounds
from captionfleet.core.loading import load_checkpoint
from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.__main__ import build_parser, main, settings_from_args
from captionfleet.trainer.data import fit_image
from captionfleet.trainer.family_batches import FamilyBatches, image_fit, prefix_inputs
from captionfleet.trainer.model import load_training_parts
from captionfleet.trainer.preprocess import IGNORE_INDEX
from captionfleet.trainer.settings import TrainerSettings
from captionfleet.trainer.shapes import ShapesDataset
from captionfleet.trainer.train import train

pytest.importorskip("pycocoevalcap", reason="evaluation needs pycocoevalcap (pip install pycocoevalcap)")

DECODING = DecodingSettings(num_beams=1, max_new_tokens=12)


def fine_tune(tmp_path: Path, init_from: Path, **overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {
        "init_from": str(init_from),
        "out_dir": tmp_path / "model",
        "run_dir": tmp_path / "run",
        "name": "tuned",
        "batch_size": 8,
        "max_steps": 12,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 1,
        "eval_interval": 12,
        "eval_batches": 1,
        "eval_caption_samples": 2,
        "shapes_val_size": 4,
        "max_val_images": 4,
        "log_interval": 1,
        "progress": False,
        "device": "cpu",
        "threads": 1,
        "decoding": DECODING,
    }
    values.update(overrides)
    return TrainerSettings(**values)


def losses(history: list[dict[str, Any]]) -> list[float]:
    return [float(entry["loss"]) for entry in history if "loss" in entry]


@pytest.mark.parametrize("family", ["git", "blip"])
def test_fine_tuning_a_tiny_checkpoint_lowers_the_loss_and_the_worker_captions_with_it(
    family: str, tiny_family: Callable[[str], Path], tmp_path: Path
) -> None:
    parent = tiny_family(family)
    result = train(fine_tune(tmp_path, parent), command="test")
    seen = losses(result.history)
    assert len(seen) == 12
    assert sum(seen[-3:]) / 3 < 0.8 * sum(seen[:3]) / 3, seen

    out = tmp_path / "model"
    info = json.loads((out / "captionfleet.json").read_text())
    assert info["family"] == family and info["parent"]["ref"] == str(parent)
    assert info["scores"]["images"] == 4  # scored by the worker's own captioner, through load_checkpoint
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    card = (out / "README.md").read_text()
    assert f"family `{family}`" in card

    captioner: CaptionModel = load_checkpoint(out, device="cpu", precision="auto", decoding=DECODING)
    assert isinstance(captioner, FamilyCaptioner) and captioner.family == family
    assert captioner.version == info["version"]
    pictures = ShapesDataset(99, 3, 32)
    captions = captioner.caption([pictures.image(i) for i in range(3)] + [Image.new("RGB", (50, 30), "white")])
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)

    # Fine-tuned again from what it wrote: the saved processor and tokens are the ones training reads.
    model, processor, tokenizer = load_training_parts(out)
    assert model.config.model_type == family and processor.tokenizer is tokenizer


def test_captions_start_and_end_where_serving_starts_and_stops_them(tiny_family: Callable[[str], Path]) -> None:
    for family in ("git", "blip"):
        model, processor, tokenizer = load_training_parts(tiny_family(family))
        start, end = caption_bounds(family, model.config)
        encode = FamilyBatches(model, processor, tokenizer, max_caption_tokens=32)
        batch = encode([Image.new("RGB", (32, 32), "red")] * 2, ["a red circle", "two blue squares above a star"])
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert batch["pixel_values"].shape[:2] == (2, 3)
        short = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
        assert ids[0, : len(short) + 2].tolist() == [start, *short, end]
        assert mask[0].tolist() == [1] * (len(short) + 2) + [0] * (ids.shape[1] - len(short) - 2)
        # The start is given, never predicted; the end is predicted (it teaches the model to stop); padding is not.
        assert labels[0, 0] == IGNORE_INDEX and labels[0, len(short) + 1] == end
        assert (labels[0, len(short) + 2 :] == IGNORE_INDEX).all()
        assert labels[1, -1] == end and mask[1].all()


def test_a_caption_cut_to_the_token_limit_gets_no_end() -> None:
    from captionfleet.trainer.scratch import train_tokenizer

    tokenizer = train_tokenizer(["a big red star above a small blue circle"] * 5, 300)
    inputs = prefix_inputs(tokenizer, ["a big red star above a small blue circle"], start=0, end=0, pad=0, max_tokens=3)
    assert inputs["input_ids"].shape == (1, 4) and inputs["attention_mask"].all()
    assert inputs["labels"][0, 1:].tolist() == inputs["input_ids"][0, 1:].tolist()


def test_data_sized_by_the_loader_gives_the_processors_own_pixels(tiny_family: Callable[[str], Path]) -> None:
    """CLIP's processor (GIT) resizes the shorter side and crops: the loader keeps the proportions and
    leaves the crop to it; BLIP's resizes to a square. Either way the pixels equal the processor's own."""
    picture = ShapesDataset(3, 1, 90).image(0).crop((0, 0, 90, 57))  # not square
    for family, keep_aspect in (("git", True), ("blip", False)):
        _, processor, _ = load_training_parts(tiny_family(family))
        fit = image_fit(processor.image_processor)
        assert fit.keep_aspect is keep_aspect and fit.size == (32, 32)
        cached = fit_image(picture, fit.size, fit.resample, fit.keep_aspect)
        assert min(cached.size) == 32 and (cached.size != (32, 32)) is keep_aspect
        own = processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"]
        ours = processor.image_processor(images=[cached], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, own)


def test_a_family_the_trainer_cannot_train_is_refused_in_one_line(
    tiny_family: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    florence = tiny_family("florence2")
    with pytest.raises(ModelRefError, match="fine-tunes vision-encoder-decoder, git, blip checkpoints"):
        load_training_parts(florence)
    flags = ["--init-from", str(florence), "--max-steps", "1", "--no-progress", "--device", "cpu"]
    assert main([*flags, "--out-dir", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "florence2 checkpoint" in err and "Traceback" not in err


def test_the_git_preset_trains_git_from_scratch_into_a_checkpoint_the_worker_loads(tmp_path: Path) -> None:
    argv = [
        "--preset",
        "shapes-git",
        "--out-dir",
        str(tmp_path / "model"),
        "--run-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--tokenizer-captions",
        "300",
        "--shapes-val-size",
        "3",
        "--max-val-images",
        "3",
        "--eval-caption-samples",
        "0",
        "--max-new-tokens",
        "6",
        "--no-progress",
        "--device",
        "cpu",
    ]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.family == "git" and settings.name == "git-shapes"
    assert settings.decoding.num_beams == 1 and settings.decoding.max_new_tokens == 6  # greedy, as it is graded
    assert settings.out_dir == tmp_path / "model"
    assert main(argv) == 0

    out = tmp_path / "model"
    info = json.loads((out / "captionfleet.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "git" and info["family"] == "git"
    assert info["version"].startswith("git-shapes-") and info["steps"] == 2 and info["parent"] is None
    assert info["training"]["family"] == "git" and info["scores"]["decoding"]["num_beams"] == 1
    # Sized like the built-in model: 64 px pictures in 16 px patches, 128-wide layers.
    assert config["vision_config"]["image_size"] == 64 and config["vision_config"]["patch_size"] == 16
    assert config["hidden_size"] == 128 and config["vision_config"]["hidden_size"] == 128
    captioner = load_checkpoint(out, device="cpu", precision="auto", decoding=DECODING)
    assert captioner.family == "git" and captioner.version == info["version"]
    assert len(captioner.caption([ShapesDataset(5, 1, 64).image(0)])) == 1
