"""Make a loaded VisionEncoderDecoder model fast on the device it runs on, keeping captions right.

Precisions (``Captioner.from_dir(..., precision=...)``, ``WORKER_MODEL__PRECISION``):

- ``fp32``: float32 weights and math. On CPUs the Linear layers (and GPT-2's Conv1D, converted to
  Linear) go through oneDNN's packed-weight GEMM instead of torch's default (MKL on x86), each MLP's
  GELU inside its first GEMM (captionfleet/core/onednn.py). Only the summation order and the GELU's
  kernel change (differences ~1e-6 relative), so this is the lossless path.
- ``bf16``: the whole model cast to bfloat16 (a cast, not autocast: autocast re-casts weights every
  call, which is slower at small batches). Uses AVX-512 BF16 / AMX where the CPU has them. The
  Linear layers are packed for oneDNN and the GELU fused, as for fp32.
- ``int8``: every Linear (lm_head included) with int8 weights, one scale per output channel, and
  int8 activations with one scale per *row* (token), computed at run time (captionfleet/core/int8_linear.py).
  A row's output depends only on that row, so a caption is the same alone or in any batch. Needs an
  exact int8 GEMM (``torch._int_mm``): 8-bit weights where the CPU has VNNI/AMX, 7-bit where it has
  only AVX2 (16-bit sums would saturate); where neither is exact, ``int8`` resolves to ``fp32`` with a
  warning.
- ``fp16``: half precision, the CUDA choice.
- ``auto``: the default per device: ``fp16`` on CUDA; on CPU ``bf16`` when the CPU has native
  bf16 matmul (AVX-512 BF16 or AMX), else ``int8`` where its GEMM is exact, else ``fp32``.

Why that ``auto`` (figures in docs/benchmarks.md, "Batch-invariant int8"): every choice keeps
captions independent of batch composition and agrees with fp32 on >= 99% of the built-in model's
captions on fresh pictures (tests/unit/test_fastpath.py), and among those it is the fastest measured.
On an Intel Xeon with AMX (one thread, full ViT-base + GPT-2, greedy, batch 8, CPU ms per image):
bf16 ~190, int8 ~330, fp32 ~510, so bf16 there. With the same machine limited to AVX2 (torch, oneDNN
and MKL told so by environment variables: the closest measured stand-in for an AVX2-only CPU such as
AMD Zen 3, which emulates bf16): int8 ~565, fp32 ~745, so int8 there. A former ``int8-bf16`` (int8
encoder, bf16 decoder) measured slower than bf16 where bf16 is native (~300 vs ~190) and needs bf16
where it is emulated: it is gone.

This module resolves the precision and applies it (``optimize``): GPT-2's Conv1D -> Linear conversion
that every CPU precision starts with, int8 quantization, the decoder's attention kernel, and the memory
that loading leaves behind. The oneDNN GEMM route and GELU fusion live in captionfleet/core/onednn.py.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

# A module, not its names, so that each call looks its function up there (what tests patch); aliased
# because optimize()'s `onednn` flag would shadow the module's own name.
from captionfleet.core import int8_linear as i8
from captionfleet.core import onednn as dnn
from captionfleet.core.beams import use_grouped_decoder_attention

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "int8", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8", "fp16")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bf16 matmul is emulated and slower than fp32."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: get_cpu_capability() said AVX-512, which implies BF16 only on newer parts
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """The one place a requested precision becomes the one applied (the rule: this module's docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "int8":
            raise ValueError("precision 'int8' is CPU-only; use fp16, bf16 or fp32 on CUDA")
        return "fp16" if precision == "auto" else precision
    if precision == "fp16":
        raise ValueError("precision 'fp16' is for CUDA; on CPU use bf16 (or auto)")
    if precision == "auto":
        if cpu_has_native_bf16():
            return "bf16"
        return "int8" if i8.int8_gemm_weight_range() is not None else "fp32"
    if precision == "int8" and i8.int8_gemm_weight_range() is None:
        logger.warning("precision int8: this CPU has no exact int8 GEMM (torch._int_mm), using fp32 instead")
        return "fp32"
    return precision


# -- GPT-2 Conv1D -> nn.Linear ------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight (in, out), y = x @ W + b. Matched by name so that a
    # transformers release moving the class does not break loading (it would just not convert).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, nn.Parameter)


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2's Conv1D layers by equivalent nn.Linear layers; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_conv1d(child):
                continue
            weight = cast(torch.Tensor, child.weight)
            bias = cast(torch.Tensor | None, child.bias)
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
            setattr(parent, name, linear)
            count += 1
    return count


# -- int8 ---------------------------------------------------------------------------------------


def quantize_int8(module: nn.Module) -> int:
    """Every float32 Linear of ``module`` (GPT-2's Conv1D already converted) to a batch-invariant int8
    layer, in place (captionfleet/core/int8_linear.py); returns how many. Needs
    ``int8_gemm_weight_range()``, which ``resolve_precision`` checked."""
    weight_range = i8.int8_gemm_weight_range()
    if weight_range is None:
        raise RuntimeError("this CPU has no exact int8 GEMM: use precision fp32 or auto")
    return i8.quantize_linears(module, weight_range)


# -- attention -----------------------------------------------------------------------------------


def use_eager_decoder_attention(model: Any) -> bool:
    """Run the decoder's attention as plain matmul + softmax instead of SDPA; True if switched.

    Why: each decoding step attends with a single query token, and torch's CPU flash-attention
    kernel in bf16 is tiled for long queries: in a profile (ViT-base + GPT-2, batch 32, greedy, one
    thread) the decoder's SDPA calls took 9 ms each, 23% of the whole run, and switching the decoder
    to eager attention made bf16 captioning 1.2x faster with identical captions. In fp32 the kernel is
    not as slow, but eager still measured faster with identical tokens (same process, alternating, two
    threads: greedy batch 32 3.65 -> 3.86 images/s, 4 beams batch 8 1.86 -> 1.91; int8 greedy 7.21 ->
    7.44), so every CPU precision uses it. The encoder keeps SDPA: eager measured 5% slower there.
    A GPT-2 decoder with beam-shared projections gets core/beams.py's grouped attention instead (eager
    attention, with an image's beams attending together); this is the fallback for the others.
    """
    decoder = getattr(model, "decoder", None)
    setter = getattr(decoder, "set_attn_implementation", None)
    if decoder is None or setter is None:
        return False
    try:
        setter("eager")
    except Exception as error:  # an architecture that cannot switch keeps SDPA: slower, still right
        logger.info("decoder attention stays %s (%s)", decoder.config._attn_implementation, error)
        return False
    return True


# -- memory ---------------------------------------------------------------------------------------


def release_checkpoint_file(model: nn.Module) -> int:
    """Copy every tensor the model still shares with the checkpoint file into process memory; returns
    how many were copied.

    Why: a float32 checkpoint loaded as float32 is a set of views into the safetensors file's memory
    map. Once every layer is converted or packed, a few of those views (embeddings, layer norms, biases)
    still keep the whole map alive, and every page of it was read during packing, so the process kept
    the entire file resident beside its packed copy: the fp32 path held 2.26 GB after loading the full
    ViT-base + GPT-2 model, 1.0 GB of it the file. Copying the leftovers (small next to the file)
    drops the map: 1.51 GB.
    """
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.data = param.data.clone()
                copied += 1
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.clone())
                copied += 1
            if isinstance(module, dnn.OneDNNLinear) and module.bias is not None:
                module.bias = module.bias.clone()
                copied += 1
    return copied


