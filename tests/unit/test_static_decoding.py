"""The static KV cache path on CPU (where it runs without compiling): the same tokens and confidences as
the dynamic cache, a batch's captions equal to its images' one by one, kept caches reused in place. Its
compiled CUDA form is checked only on a GPU (bench/device_check.py, bench/gpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.cache_utils import StaticLayer

from captionfleet.core.beams import beam_group
from captionfleet.core.captioner import Captioner
from captionfleet.core.settings import DecodingSettings
from captionfleet.core.static_decoding import SharedCrossStaticCache, StaticDecoding, bucket_for, buckets


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(count)]


def test_buckets_are_powers_of_two_up_to_the_batch_size() -> None:
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(rows, buckets(12)) for rows in (1, 3, 5, 9, 12, 13)] == [1, 4, 8, 12, 12, 13]


@pytest.mark.parametrize("beams", [1, 4])
def test_static_cache_gives_the_dynamic_caches_tokens(captioner: Captioner, beams: int) -> None:
    decoding = DecodingSettings(num_beams=beams, max_new_tokens=10)
    config = captioner.generation_config(decoding)
    pixels = captioner.preprocess(images(5))  # padded to the bucket of 8
    static = StaticDecoding(captioner.model, max_rows=8)
    with torch.inference_mode(), beam_group(captioner.model, beams) as beam_kwargs:
        dynamic = captioner.model.generate(pixel_values=pixels, generation_config=config, **beam_kwargs)
    with torch.inference_mode(), beam_group(captioner.model, beams, per_image=False):
        kept = static.generate(pixels, config)
    assert torch.equal(kept, dynamic)
    assert len({tuple(row.tolist()) for row in dynamic}) > 1  # the images do differ: a real comparison


@pytest.mark.parametrize("beams", [1, 4])
def test_captions_and_confidences_match_and_batched_equals_one_by_one(captioner: Captioner, beams: int) -> None:
    decoding = DecodingSettings(num_beams=beams, max_new_tokens=10)
    inputs = [captioner.prepare(image) for image in images(6, seed=1)]
    dynamic = captioner.caption_inputs(inputs, decoding)
    try:
        captioner.use_static_cache(4, [decoding])  # 6 rows: past the largest bucket, a cache not kept
        batched = captioner.caption_inputs(inputs, decoding)
        three = captioner.caption_inputs(inputs[:3], decoding)  # padded to 4
        singles = [captioner.caption_inputs([item], decoding)[0] for item in inputs]
    finally:
        captioner.static = None
    for got in (batched, three + batched[3:], singles):
        assert [c.text for c in got] == [c.text for c in dynamic]
        assert [c.tokens for c in got] == [c.tokens for c in dynamic]
        assert [c.mean_logprob for c in got] == pytest.approx([c.mean_logprob for c in dynamic], abs=1e-4)


def test_caches_are_kept_per_bucket_and_reordered_in_place(captioner: Captioner) -> None:
    decoding = DecodingSettings(num_beams=4, max_new_tokens=6)
    config = captioner.generation_config(decoding)
    static = StaticDecoding(captioner.model, max_rows=4)
    assert static.warm_up((3, 32, 32), torch.float32, torch.device("cpu"), [config]) == 3  # buckets 1, 2, 4
    cache = static.cache(4, 4, 6)
    assert isinstance(cache, SharedCrossStaticCache)
    layer = cache.self_attention_cache.layers[0]
    assert isinstance(layer, StaticLayer)
    keys = layer.keys
    assert isinstance(keys, torch.Tensor) and keys.shape[0] == 16  # 4 images x 4 beams
    address = keys.data_ptr()
    with torch.inference_mode(), beam_group(captioner.model, 4, per_image=False):
        static.generate(captioner.preprocess(images(3)), config)  # bucket 4 again: the same cache, reset
    assert static.cache(4, 4, 6) is cache and layer.keys is keys and keys.data_ptr() == address
    assert static.cache(7, 4, 6) is not static.cache(7, 4, 6)  # past the largest bucket: never kept


def test_from_dir_warms_the_static_cache_up(tiny_checkpoint: Path) -> None:
    captioner = Captioner.from_dir(
        tiny_checkpoint, device="cpu", precision="fp32", decoding=DecodingSettings(num_beams=1), static_rows=2
    )
    assert captioner.static is not None and captioner.static.sizes == [1, 2]
    assert len(captioner.static._caches) == 2  # one per bucket, made by the warm-up


def test_decodings_not_warmed_up_keep_no_cache_and_caption_as_before(tiny_checkpoint: Path) -> None:
    # Requests may ask for their own beams and tokens (the HTTP API): a kept cache for each would grow
    # without bound (GBs each on a GPU), so only the warmed-up decodings keep theirs.
    captioner = Captioner.from_dir(
        tiny_checkpoint, device="cpu", precision="fp32", decoding=DecodingSettings(num_beams=1), static_rows=4
    )
    assert captioner.static is not None
    kept = len(captioner.static._caches)
    inputs = [captioner.prepare(image) for image in images(3, seed=2)]
    static = captioner.static
    for beams in (1, 2, 3):
        for tokens in (3, 5, 7, 9):
            decoding = DecodingSettings(num_beams=beams, max_new_tokens=tokens)
            got = captioner.caption_inputs(inputs, decoding)
            captioner.static = None
            dynamic = captioner.caption_inputs(inputs, decoding)
            captioner.static = static
            assert [c.text for c in got] == [c.text for c in dynamic]
    assert len(static._caches) == kept == 3  # buckets 1, 2, 4 of the model's own decoding


def test_the_worker_setting_turns_it_on_for_the_batch_size(tiny_checkpoint: Path) -> None:
    from captionfleet.core.loading import load_model
    from captionfleet.core.settings import WorkerSettings

    settings = WorkerSettings.model_validate(
        {
            "model": {"ref": str(tiny_checkpoint), "device": "cpu", "precision": "fp32", "static_cache": True},
            "batch": {"max_items": 3},
            "decoding": {"num_beams": 1, "max_new_tokens": 4},
        }
    )
    captioner = load_model(settings)
    assert isinstance(captioner, Captioner) and captioner.static is not None
    assert captioner.static.sizes == [1, 2, 3]
    off = load_model(settings.model_copy(update={"model": settings.model.model_copy(update={"static_cache": False})}))
    assert isinstance(off, Captioner) and off.static is None


def test_the_static_cache_holds_the_images_the_sequence_limit_lets_into_a_batch(tiny_checkpoint: Path) -> None:
    from captionfleet.core.loading import load_model
    from captionfleet.core.settings import WorkerSettings

    settings = WorkerSettings.model_validate(
        {
            "model": {"ref": str(tiny_checkpoint), "device": "cpu", "precision": "fp32", "static_cache": True},
            "batch": {"max_items": 8, "max_sequences": 8},  # 2 beams: 4 images a batch, not 8
            "decoding": {"num_beams": 2, "max_new_tokens": 4},
        }
    )
    captioner = load_model(settings)
    assert isinstance(captioner, Captioner) and captioner.static is not None
    assert captioner.static.sizes == [1, 2, 4]
