"""The int8 path (captionfleet/core/int8_linear.py): a row's output depends on that row alone, so a caption
does not depend on its batch; the GEMM's exactness is probed per CPU, and without an exact one int8
falls back to fp32."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captionfleet.core import fastpath
from captionfleet.core import int8_linear as i8
from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings
from captionfleet.trainer.shapes import ShapesDataset


@pytest.fixture
def weight_range() -> int:
    found = i8.int8_gemm_weight_range()
    if found is None:
        pytest.skip("this CPU has no exact int8 GEMM (the fallback is tested below)")
    return found


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """int8_gemm_weight_range is cached per process: each test that fakes the GEMM probes afresh."""
    i8.int8_gemm_weight_range.cache_clear()
    yield
    i8.int8_gemm_weight_range.cache_clear()


def _layer(k: int, n: int, weight_range: int, seed: int = 0) -> tuple[nn.Linear, i8.RowwiseInt8Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    return linear, i8.RowwiseInt8Linear(linear, weight_range)


@pytest.mark.parametrize(("k", "n"), [(768, 3072), (37, 50), (8, 1)])
def test_each_output_row_is_bitwise_the_same_alone_or_in_any_batch(weight_range: int, k: int, n: int) -> None:
    _, layer = _layer(k, n, weight_range)
    x = torch.randn(41, k)
    x[5] *= 1e4  # an outlier row: with one scale per tensor it would coarsen every other row's rounding
    x[9] = 0.0
    with torch.inference_mode():
        batched = layer(x)
        for i in range(len(x)):
            assert torch.equal(layer(x[i : i + 1])[0], batched[i])
        assert torch.equal(layer(x[3:20]), batched[3:20])
        assert torch.equal(layer(x.reshape(1, 41, k)), batched.reshape(1, 41, n))  # any leading shape


def test_output_is_close_to_the_float_layer(weight_range: int) -> None:
    linear, layer = _layer(768, 3072, weight_range)
    x = torch.randn(4, 3, 768)
    with torch.inference_mode():
        want, got = linear(x), layer(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    # Measured 0.9% (8-bit weights) and 1.1% (7-bit): the activations' 8 bits dominate.
    assert float((got - want).norm() / want.norm()) < 0.02


def test_zero_and_tiny_rows_give_the_bias_not_nan(weight_range: int) -> None:
    linear, layer = _layer(16, 4, weight_range)
    x = torch.zeros(3, 16)
    x[1] = 1e-38  # below the guard: quantized to zeros, not divided by a zero scale
    with torch.inference_mode():
        out = layer(x)
    assert torch.equal(out, linear.bias.detach().expand(3, 4))
    no_bias = i8.RowwiseInt8Linear(nn.Linear(16, 4, bias=False), weight_range)
    with torch.inference_mode():
        assert torch.equal(no_bias(torch.zeros(2, 16)), torch.zeros(2, 4))


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What oneDNN does without VNNI: activations shifted to uint8, pairs of products summed into a
    saturating int16 (vpmaddubsw), the shift taken back out of the int32 total."""
    shifted = a.long() + 128
    products = shifted[:, None, :] * b.t().long()[None, :, :]  # [m, n, k]
    pairs = products.reshape(*products.shape[:2], -1, 2).sum(-1).clamp(-32768, 32767)
    return (pairs.sum(-1) - 128 * b.long().sum(0)[None, :]).int()


def test_weights_drop_to_7_bits_where_the_gemm_saturates(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    assert i8.int8_gemm_weight_range() == 63
    linear, layer = _layer(64, 8, 63)
    assert int(layer.weight.abs().max()) == 63
    x = torch.randn(5, 64)
    with torch.inference_mode():  # through the saturating GEMM, and still exact with 7-bit weights
        assert float((layer(x) - linear(x)).norm() / linear(x).norm()) < 0.03


def test_no_int8_path_where_the_gemm_fails_or_is_wrong(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("_int_mm: not implemented for this CPU")

    monkeypatch.setattr(torch, "_int_mm", missing)
    assert i8.int8_gemm_weight_range() is None
    i8.int8_gemm_weight_range.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32))
    assert i8.int8_gemm_weight_range() is None


def test_a_gemm_that_sums_in_float32_is_no_int8_path(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Exact on short rows, wrong once the sums pass 2^24, as they do at the model's 3072-wide layers. Modelled
    # on the exact sums rather than by a float32 matmul: whether that one is exact depends on the CPU's kernel
    # (limited to AVX2, MKL's accumulation order kept every probe sum exact, and the test failed).
    def sums_in_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        exact = a.long() @ b.long()
        return torch.where(exact.abs() >= 2**24, exact + 1, exact).to(torch.int32)

    monkeypatch.setattr(torch, "_int_mm", sums_in_float32)
    assert i8.int8_gemm_weight_range() is None


def test_the_layers_tensors_are_its_state() -> None:
    _, layer = _layer(16, 4, 127)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    assert layer.state_dict()["weight"].dtype == torch.int8


def test_int8_falls_back_to_fp32_with_a_warning(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(i8, "int8_gemm_weight_range", lambda: None)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING):
        captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")
    assert captioner.precision == "fp32"
    assert "using fp32 instead" in caplog.text
    assert not [m for m in captioner.model.modules() if isinstance(m, i8.RowwiseInt8Linear)]
    assert len(captioner.caption(_images(2))) == 2
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: False)
    assert fastpath.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(i8, "int8_gemm_weight_range", lambda: 63)
    assert fastpath.resolve_precision("auto", cpu) == "int8"  # an AVX2-only CPU: int8 with 7-bit weights


