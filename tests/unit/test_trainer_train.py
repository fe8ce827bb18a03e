"""The training loop on tiny models: it learns, resumes exactly, and publishes what the worker loads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captionfleet.core.captioner import Captioner
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.__main__ import build_parser, main, settings_from_args
from captionfleet.trainer.checkpoint import STATE_FILE, find_resume
from captionfleet.trainer.settings import TrainerSettings
from captionfleet.trainer.shapes import ShapesDataset
from captionfleet.trainer.train import lr_at, train

pytest.importorskip("pycocoevalcap", reason="evaluation needs pycocoevalcap (pip install pycocoevalcap)")


def tiny(tmp_path: Path, **overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {
        "out_dir": tmp_path / "model",
        "run_dir": tmp_path / "run",
        "name": "tiny",
        "image_size": 32,
        "patch_size": 8,
        "vit_hidden": 32,
        "vit_layers": 1,
        "vit_heads": 2,
        "gpt2_hidden": 32,
        "gpt2_layers": 1,
        "gpt2_heads": 2,
        "max_positions": 24,
        "vocab_size": 400,
        "tokenizer_captions": 500,
        "batch_size": 8,
        "max_steps": 30,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 30,
        "eval_batches": 1,
        "eval_caption_samples": 4,
        "shapes_val_size": 16,
        "max_val_images": 16,
        "log_interval": 1,
        "progress": False,
        "device": "cpu",
        "threads": 1,  # the test machines are small and shared
        "decoding": DecodingSettings(num_beams=1, max_new_tokens=16),
    }
    values.update(overrides)
    return TrainerSettings(**values)


def test_tiny_training_lowers_the_loss_and_publishes_a_worker_checkpoint(tmp_path: Path) -> None:
    result = train(tiny(tmp_path), command="test")
    losses = [e["loss"] for e in result.history if "loss" in e]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:3]) / 3, losses  # ~5.9 -> ~3.6 in 30 steps
    evals = [e for e in result.history if "val_loss" in e]
    assert evals and evals[-1]["val_loss"] < losses[0]

    out = tmp_path / "model"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "captionfleet.json"} <= names
    assert {"README.md", "tokenizer_config.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pth"))]  # no pickles, no optimizer state
    info = json.loads((out / "captionfleet.json").read_text())
    assert info["version"].startswith("tiny-") and info["steps"] == 30 and info["parent"] is None
    assert info["command"] == "test"
    assert info["training"]["learning_rate"] == 3e-3
    assert info["data"]["train"]["kind"] == "shapes" and info["data"]["val"]["seed"] == 1338
    assert set(info["scores"]) >= {"bleu4", "cider", "exact_match", "repetition_rate", "images"}
    assert info["scores"]["images"] == 16

    # The worker loads it unchanged and captions with it.
    captioner = Captioner.from_dir(out, device="cpu", decoding=DecodingSettings(num_beams=2))
    assert captioner.version == info["version"]
    assert captioner.image_size == (32, 32)
    shapes = ShapesDataset(99, 3, 32)
    captions = captioner.caption([shapes.image(i) for i in range(3)] + [Image.new("RGB", (300, 200), "white")])
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert any(captions), "a trained model should produce some words"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_a_run_stopped_after_a_checkpoint_resumes_where_it_stopped(tmp_path: Path) -> None:
    settings = tiny(tmp_path / "a", max_steps=8, eval_interval=4, eval_caption_samples=0, log_interval=1)
    stopped = train(settings, stop_after_step=4)
    assert stopped.out_dir is None and stopped.step == 4
    checkpoint = find_resume(settings.resolved_run_dir)
    assert checkpoint is not None
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["step"] == 4
    saved_moments = {k: v["exp_avg"].clone() for k, v in state["optimizer"]["state"].items()}
    assert saved_moments and all(m.abs().sum() > 0 for m in saved_moments.values())

    resumed = train(settings)
    assert resumed.resumed_from == 4 and resumed.step == 8
    # The log keeps steps 1-4 from the first run and 5-8 from the second, once each.
    steps = [e["step"] for e in resumed.history if "loss" in e]
    assert steps == list(range(1, 9))

    # Same weights as a run that was never interrupted: same step, optimizer state, data and RNG.
    straight = train(tiny(tmp_path / "b", max_steps=8, eval_interval=4, eval_caption_samples=0))
    assert straight.resumed_from is None
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # Without the optimizer state the result differs: the comparison above can fail.
    fresh = train(tiny(tmp_path / "c", max_steps=8, eval_interval=4, eval_caption_samples=0, learning_rate=2e-3))
    c = _weights(tmp_path / "c" / "model")
    assert any(not torch.allclose(a[n], c[n]) for n in a)
    assert fresh.step == 8


def test_fine_tuning_from_a_checkpoint_on_a_manifest(tmp_path: Path) -> None:
    parent = train(tiny(tmp_path / "parent", max_steps=4, eval_interval=4, eval_caption_samples=0))
    shapes = ShapesDataset(5, 12, 48)  # other size than the model's: the data loader resizes
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(12):
        shapes.image(i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": shapes.captions(i)[0]})
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows.append({"image": "img/bad.png", "caption": "never used"})
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    child = train(
        tiny(
            tmp_path / "child",
            init_from=str(parent.out_dir),
            data=str(manifest),
            val_fraction=0.25,
            max_steps=3,
            eval_interval=3,
            learning_rate=1e-4,
            min_lr=1e-5,
        )
    )
    info = child.info
    assert info["parent"] == {"ref": str(parent.out_dir), "version": parent.info["version"]}
    assert info["data"]["skipped"]["total"] == 1
    assert info["data"]["train"]["images"] == 9 and info["data"]["val"]["images"] == 3
    assert info["scores"]["images"] == 3
    # The tokenizer and image size come from the parent, unchanged.
    assert Captioner.from_dir(tmp_path / "child" / "model", device="cpu").image_size == (32, 32)


def test_lr_schedule_warms_up_then_decays_to_min_lr(tmp_path: Path) -> None:
    s = tiny(tmp_path, max_steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [lr_at(step, s) for step in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert max(lrs) == pytest.approx(1e-3, rel=1e-2)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_flags_override_the_preset_and_bad_values_name_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["--preset", "shapes", "--max-steps", "7", "--no-resume", "--num-beams", "1"])
    settings = settings_from_args(args)
    assert settings.max_steps == 7 and settings.resume is False
    assert settings.patch_size == 16 and settings.name == "builtin-shapes"  # from the preset
    assert settings.decoding.num_beams == 1
    # The model and its resume state go to folders of the user's, under where the command runs; the
    # installed package's built-in model is never the default target.
    assert settings.out_dir == Path("out/shapes")
    assert not settings.out_dir.is_absolute() and not settings.resolved_run_dir.is_absolute()

    assert main(["--max-steps", "zero", "--out-dir", str(tmp_path / "x")]) == 2
    assert "TRAINER_MAX_STEPS" in capsys.readouterr().err


def test_settings_check_shapes_of_the_model() -> None:
    with pytest.raises(ValueError, match="multiple of vit_heads"):
        TrainerSettings(vit_hidden=30, vit_heads=4)
    with pytest.raises(ValueError, match="min_lr"):
        TrainerSettings(learning_rate=1e-4, min_lr=1e-3)


def test_a_checkpoint_swap_killed_between_its_renames_is_recovered(tmp_path: Path) -> None:
    from captionfleet.trainer.checkpoint import CHECKPOINT, MODEL_SUBDIR, _swap_in

    run = tmp_path / "run"
    old = run / f".{CHECKPOINT}.old"
    (old / MODEL_SUBDIR).mkdir(parents=True)
    (old / MODEL_SUBDIR / "config.json").write_text("{}")
    (old / STATE_FILE).write_bytes(b"state")
    # Killed after "checkpoint -> .checkpoint.old" and before "tmp -> checkpoint": the old one is found.
    assert find_resume(run) == old
    # The next save first puts it back, so at no moment is there no checkpoint at all.
    new = run / "tmp-new"
    (new / MODEL_SUBDIR).mkdir(parents=True)
    (new / STATE_FILE).write_bytes(b"new")
    _swap_in(new, run / CHECKPOINT)
    assert (run / CHECKPOINT / STATE_FILE).read_bytes() == b"new"
    assert not old.exists()
