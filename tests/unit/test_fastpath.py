"""The fast path (captionfleet/core/fastpath.py and onednn.py): captions agree with fp32, and every
private-op route falls back."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import VisionEncoderDecoderModel

from captionfleet.core import fastpath, int8_linear, onednn
from captionfleet.core.beams import GROUPED_ATTENTION
from captionfleet.core.captioner import Captioner
from captionfleet.core.model_store import builtin_model_dir
from captionfleet.core.settings import DecodingSettings, ModelSettings
from captionfleet.trainer.shapes import ShapesDataset

# Not the training (1337) or validation (1338) seeds, nor the built-in model test's (2024).
FRESH_SEED = 2025


@pytest.fixture(scope="module")
def shapes() -> list[Image.Image]:
    data = ShapesDataset(FRESH_SEED, 120, 64)
    return [data.image(i) for i in range(len(data))]


@pytest.fixture(scope="module")
def fp32_captions(shapes: list[Image.Image]) -> list[str]:
    captioner = Captioner.from_dir(builtin_model_dir(), device="cpu", decoding=DecodingSettings(), precision="fp32")
    return _caption_in_batches(captioner, shapes)


def _caption_in_batches(captioner: Captioner, images: list[Image.Image], batch: int = 32) -> list[str]:
    out: list[str] = []
    for i in range(0, len(images), batch):
        out += captioner.caption(images[i : i + batch])
    return out


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("precision", ["auto", "bf16", "int8"])
def test_optimized_captions_agree_with_fp32_on_the_builtin_model(
    precision: str, shapes: list[Image.Image], fp32_captions: list[str]
) -> None:
    captioner = Captioner.from_dir(builtin_model_dir(), device="cpu", decoding=DecodingSettings(), precision=precision)
    captions = _caption_in_batches(captioner, shapes)
    assert _agreement(captions, fp32_captions) >= 0.99  # what `auto` may pick a precision for
    assert len(set(captions)) > 20  # a broken model captioning everything alike would fail loudly here


def test_auto_is_the_documented_cpu_default() -> None:
    cpu = torch.device("cpu")
    int8 = "int8" if int8_linear.int8_gemm_weight_range() is not None else "fp32"
    expected = "bf16" if fastpath.cpu_has_native_bf16() else int8
    assert fastpath.resolve_precision("auto", cpu) == expected
    assert Captioner.from_dir(builtin_model_dir(), device="cpu").precision == expected
    assert ModelSettings().precision == "auto"


def test_precision_names_are_checked_per_device() -> None:
    with pytest.raises(ValueError, match="one of"):
        fastpath.resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="one of"):  # gone: slower than bf16 where bf16 is native
        fastpath.resolve_precision("int8-bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        fastpath.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU-only"):
        fastpath.resolve_precision("int8", torch.device("cuda"))
    assert fastpath.resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_conv1d_to_linear_keeps_outputs(tiny_checkpoint: Path) -> None:
    original = VisionEncoderDecoderModel.from_pretrained(tiny_checkpoint, use_safetensors=True).eval()
    converted = VisionEncoderDecoderModel.from_pretrained(tiny_checkpoint, use_safetensors=True).eval()
    assert fastpath.conv1d_to_linear(converted) > 0
    assert not [m for m in converted.modules() if type(m).__name__ == "Conv1D"]
    tokens = torch.tensor([[0, 5, 7, 9]])
    hidden = torch.randn(1, 5, original.config.decoder.n_embd)
    with torch.inference_mode():
        want = original.decoder(input_ids=tokens, encoder_hidden_states=hidden).logits
        got = converted.decoder(input_ids=tokens, encoder_hidden_states=hidden).logits
    assert torch.allclose(want, got, atol=1e-5)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_onednn_route_gives_the_same_captions(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if onednn._onednn_ops() is None:
        pytest.skip("this torch build has no oneDNN linear ops")
    decoding = DecodingSettings(num_beams=3, max_new_tokens=8)
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda *_: False)
    plain = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision="fp32")
    assert not [m for m in plain.model.modules() if isinstance(m, onednn.OneDNNLinear)]
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda *_: True)  # route every layer, whatever is faster
    routed = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision="fp32")
    assert [m for m in routed.model.modules() if isinstance(m, onednn.OneDNNLinear)]
    images = _images(6)
    assert routed.caption(images) == plain.caption(images)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_decoder_attention_is_grouped_eager_on_cpu_and_captions_match_sdpa(
    tiny_checkpoint: Path, precision: str
) -> None:
    decoding = DecodingSettings(num_beams=3, max_new_tokens=8)
    fast = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    # transformers' eager attention, with the beams of an image attending together (core/beams.py).
    assert fast.model.decoder.config._attn_implementation == GROUPED_ATTENTION
    assert fast.model.encoder.config._attn_implementation == "sdpa"  # eager measured slower there
    if precision == "int8":
        # Each activation is rounded to 1/127 of its row's range: a 1e-6 difference between attention
        # kernels can cross a rounding boundary, which random weights' near-ties may turn into a token.
        return
    sdpa = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    sdpa.model.decoder.set_attn_implementation("sdpa")
    images = _images(6)
    assert fast.caption(images) == sdpa.caption(images)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gelu_fused_into_the_gemm_gives_the_same_captions(
    tiny_checkpoint: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if onednn._onednn_ops() is None:
        pytest.skip("this torch build has no oneDNN linear ops")
    if not _onednn_linear_runs(precision):
        # oneDNN's bf16 linear needs AVX-512 or AVX-NE-CONVERT (not on an AVX2-only CPU such as AMD Zen 3):
        # there every layer stays plain, as test_falls_back_when_the_private_op_fails covers.
        pytest.skip(f"oneDNN's {precision} linear does not run on this CPU: nothing to fuse")
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda *_: True)  # route every layer, whatever is faster
    decoding = DecodingSettings(num_beams=3, max_new_tokens=8)
    fused = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    gemms = [m for m in fused.model.modules() if isinstance(m, onednn.OneDNNLinear) and m.attr == "gelu"]
    # The tiny model has 2 ViT and 2 GPT-2 layers: erf GELU in the encoder, tanh GELU in the decoder.
    assert sorted(m.algorithm for m in gemms) == ["none", "none", "tanh", "tanh"]
    assert not [m for m in fused.model.modules() if type(m).__name__ in ("GELUActivation", "NewGELUActivation")]
    monkeypatch.setattr(onednn, "fuse_gelu", lambda _model: 0)
    separate = Captioner.from_dir(tiny_checkpoint, device="cpu", decoding=decoding, precision=precision)
    images = _images(6)
    assert fused.caption(images) == separate.caption(images)


def _onednn_linear_runs(precision: str) -> bool:
    """Whether this CPU runs oneDNN's packed linear in ``precision`` (routing keeps plain layers where not)."""
    layer = nn.Sequential(nn.Linear(8, 16)).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    return onednn.route_linears_to_onednn(layer, measure=False) == 1


