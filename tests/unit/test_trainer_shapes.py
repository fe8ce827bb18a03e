"""The synthetic shapes data set: deterministic, varied, and captions that follow the picture."""

from __future__ import annotations

import numpy as np

from captionfleet.trainer.shapes import COLOURS, SHAPES, SIZES, ShapesDataset, all_captions_sample, render, sample_scene


def test_same_seed_and_index_give_the_same_picture_and_caption() -> None:
    a = ShapesDataset(seed=7, length=10, image_size=32)
    b = ShapesDataset(seed=7, length=10, image_size=32)
    for i in range(10):
        assert a.captions(i) == b.captions(i)
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))


def test_other_seeds_give_other_pictures() -> None:
    assert all_captions_sample(1, 50) != all_captions_sample(2, 50)


def test_vocabulary_is_large_enough() -> None:
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(SIZES) >= 2
    captions = all_captions_sample(0, 5000)
    # Thousands of distinct captions, not a handful.
    assert len(set(captions)) > 2000
    words = {w for c in captions for w in c.split()}
    for word in (*SHAPES, *COLOURS, *SIZES, "two", "above", "left"):
        assert word in words
    # The worker's default decoding stops after 16 new tokens; one token per word plus eos fits.
    assert max(len(c.split()) for c in captions) <= 15


def test_captions_follow_positions_in_canonical_order() -> None:
    for i in range(300):
        scene = sample_scene(11, i)
        objs = scene.objects
        caption = scene.caption()
        if scene.layout == "row":
            assert objs[0].x < objs[1].x - 0.3  # first named is clearly left
            assert "left of" in caption or caption.startswith("two ")
        if scene.layout == "column":
            assert objs[0].y < objs[1].y - 0.3  # first named is clearly above
        if scene.layout == "pair_above":
            assert max(objs[0].y, objs[1].y) < objs[2].y - 0.3 and objs[0].x < objs[1].x
            assert " above " in caption
        if scene.layout == "pair_below":
            assert objs[0].y < min(objs[1].y, objs[2].y) - 0.3 and objs[1].x < objs[2].x
        for placed in objs:
            assert placed.thing.shape in caption and placed.thing.colour in caption


def test_identical_neighbours_are_counted() -> None:
    captions = all_captions_sample(3, 2000)
    assert any(c.startswith("two ") for c in captions)
    assert any(" above two " in c for c in captions)


def test_render_draws_the_colours_named() -> None:
    for i in range(20):
        scene = sample_scene(5, i)
        pixels = np.asarray(render(scene, 64)).reshape(-1, 3).astype(int)
        for placed in scene.objects:
            target = np.array(COLOURS[placed.thing.colour])
            # Some pixels (object interiors) carry the named colour almost exactly.
            assert (np.abs(pixels - target).sum(axis=1) < 12).sum() >= 10, scene.caption()
