"""Caption metrics on hand-made pairs, where the right answer can be worked out by hand."""

from __future__ import annotations

import math

import pytest

from captionfleet.trainer.evaluate import is_repetitive, normalize, score_captions

pytest.importorskip("pycocoevalcap", reason="BLEU/CIDEr need pycocoevalcap (pip install pycocoevalcap)")

REFS = [
    ["a small red circle above a big blue square"],
    ["two big green stars side by side"],
    ["a purple triangle left of an orange diamond"],
    ["one yellow square on grass"],  # at least 4 words: a shorter caption has no 4-grams to match
]


def test_perfect_captions_score_the_maximum() -> None:
    hyps = [refs[0] for refs in REFS]
    scores = score_captions(hyps, REFS)
    assert scores.exact_match == 1.0
    assert scores.bleu4 == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D of a caption identical to its single reference is 10 (cosine 1 for n = 1..4, times 10).
    assert scores.cider == pytest.approx(10.0, abs=1e-6)
    assert scores.repetition_rate == 0.0
    assert scores.images == 4


def test_exact_match_ignores_case_punctuation_and_spacing() -> None:
    scores = score_captions(["A small red circle,  above a big blue square."], [REFS[0]])
    assert scores.exact_match == 1.0
    assert normalize("  Two BIG green stars; side by side! ") == "two big green stars side by side"


def test_half_right_gives_half_exact_match() -> None:
    hyps = [REFS[0][0], "nothing like it at all", REFS[2][0], "a blue circle"]
    assert score_captions(hyps, REFS).exact_match == 0.5


def test_bleu4_of_one_changed_word_matches_the_hand_computation() -> None:
    # "a b c d e" against "a b c d f": precisions 4/5, 3/4, 2/3, 1/2; same length, so no brevity
    # penalty: BLEU-4 = (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25.
    scores = score_captions(["red green blue black white"], [["red green blue black pink"]])
    assert scores.bleu4 == pytest.approx(0.2**0.25, abs=1e-6)
    assert scores.exact_match == 0.0


def test_wrong_captions_score_zero() -> None:
    hyps = ["zebra", "zebra", "zebra", "zebra"]
    scores = score_captions(hyps, REFS)
    assert scores.exact_match == 0.0
    assert scores.cider == pytest.approx(0.0, abs=1e-9)
    assert scores.bleu4 < 1e-6


def test_any_reference_counts_for_exact_match() -> None:
    scores = score_captions(["a cat"], [["a dog", "a cat", "an animal"]])
    assert scores.exact_match == 1.0
    assert not math.isnan(scores.cider)


def test_repetition_detects_loops_not_reused_words() -> None:
    assert is_repetitive("a man riding a horse riding a horse")
    assert is_repetitive("the the cat")
    assert is_repetitive("a dog on a beach a dog on a beach")
    assert not is_repetitive("a small red circle above a small blue square")
    assert not is_repetitive("a big red circle and a small red circle above a big green star")
    scores = score_captions(["a red a red circle", REFS[1][0]], REFS[:2])
    assert scores.repetition_rate == 0.5


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="reference lists"):
        score_captions(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        score_captions(["a"], [[]])


def test_quotes_around_a_word_are_not_part_of_it() -> None:
    from captionfleet.trainer.evaluate import tokenize

    assert tokenize("The 'red' ball, the dog's toy.") == ["the", "red", "ball", "the", "dog's", "toy"]
    assert tokenize("' '' '") == []