def test_int8_quantizes_every_linear_lm_head_included(tiny_checkpoint: Path, weight_range: int) -> None:
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")
    assert captioner.precision == "int8"
    assert not [m for m in captioner.model.modules() if type(m) is nn.Linear]
    assert isinstance(captioner.model.decoder.lm_head, i8.RowwiseInt8Linear)


def _images(n: int) -> list[Image.Image]:
    """Varied sizes, content and brightness: the pictures' activations differ in range."""
    rng = np.random.default_rng(11)
    images = []
    for i in range(n):
        size = (24 + 7 * i, 40 - i)
        pixels = rng.integers(0, 255, (size[1], size[0], 3)) * (0.2 + 0.8 * (i % 4) / 3)
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    return images


@pytest.mark.parametrize("num_beams", [1, 3])
def test_int8_batched_equals_one_by_one_on_random_weights(
    tiny_checkpoint: Path, weight_range: int, num_beams: int
) -> None:
    # Random weights make near-ties between tokens: where one scale per tensor flipped 4 of 24 captions.
    decoding = DecodingSettings(num_beams=num_beams, max_new_tokens=8)
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision="int8")
    images = _images(12)
    batched = captioner.caption(images)
    assert batched == [captioner.caption([image])[0] for image in images]
    assert len(set(batched)) > 1


@pytest.mark.parametrize("num_beams", [1, 4])
def test_int8_batched_equals_one_by_one_on_the_builtin_model(weight_range: int, num_beams: int) -> None:
    decoding = DecodingSettings(num_beams=num_beams)
    captioner = Captioner.from_dir(builtin_model_dir(), device="cpu", decoding=decoding, precision="int8")
    data = ShapesDataset(2026, 12, 64)  # fresh pictures: not the training, validation or test seeds
    images = [data.image(i) for i in range(len(data))]
    batched = captioner.caption(images)
    assert batched == [captioner.caption([image])[0] for image in images]
    assert len(set(batched)) > 6


def test_an_attentions_query_key_and_value_quantize_their_input_once(
    tiny_checkpoint: Path, weight_range: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")
    encoder = captioner.model.encoder
    layers = len(encoder.layers)
    calls: list[tuple[int, ...]] = []
    quantize = i8.quantize_rows

    def counted(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(rows.shape))
        return quantize(rows)

    monkeypatch.setattr(i8, "quantize_rows", counted)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        shared = encoder(pixel_values=pixels).last_hidden_state
        once = len(calls)
        for module in encoder.modules():
            if isinstance(module, i8.RowwiseInt8Linear):
                module.input_group = None
        calls.clear()
        alone = encoder(pixel_values=pixels).last_hidden_state
    assert len(calls) - once == 2 * layers  # per layer, key and value took the query's quantized input
    assert torch.equal(shared, alone)  # the same int8 rows, reused: bitwise the same encoder output


def test_a_shared_input_is_taken_only_for_the_same_tensor_and_only_by_the_rest_of_its_group() -> None:
    group = i8.SharedInput(3)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    quantized, absmax = i8.quantize_rows(x)
    group.keep(x, quantized, absmax)
    assert group.take(y) is None  # another tensor, even of the same shape: quantized afresh
    assert group.take(x) is not None
    assert group.take(x) is not None
    assert group.take(x) is None  # the group's three members served: a later pass over x quantizes again


def test_held_rows_do_not_outlive_the_attention_call(
    tiny_checkpoint: Path, weight_range: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")
    attention = captioner.model.encoder.layers[0].attention
    x = torch.randn(2, 5, attention.q_proj.in_features)

    def fails(*_: object) -> torch.Tensor:
        raise RuntimeError("value projection failed")

    with torch.inference_mode():
        # The call ends after q and k took x's rows, before v did: the rows held for v must go with it.
        monkeypatch.setattr(attention.v_proj, "forward", fails)
        with pytest.raises(RuntimeError, match="value projection failed"):
            attention(x)
        monkeypatch.undo()
        x.mul_(3.0)  # the same tensor, changed in place: its old rows must not be taken
        shared = attention.v_proj(x)
        attention.v_proj.input_group = None
        alone = attention.v_proj(x)
    assert torch.equal(shared, alone)


def test_an_int8_model_with_shared_inputs_pickles(tiny_checkpoint: Path, weight_range: int) -> None:
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="int8")
    buffer = io.BytesIO()
    torch.save(captioner.model.encoder, buffer)  # the groups' hooks are objects, not closures
    assert buffer.tell() > 0
