"""Beam search shares per-image work across beams (captionfleet/core/beams.py) without changing captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from captionfleet.core.beams import (
    GROUPED_ATTENTION,
    PerImageProjection,
    SharedCrossAttentionCache,
    beam_group,
    grouped_cross_attention,
)
from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings


def _images(n: int, seed: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _plain_generate(captioner: Captioner, images: list[Image.Image], decoding: DecodingSettings) -> list[str]:
    """transformers' own beam search on the same weights: projections per beam, full cache reorder."""
    with torch.inference_mode():
        output = captioner.model.generate(
            pixel_values=captioner.preprocess(images).to(captioner.dtype),
            generation_config=captioner.generation_config(decoding),
        )
    return [t.strip() for t in captioner.tokenizer.batch_decode(output, skip_special_tokens=True)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_beam_work_gives_transformers_captions(
    tiny_checkpoint: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reorders: list[int] = []
    original = SharedCrossAttentionCache.reorder_cache
    monkeypatch.setattr(
        SharedCrossAttentionCache, "reorder_cache", lambda self, idx: (reorders.append(len(idx)), original(self, idx))
    )
    decoding = DecodingSettings(num_beams=3, max_new_tokens=8)
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    wrappers = [m for m in captioner.model.modules() if isinstance(m, PerImageProjection)]
    assert len(wrappers) == captioner.model.config.decoder.n_layer
    images = _images(7)
    want = _plain_generate(captioner, images, decoding)
    assert len(set(want)) > 1  # distinct captions, so an image mix-up would show
    assert captioner.caption(images) == want
    assert reorders and set(reorders) == {7 * 3}  # generate() used our cache, not one of its own


def test_builtin_model_captions_unchanged_with_four_beams() -> None:
    from captionfleet.trainer.shapes import ShapesDataset

    data = ShapesDataset(77, 24, 64)
    images = [data.image(i) for i in range(len(data))]
    captioner = Captioner.from_dir(builtin_model_dir(), device="cpu", decoding=DecodingSettings(), precision="fp32")
    assert captioner.caption(images) == _plain_generate(captioner, images, DecodingSettings())


def test_projection_runs_once_per_image_when_rows_are_beam_copies() -> None:
    seen: list[int] = []
    inner = torch.nn.Linear(4, 6)
    inner.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    wrapper = PerImageProjection(inner)
    x = torch.randn(2, 5, 4).repeat_interleave(3, dim=0)  # 2 images x 3 beams
    wrapper.group = 3
    with torch.inference_mode():
        assert torch.allclose(wrapper(x), inner(x), atol=1e-6)
    assert seen[0] == 2  # the wrapped call saw one row per image


def test_projection_computes_every_row_when_they_are_not_copies() -> None:
    seen: list[int] = []
    inner = torch.nn.Linear(4, 6)
    inner.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    wrapper = PerImageProjection(inner)
    wrapper.group = 3
    x = torch.randn(6, 5, 4)  # 6 different rows
    with torch.inference_mode():
        assert torch.equal(wrapper(x), inner(x))
    assert seen[0] == 6
    assert wrapper(torch.randn(4, 5, 4)).shape == (4, 5, 6)  # rows not a multiple of the group


def test_cache_reorders_self_attention_only() -> None:
    cache = SharedCrossAttentionCache()
    keys = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    cache.self_attention_cache.update(keys, keys.clone(), 0)
    cache.cross_attention_cache.update(keys, keys.clone(), 0)
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert cache.self_attention_cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0, 2.0]
    assert cache.cross_attention_cache.layers[0].keys[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert isinstance(cache.self_attention_cache, DynamicCache)


def test_beam_group_sets_and_resets_the_group(tiny_checkpoint: Path) -> None:
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")
    wrappers = [m for m in captioner.model.modules() if isinstance(m, PerImageProjection)]
    with beam_group(captioner.model, 4) as kwargs:
        assert {w.group for w in wrappers} == {4}
        assert isinstance(kwargs["cache"], SharedCrossAttentionCache)
    assert {w.group for w in wrappers} == {1}
    with beam_group(captioner.model, 1) as kwargs:
        assert kwargs == {}  # greedy: transformers' own cache


def test_a_nested_beam_group_gives_back_the_outer_groups(tiny_checkpoint: Path) -> None:
    """A call nested between a beam search's steps (core/between_steps.py) leaves that search its group."""
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")
    wrappers = [m for m in captioner.model.modules() if isinstance(m, PerImageProjection)]
    with beam_group(captioner.model, 4):
        with beam_group(captioner.model, 2):
            assert {w.group for w in wrappers} == {2}
        assert {w.group for w in wrappers} == {4}
    assert {w.group for w in wrappers} == {1}


def test_grouped_cross_attention_equals_eager_attention_on_per_beam_copies() -> None:
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    module = torch.nn.Module()  # eager attention reads only .training from it
    module.eval()
    gen = torch.Generator().manual_seed(3)
    images, beams, heads, length, keys, width = 3, 4, 2, 2, 7, 8
    query = torch.randn(images * beams, heads, length, width, generator=gen)
    key = torch.randn(images, heads, keys, width, generator=gen)
    value = torch.randn(images, heads, keys, width, generator=gen)
    want_out, want_weights = eager_attention_forward(
        module, query, key.repeat_interleave(beams, 0), value.repeat_interleave(beams, 0), None, scaling=0.3
    )
    out, weights = grouped_cross_attention(module, query, key, value, None, scaling=0.3)
    assert out.shape == want_out.shape and weights.shape == want_weights.shape
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(weights, want_weights, atol=1e-6)
    # Same batch on both sides (self-attention, greedy): transformers' eager attention as it is.
    same_out, _ = grouped_cross_attention(module, query, query, query, None, scaling=0.3)
    assert torch.equal(same_out, eager_attention_forward(module, query, query, query, None, scaling=0.3)[0])
    # A mask (never given by a ViT encoder): attends on per-beam copies, as transformers does.
    mask = torch.zeros(images * beams, 1, 1, keys)
    mask[..., -1] = float("-inf")
    masked, _ = grouped_cross_attention(module, query, key, value, mask, scaling=0.3)
    want_masked, _ = eager_attention_forward(
        module, query, key.repeat_interleave(beams, 0), value.repeat_interleave(beams, 0), mask, scaling=0.3
    )
    assert torch.allclose(masked, want_masked, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_beams_keep_one_cross_attention_row_per_image_and_check_copies_once(
    tiny_checkpoint: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys and values of cross-attention are held once per image, not once per beam, and the
    encoder output is checked for beam copies once per generate() call, not once per layer."""
    kept: list[int] = []
    original_update = DynamicCache.update

    def update(self: DynamicCache, keys: torch.Tensor, values: torch.Tensor, layer: int, *a: object, **k: object):  # type: ignore[no-untyped-def]
        kept.append(keys.shape[0])
        return original_update(self, keys, values, layer, *a, **k)

    decoding = DecodingSettings(num_beams=3, max_new_tokens=6)
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    images = _images(5)
    checks: list[int] = []
    original_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: (checks.append(1), original_equal(a, b))[1])
    monkeypatch.setattr(DynamicCache, "update", update)
    captions = captioner.caption(images)
    layers = captioner.model.config.decoder.n_layer
    # Per step and layer, self-attention holds 5 x 3 beam rows; the cross-attention's first (only) update 5.
    assert kept.count(5) == layers and set(kept) == {5, 15}
    assert len(checks) == 1
    assert captions == [captioner.caption([image])[0] for image in images]  # batched == one by one


def test_a_gpt2_asking_for_upcast_attention_keeps_transformers_eager_attention(tmp_path: Path) -> None:
    """transformers applies reorder_and_upcast_attn under its own eager attention only: grouping would drop it."""
    import json

    from tests.conftest import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "upcast")
    config = json.loads((path / "config.json").read_text())
    config["decoder"]["reorder_and_upcast_attn"] = True
    (path / "config.json").write_text(json.dumps(config))
    decoding = DecodingSettings(num_beams=3, max_new_tokens=6)
    captioner = Captioner.from_dir(path, device="cpu", decoding=decoding, precision="fp32")
    assert captioner.model.decoder.config._attn_implementation == "eager"
    images = _images(4)
    assert captioner.caption(images) == _plain_generate(captioner, images, decoding)


def test_only_a_gpt2_decoder_is_switched_to_grouped_attention() -> None:
    from captionfleet.core.beams import use_grouped_decoder_attention

    class Decoder(torch.nn.Module):
        def __init__(self, model_type: str) -> None:
            super().__init__()
            self.config = type("Config", (), {"model_type": model_type, "reorder_and_upcast_attn": False})()
            self.cross = PerImageProjection(torch.nn.Linear(2, 2))
            self.switched: list[str] = []

        def set_attn_implementation(self, name: str) -> None:
            self.switched.append(name)

    class Model(torch.nn.Module):
        def __init__(self, model_type: str) -> None:
            super().__init__()
            self.decoder = Decoder(model_type)

    bigcode = Model("gpt_bigcode")  # has c_attn + is_cross_attention too, with its own eager kernel
    assert use_grouped_decoder_attention(bigcode) is False and bigcode.decoder.switched == []
    gpt2 = Model("gpt2")
    assert use_grouped_decoder_attention(gpt2) is True and gpt2.decoder.switched == [GROUPED_ATTENTION]
