"""Resuming continues only the same run: the settings that define it must match the checkpoint's."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.__main__ import build_parser, main, settings_from_args
from captionfleet.trainer.checkpoint import STATE_FILE, ResumeMismatchError, find_resume
from captionfleet.trainer.settings import RESUME_MAY_CHANGE, TrainerSettings
from captionfleet.trainer.shapes import ShapesDataset
from captionfleet.trainer.train import train
from tests.unit.test_trainer_train import tiny as tiny_run

pytest.importorskip("pycocoevalcap", reason="evaluation needs pycocoevalcap (pip install pycocoevalcap)")


def tiny(tmp_path: Path, **overrides: Any) -> TrainerSettings:
    """test_trainer_train's tiny run, shortened: checkpoints at step 2 and publishes at step 4."""
    short: dict[str, Any] = {
        "tokenizer_captions": 200,
        "batch_size": 4,
        "max_steps": 4,
        "warmup_steps": 1,
        "eval_interval": 2,
        "eval_caption_samples": 0,
        "shapes_val_size": 4,
        "max_val_images": 4,
        "decoding": DecodingSettings(num_beams=1, max_new_tokens=8),
    }
    return tiny_run(tmp_path, **{**short, **overrides})


def stopped_at_step_2(settings: TrainerSettings) -> Path:
    """What a run killed right after its step-2 checkpoint leaves: the run folder, nothing published."""
    assert train(settings, stop_after_step=2).step == 2
    assert not settings.out_dir.exists()
    checkpoint = find_resume(settings.resolved_run_dir)
    assert checkpoint is not None
    return checkpoint


def logged_steps(history: list[dict[str, Any]]) -> list[int]:
    return [e["step"] for e in history if "loss" in e]


def test_the_same_settings_resume(tmp_path: Path) -> None:
    settings = tiny(tmp_path)
    stopped_at_step_2(settings)
    resumed = train(settings)
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert logged_steps(resumed.history) == [1, 2, 3, 4]
    assert json.loads((tmp_path / "model" / "captionfleet.json").read_text())["resumed_from"] == 2


def test_a_larger_step_budget_alone_resumes_a_finished_run(tmp_path: Path) -> None:
    stopped_at_step_2(tiny(tmp_path, max_steps=2))  # finished: its last step's checkpoint
    resumed = train(tiny(tmp_path, max_steps=4))
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert logged_steps(resumed.history) == [1, 2, 3, 4]


def _manifest(tmp_path: Path) -> str:
    shapes = ShapesDataset(5, 4, 32)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        shapes.image(i).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": shapes.captions(i)[0]})
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(manifest)


@pytest.mark.parametrize("field", ["seed", "learning_rate", "batch_size", "data"])
def test_other_run_defining_settings_are_refused_and_nothing_is_trained(tmp_path: Path, field: str) -> None:
    settings = tiny(tmp_path)
    checkpoint = stopped_at_step_2(settings)
    log_before = (settings.resolved_run_dir / "log.jsonl").read_text()
    new = {"seed": 7, "learning_rate": 1e-3, "batch_size": 2, "data": "manifest"}[field]
    if field == "data":
        new = _manifest(tmp_path)
    old = getattr(settings, field)

    with pytest.raises(ResumeMismatchError) as refused:
        train(tiny(tmp_path, **{field: new}))
    message = str(refused.value)
    assert f"{field}: {old!r} -> {new!r}" in message
    assert "--no-resume" in message and "--run-dir" in message
    # Nothing trained, nothing published: the checkpoint and the log are those of the stopped run.
    assert not settings.out_dir.exists()
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["step"] == 2
    assert (settings.resolved_run_dir / "log.jsonl").read_text() == log_before


def test_no_resume_then_starts_the_changed_run_afresh(tmp_path: Path) -> None:
    stopped_at_step_2(tiny(tmp_path))
    fresh = train(tiny(tmp_path, seed=7, resume=False))
    assert fresh.resumed_from is None and fresh.step == 4
    assert logged_steps(fresh.history) == [1, 2, 3, 4]
    info = json.loads((tmp_path / "model" / "captionfleet.json").read_text())
    assert info["training"]["seed"] == 7 and info["resumed_from"] is None
    assert train(tiny(tmp_path, seed=7, max_steps=6)).resumed_from == 4  # and that run resumes in turn


def test_the_cli_refuses_in_one_line_that_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_values = tiny(tmp_path).model_dump(
        exclude_defaults=True, exclude={"decoding", "out_dir", "run_dir", "progress"}
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_values.items()]
    flags += ["--no-progress", f"--out-dir={tmp_path / 'model'}", f"--run-dir={tmp_path / 'run'}"]
    stopped_at_step_2(settings_from_args(build_parser().parse_args(flags)))

    assert main([*flags, "--seed=7", "--warmup-steps=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "seed: 1337 -> 7; warmup_steps: 1 -> 3" in err and "--no-resume" in err
    assert not (tmp_path / "model").exists()


def test_a_checkpoint_without_a_fingerprint_resumes_as_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = tiny(tmp_path)
    checkpoint = stopped_at_step_2(settings)
    # Rewrite it as checkpoints were written before fingerprints.
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    extra = json.loads(state["extra"])
    del extra["fingerprint"]
    torch.save({**state, "extra": json.dumps(extra)}, checkpoint / STATE_FILE)

    with caplog.at_level(logging.WARNING, logger="captionfleet.trainer.checkpoint"):
        resumed = train(settings)
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert "without comparing settings" in caplog.text


def test_the_fingerprint_holds_what_defines_a_run_and_not_what_may_change() -> None:
    assert set(TrainerSettings.model_fields) >= RESUME_MAY_CHANGE  # no stale or misspelt names
    fingerprint = TrainerSettings().fingerprint()
    assert set(fingerprint) == set(TrainerSettings.model_fields) - RESUME_MAY_CHANGE
    for defining in ("init_from", "data", "seed", "batch_size", "grad_accum", "learning_rate", "vocab_size"):
        assert defining in fingerprint
    for free in ("max_steps", "out_dir", "run_dir", "eval_interval", "log_interval", "progress", "s3"):
        assert free not in fingerprint
