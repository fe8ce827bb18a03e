"""The shipped demo model (worker/builtin_model/) captions fresh shapes pictures correctly."""

from __future__ import annotations

import json

import pytest

from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.evaluate import evaluate_captioner
from captionfleet.trainer.shapes import ShapesDataset

# The model trained on seed 1337 and was validated on 1338; these pictures are new to it.
FRESH_SEED = 2024


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    # No skip when it is missing: the model ships with the package, so its absence is a failure.
    # The worker's default decoding (4 beams), so the score is what `captionfleet caption` produces.
    return Captioner.from_dir(builtin_model_dir(), device="cpu", decoding=DecodingSettings())


def test_builtin_model_reaches_90_percent_exact_match_on_fresh_shapes(captioner: Captioner) -> None:
    size = captioner.image_size[0]
    evaluation = evaluate_captioner(captioner, ShapesDataset(FRESH_SEED, 200, size))
    wrong = [(c, r[0]) for c, r, ok in evaluation.samples(200) if not ok]
    assert evaluation.scores.exact_match >= 0.90, f"{evaluation.scores.line()}; first misses: {wrong[:5]}"
    assert evaluation.scores.repetition_rate <= 0.02


def test_builtin_model_is_small_and_documented() -> None:
    path = builtin_model_dir()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size < 10_000_000, f"the built-in model should be a few MB, it is {size / 1e6:.1f} MB"
    assert not [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth")]
    info = json.loads((path / "captionfleet.json").read_text())
    assert info["command"] == "captionfleet train --preset shapes"
    assert info["scores"]["exact_match"] >= 0.9
    card = (path / "README.md").read_text()
    assert "captionfleet train --preset shapes" in card and "exact match" in card
