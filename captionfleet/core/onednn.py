"""oneDNN's packed-weight GEMM for a model's float32 and bfloat16 nn.Linear layers on CPU, and each MLP's
GELU run inside its first GEMM (a oneDNN post-op). ``fastpath.optimize`` applies both for fp32 and bf16.

Why: torch's default CPU GEMM (MKL on x86) runs at about half of oneDNN's rate on AMD Zen, worst on the
768x50257 lm_head, and a separate GELU pass reads and writes the MLP's activations once more. Only the
summation order and the GELU's kernel change (differences ~1e-6 relative in fp32).

The route uses private torch ops (``torch.ops.mkldnn._linear_pointwise``); every converted layer is checked
against ``F.linear`` once at load time and the plain layer is kept when the op is missing, fails, disagrees,
or is measured slower on this CPU. Each fusion is likewise checked against the unfused MLP and undone if it
differs.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


# -- oneDNN-routed fp32 Linear ------------------------------------------------------------------


def _onednn_ops() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """The private ops, or None where this torch build lacks them (or oneDNN)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class OneDNNLinear(nn.Module):
    """A float32 or bfloat16 Linear whose weight is pre-packed for oneDNN's GEMM, optionally with an
    activation applied inside the GEMM (a oneDNN post-op: ``attr`` "gelu", ``algorithm`` "none" for
    erf GELU or "tanh" for GPT-2's tanh approximation)."""

    def __init__(
        self,
        linear: nn.Linear,
        packed: torch.Tensor,
        op: Callable[..., torch.Tensor],
        attr: str = "none",
        algorithm: str = "",
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = packed
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self._op = op
        self.attr = attr
        self.algorithm = algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self._op(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.bias, self.attr, [], self.algorithm)
        return out.reshape(*shape[:-1], self.out_features)

    def with_activation(self, attr: str, algorithm: str) -> OneDNNLinear:
        # A shallow copy shares the packed weight; the unfused original is kept only to undo a fusion.
        fused = copy.copy(self)
        fused.attr, fused.algorithm = attr, algorithm
        return fused


def _median_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.cache
def onednn_is_faster(in_features: int, out_features: int, dtype: torch.dtype = torch.float32, rows: int = 64) -> bool:
    """Measured once per shape and dtype on this CPU: MKL beats oneDNN on some Intel parts, loses on AMD."""
    ops = _onednn_ops()
    if ops is None:
        return False
    reorder, linear_op = ops
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.zeros(out_features, dtype=dtype)
    try:
        packed = reorder(w, None)
        plain = _median_seconds(lambda: F.linear(x, w, b))
        routed = _median_seconds(lambda: linear_op(x, packed, b, "none", [], ""))
    except Exception:
        return False
    return routed < plain


# How far a routed layer may differ from F.linear on a probe: only the summation order changes, so
# fp32 agrees to ~1e-6; bf16 rounds its output to 8 significant bits (one step: up to 2^-7 relative).
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def route_linears_to_onednn(model: nn.Module, *, measure: bool = True) -> int:
    """Swap float32 and bfloat16 nn.Linear layers for OneDNNLinear where it works (and, with ``measure``,
    is faster on this CPU); returns how many were swapped. Any failure keeps the plain layer."""
    ops = _onednn_ops()
    if ops is None:
        logger.info("oneDNN linear ops unavailable in this torch build: keeping torch's default GEMM")
        return 0
    reorder, linear_op = ops
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            if dtype not in _TOLERANCE:
                continue
            if measure and not onednn_is_faster(child.in_features, child.out_features, dtype):
                continue
            try:
                packed = reorder(child.weight.detach(), None)
                routed = OneDNNLinear(child, packed, linear_op)
                probe = torch.randn(3, child.in_features).to(dtype)
                tolerance = _TOLERANCE[dtype]
                if not torch.allclose(routed(probe), child(probe), rtol=tolerance, atol=tolerance):
                    raise RuntimeError("output differs from F.linear")
            except Exception as error:
                logger.warning("oneDNN routing failed for %s (%s): keeping the plain layer", name, error)
                continue
            setattr(parent, name, routed)
            count += 1
    return count


# -- GELU fused into the GEMM -------------------------------------------------------------------

# (container class, its Linear, its activation) where forward() is activation(linear(x)) with nothing
# in between. Matched by name, like fastpath's Conv1D: a transformers release that renames them is not fused.
_MLP_LAYOUTS = {
    "ViTMLP": ("fc1", "activation_fn"),  # transformers 5
    "ViTIntermediate": ("dense", "intermediate_act_fn"),  # transformers 4
    "GPT2MLP": ("c_fc", "act"),
}


def _gelu_algorithm(activation: nn.Module) -> str | None:
    """oneDNN's name for this GELU ("none": erf, "tanh": the tanh approximation), or None."""
    kind = type(activation).__name__
    if kind in ("NewGELUActivation", "GELUTanh", "GELUPytorchTanh"):
        return "tanh"
    if kind == "GELUActivation" and getattr(activation, "act", None) is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return "tanh" if activation.approximate == "tanh" else "none"
    return None


def fuse_gelu(model: nn.Module) -> int:
    """Apply each MLP's GELU inside its first GEMM (a oneDNN post-op) instead of as a separate pass
    over the activations; returns how many MLPs were fused.

    Why: the ViT's GELU reads and writes its 32 x 197 x 3072 activations once more after the GEMM
    wrote them: 3% of an fp32 greedy batch of 32 in a profile (two threads), and the fused GEMM ran
    at 179 GFLOP/s where GEMM-then-GELU ran at 154. Each fusion is checked on a probe against the
    unfused MLP and undone if it differs.
    """
    count = 0
    for module in model.modules():
        layout = _MLP_LAYOUTS.get(type(module).__name__)
        if layout is None:
            continue
        linear_name, act_name = layout
        linear, activation = getattr(module, linear_name, None), getattr(module, act_name, None)
        if not isinstance(linear, OneDNNLinear) or linear.attr != "none" or not isinstance(activation, nn.Module):
            continue
        algorithm = _gelu_algorithm(activation)
        if algorithm is None:
            continue
        probe = torch.randn(2, 3, linear.in_features).to(linear.packed.dtype)
        want = module(probe)
        setattr(module, linear_name, linear.with_activation("gelu", algorithm))
        setattr(module, act_name, nn.Identity())
        try:
            got = module(probe)
            tolerance = _TOLERANCE.get(linear.packed.dtype, 1e-4)
            if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
                raise RuntimeError("output differs from the unfused MLP")
        except Exception as error:
            setattr(module, linear_name, linear)
            setattr(module, act_name, activation)
            logger.warning("GELU not fused into %s (%s): keeping the separate activation", type(module).__name__, error)
            continue
        count += 1
    return count
