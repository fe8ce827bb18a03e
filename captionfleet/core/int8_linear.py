"""int8 Linear layers whose output rows depend only on their own input rows: a caption is the same
whether its image is captioned alone or in a batch (``fastpath``'s ``int8`` precision).

Each layer's weight is quantized once, symmetrically, with one scale per output channel. At run time
every row (token) of the input gets its own scale, absmax / 127, so no row's quantization depends on
another row; the GEMM is ``torch._int_mm`` (int8 x int8 -> int32, exact integer accumulation), and the
result is scaled back per row and per channel. Every step is per element or per row and exact or
correctly rounded, so a row's output is bitwise the same at any batch size. torch's dynamic
quantization, which this replaces, quantizes activations with one scale per *tensor*: one image with a
large activation changes every other image's rounding in its batch.

One CPU caveat, found on this project's machines: without VNNI (AVX2-only parts such as AMD Zen 3),
oneDNN multiplies int8 pairs with ``vpmaddubsw``, whose 16-bit sums saturate when activations and
weights both use the full 8 bits (``_int_mm`` was off by up to 1.4e5 on random full-range inputs with
``ONEDNN_MAX_CPU_ISA=AVX2``). With weights limited to 7 bits (+-63) no pair can saturate. So the weight
range is chosen by a probe at load time: +-127 where the GEMM is exact on full-range inputs, +-63 where
it is exact only then, and no int8 at all where neither is (``int8_gemm_weight_range`` returns None;
``fastpath`` then falls back to fp32 and says so).
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn

logger = logging.getLogger(__name__)

# An activation row whose largest magnitude is below this is quantized to zeros (its output is the
# bias): dividing by a zero scale would give NaN.
_TINY = 1e-30


def _gemm_is_exact(weight_range: int) -> bool:
    """Whether ``torch._int_mm`` gives the exact integer product with full-range activations and
    weights within +-``weight_range``, on shapes of both a decoding step and a long input."""
    gen = torch.Generator().manual_seed(0)
    # The model's longest inner dimension (GPT-2's MLP, 3072): sums reach 127 * 127 * 3072 ~ 5e7, past
    # 2^24, so a kernel that accumulated in float32 would show here too.
    for rows in (1, 4, 67):
        a = torch.randint(-127, 128, (rows, 3072), dtype=torch.int8, generator=gen)
        a[0] = 127  # the pair products that saturate 16-bit sums first
        b = torch.randint(-weight_range, weight_range + 1, (40, 3072), dtype=torch.int8, generator=gen)
        b[0] = weight_range
        got = torch._int_mm(a, b.t())
        if not torch.equal(got.long(), a.long() @ b.t().long()):
            return False
    return True


@functools.cache
def int8_gemm_weight_range() -> int | None:
    """The widest weight range (127 or 63) for which this CPU's int8 GEMM is exact, or None where
    ``torch._int_mm`` is missing, fails or is inexact at both (then there is no int8 path here)."""
    try:
        for weight_range in (127, 63):
            if _gemm_is_exact(weight_range):
                if weight_range != 127:
                    logger.info("int8 GEMM saturates with 8-bit weights on this CPU (no VNNI): using 7-bit weights")
                return weight_range
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.warning("torch._int_mm does not run on this CPU (%s): no int8 path", error)
        return None
    logger.warning("torch._int_mm is inexact on this CPU even with 7-bit weights: no int8 path")
    return None


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (float32, 2-D) as int8, each row scaled by its own absmax / 127; and those absmaxes (a column)."""
    # max and -min: two reductions that read the rows once each, where abs().amax() writes |x| first.
    absmax = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    absmax.clamp_min_(_TINY)
    # |x| * (127 / absmax) <= 127 up to two roundings, so round() stays within int8 without a clamp.
    return torch.mul(rows, 127.0 / absmax).round_().to(torch.int8), absmax