class ViTMLP(nn.Module):  # the name and layout of transformers' ViT MLP, which fuse_gelu looks for
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(8, 16), activation, nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.fc2(self.activation_fn(self.fc1(x))))


def test_gelu_fusion_is_undone_when_the_post_op_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = onednn._onednn_ops()
    if ops is None:
        pytest.skip("this torch build has no oneDNN linear ops")
    reorder, linear_op = ops

    def ignores_post_ops(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *_rest: object) -> torch.Tensor:
        return linear_op(x, w, b, "none", [], "")

    monkeypatch.setattr(onednn, "_onednn_ops", lambda: (reorder, ignores_post_ops))
    mlp = ViTMLP(nn.GELU())
    assert onednn.route_linears_to_onednn(mlp, measure=False) == 2
    assert onednn.fuse_gelu(mlp) == 0
    assert isinstance(mlp.activation_fn, nn.GELU) and mlp.fc1.attr == "none"


def test_only_gelu_is_fused() -> None:
    from transformers.activations import ACT2FN

    assert onednn._gelu_algorithm(ACT2FN["gelu"]) == "none"
    assert onednn._gelu_algorithm(ACT2FN["gelu_new"]) == "tanh"  # GPT-2
    assert onednn._gelu_algorithm(ACT2FN["gelu_pytorch_tanh"]) == "tanh"
    assert onednn._gelu_algorithm(nn.GELU(approximate="tanh")) == "tanh"
    assert onednn._gelu_algorithm(ACT2FN["relu"]) is None
    assert onednn._gelu_algorithm(ACT2FN["gelu_python"]) is None  # erf in Python: left as it is
    mlp = ViTMLP(nn.ReLU())
    if onednn.route_linears_to_onednn(mlp, measure=False):
        assert onednn.fuse_gelu(mlp) == 0


def test_eager_attention_switch_tolerates_models_without_it() -> None:
    assert fastpath.use_eager_decoder_attention(nn.Linear(2, 2)) is False


def _mapped(path: Path) -> bool:
    gc.collect()
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_float32_paths_do_not_keep_the_checkpoint_file_mapped(
    tmp_path: Path, tiny_checkpoint: Path, precision: str
) -> None:
    copy = tmp_path / "ckpt"  # a path of its own: no other test's model maps it
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "model.safetensors"
    plain = VisionEncoderDecoderModel.from_pretrained(copy, use_safetensors=True)
    assert _mapped(weights)  # what the fix is for: float32 weights are views into the file's map
    del plain
    assert not _mapped(weights)
    captioner = Captioner.from_dir(copy, device="cpu", precision=precision)
    assert not _mapped(weights)
    assert captioner.caption(_images(2))  # and the model still works


def test_falls_back_when_the_private_op_is_missing(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn, "_onednn_ops", lambda: None)
    onednn.onednn_is_faster.cache_clear()
    captioner = Captioner.from_dir(tiny_checkpoint, device="cpu", precision="fp32")
    assert not [m for m in captioner.model.modules() if isinstance(m, onednn.OneDNNLinear)]
    assert len(captioner.caption(_images(3))) == 3
    onednn.onednn_is_faster.cache_clear()


def test_falls_back_when_the_private_op_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("mkldnn: unsupported")

    monkeypatch.setattr(onednn, "_onednn_ops", lambda: (lambda w, _hint: w, broken))
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    assert onednn.route_linears_to_onednn(model, measure=False) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_falls_back_when_the_private_op_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *rest: object) -> torch.Tensor:
        return torch.zeros(x.shape[0], w.shape[0])

    monkeypatch.setattr(onednn, "_onednn_ops", lambda: (lambda w, _hint: w, wrong))
    model = nn.Sequential(nn.Linear(8, 4))
    assert onednn.route_linears_to_onednn(model, measure=False) == 0
    assert type(model[0]) is nn.Linear