def return_freed_heap() -> bool:
    """Hand the pages of the C heap that are free back to the OS (glibc's ``malloc_trim``); True if it
    could (glibc on Linux), False elsewhere, where nothing is done.

    Why: loading and converting a model frees many tensors below glibc's mmap threshold (the
    checkpoint's float32 values cast one by one, Conv1D weights before transposing, the probes of
    onednn's checks), and glibc keeps their pages for reuse, so they stay in the process's RSS. On
    the full ViT-base + GPT-2 model in bf16 this returned ~140 MB: RSS after loading 1112 -> 971 MB,
    peak while captioning a batch of 32 1482 -> 1424 MB.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    trim(0)
    return True


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks up to this come from the heap once reuse_freed_memory() ran: a CPU batch's largest tensors (32 images:
# the encoder's MLP activations, 32 x 197 x 3072 floats = 77.5 MB, several per layer on the int8 path; a 4-beam
# step's logits, 26 MB), with room for larger batches. glibc before 2.35 refuses more than 32 MB; then 32 MB.
_MMAP_THRESHOLD = 256 * 1024 * 1024
_MMAP_THRESHOLD_OLD_GLIBC = 32 * 1024 * 1024
# The free memory at the heap's top that glibc keeps rather than hands back (return_freed_heap still hands
# it back explicitly after a model is loaded, and after a hot swap drops the old one: worker/hotswap.py).
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def reuse_freed_memory() -> bool:
    """Let the C heap keep the large blocks captioning frees, for the next step and batch to reuse; True
    if set (glibc on Linux), False elsewhere, where nothing is done. Process-wide, and idempotent.

    Why: every decoding step and encoder layer allocates and frees the same large tensors (a 4-beam
    step's logits for 8 images: 32 x 50257 floats = 6.4 MB, as float32 and int32 alike; the encoder's MLP
    activations: 19 MB). glibc's defaults serve such blocks with fresh mmaps (its threshold starts at 128
    KiB and follows the largest block freed), and hand the heap's top back to the OS whenever more than
    twice that threshold is free at once, as it often is when a layer's tensors are freed: so the same
    memory came back as new zeroed pages over and over, ~30,000 page faults per image. Fixed thresholds keep it: full
    ViT-base + GPT-2, int8 limited to AVX2, 4 beams, batch 8, one thread, 687 -> 643 CPU ms per image
    (minor page faults per 16 images 500,000 -> ~0). The RSS it keeps is what a batch needed anyway.

    One arena: glibc gives threads other than the main one arenas of 64 MiB heaps, where a larger block is a
    fresh mmap whatever the threshold (a streaming or HTTP worker runs its model on a thread of its own:
    80 MiB blocks there faulted 217,000 pages over 10 rounds, 1-10,000 with one arena). Threads that took an
    arena before this call may keep theirs, so the image sets MALLOC_ARENA_MAX=1 from the start (Dockerfile).

    True means glibc took the settings: with another allocator preloaded (jemalloc, tcmalloc) glibc's mallopt
    still answers but allocations no longer go through it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if not mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and not mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_OLD_GLIBC):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, 1))