class SharedInput:
    """The quantized rows of one input, kept for the other layers of a group that take the very same tensor
    next: an attention's query, key and value projections, which transformers' attention modules apply to
    one ``hidden_states`` in a row, without changing it between them. One quantization where there were
    three (ViT-base encoder, 16 images, one thread limited to AVX2: 7 ms of an image's ~600).

    Matched by identity (a weak reference: a tensor freed and another allocated at its address is never
    taken for it), kept for the group's other members only, and dropped when the attention module that owns
    the group returns (link_shared_inputs), so another input, or the same one in a later call, is quantized
    afresh. A cross-attention's key and value take another tensor than its query: they simply miss."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: tuple[weakref.ref[torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self._left = 0

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        held = self._held  # read once: a model shared between threads may replace it meanwhile
        if held is None or held[0]() is not x:
            return None
        self._left -= 1
        if self._left <= 0:
            self._held = None
        return held[1], held[2]

    def keep(self, x: torch.Tensor, quantized: torch.Tensor, absmax: torch.Tensor) -> None:
        self._held = (weakref.ref(x), quantized, absmax)
        self._left = self.size - 1

    def clear(self) -> None:
        self._held = None

    def quantized(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``'s rows as quantize_rows gives them (``rows``: x as a matrix): held ones, or made and held."""
        held = self.take(x)
        if held is not None:
            return held
        quantized, absmax = quantize_rows(rows)
        self.keep(x, quantized, absmax)
        return quantized, absmax


# Attention projections applied to one input in a row, by attribute name (ViT's, and older transformers').
_SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


class _ClearGroup:
    """A forward hook that drops a SharedInput's held rows (a class, not a closure: the model stays picklable)."""

    def __init__(self, group: SharedInput) -> None:
        self.group = group

    def __call__(self, *_: object) -> None:
        self.group.clear()


def link_shared_inputs(model: nn.Module) -> int:
    """Give each attention's query, key and value RowwiseInt8Linear layers one SharedInput; returns how
    many groups."""
    groups = 0
    for module in model.modules():
        for names in _SHARED_INPUT_NAMES:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(layer, RowwiseInt8Linear) for layer in layers):
                group = SharedInput(len(layers))
                for layer in layers:
                    layer.input_group = group  # type: ignore[union-attr]
                # Held rows live for one call of the module that owns the projections (an exception in it
                # included): a tensor changed in place between two of its calls is never matched.
                module.register_forward_hook(_ClearGroup(group), always_call=True)
                groups += 1
    return groups


class RowwiseInt8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output channel) and int8 activations (one scale
    per row, computed at run time); float32 in, float32 out."""

    def __init__(self, linear: nn.Linear, weight_range: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        absmax = weight.abs().amax(dim=1).clamp_min(_TINY)
        # [out, in], the layout nn.Linear has: handed to _int_mm transposed, which measured faster than a
        # contiguous [in, out] copy on the model's shapes (lm_head at 32 rows: 7.6 vs 16.3 ms, one thread).
        # Buffers, so that state_dict() and .to() see them like any layer's tensors.
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("weight", torch.round(weight * (weight_range / absmax)[:, None]).to(torch.int8))
        self.register_buffer("weight_scale", absmax / weight_range)
        self.register_buffer("bias", linear.bias.detach().float().clone() if linear.bias is not None else None)
        # Shared with the layers that take the same input right after this one (link_shared_inputs).
        self.input_group: SharedInput | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        group = self.input_group
        quantized, absmax = group.quantized(x, rows) if group is not None else quantize_rows(rows)
        # Converted first, then scaled in place: a mixed int32 * float32 multiply measured 1.5-4x slower. The
        # channel scale and the bias in one pass (addcmul into its own input): 3 passes over the output where 4
        # took 25% longer (3152 x 3072, one thread limited to AVX2: 9.5 vs 12.7 ms). torch's vectorised addcmul
        # rounds once (a fused multiply-add) where its generic kernel (ATEN_CPU_CAPABILITY=default) rounds twice:
        # within a process every row takes the same kernel, so batched still equals one by one bitwise; across
        # CPU kinds int8 captions differ anyway (8- or 7-bit weights).
        out = torch._int_mm(quantized, self.weight.t()).to(torch.float32)
        out.mul_(absmax / 127.0)
        if self.bias is not None:
            torch.addcmul(self.bias, out, self.weight_scale, out=out)
        else:
            out.mul_(self.weight_scale)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module, weight_range: int) -> int:
    """Replace every float32 ``nn.Linear`` in ``model`` by a RowwiseInt8Linear; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, RowwiseInt8Linear(child, weight_range))
                count += 1
    link_shared_inputs(model)
    return count