# -- entry point --------------------------------------------------------------------------------


def optimize(model: Any, precision: str, device: torch.device, *, onednn: bool = True) -> tuple[Any, torch.dtype]:
    """Apply ``precision`` (already resolved) to a float32 model on ``device``, in eval mode.

    Returns the model and the dtype its pixel input must have.
    """
    if device.type == "cuda":
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return model.to(device, dtype), dtype
    # Beams of an image attend to its cross-attention keys together (core/beams.py), else eager attention.
    use_grouped_decoder_attention(model) or use_eager_decoder_attention(model)
    if precision == "fp32":
        if onednn:
            converted = conv1d_to_linear(model)
            routed = dnn.route_linears_to_onednn(model)
            fused = dnn.fuse_gelu(model)
            logger.info(
                "fp32: %d Conv1D converted, %d Linear routed through oneDNN, %d GELU fused", converted, routed, fused
            )
        release_checkpoint_file(model)
        return model, torch.float32
    if precision == "bf16":
        # Conv1D -> Linear first, so GPT-2's layers can be packed for oneDNN's bf16 GEMM too.
        conv1d_to_linear(model)
        model = model.to(torch.bfloat16)
        if onednn:
            routed = dnn.route_linears_to_onednn(model)
            fused = dnn.fuse_gelu(model)
            logger.info("bf16: %d Linear routed through packed oneDNN, %d GELU fused", routed, fused)
        return model, torch.bfloat16
    if precision == "int8":
        conv1d_to_linear(model)
        quantized = quantize_int8(model)
        release_checkpoint_file(model)  # what quantizing left as views into the file: embeddings, norms
        logger.info("int8: %d Linear quantized (per-row activation scales)", quantized)
        return model, torch.float32
    raise ValueError(f"precision {precision!r} is not available on {device}")
