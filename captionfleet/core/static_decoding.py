"""Decoding steps without Python and launch overhead: a static KV cache per batch shape, which transformers
compiles on CUDA (``torch.compile(mode="reduce-overhead")``: the decoding step as captured CUDA graphs).

Why: on a GPU each of the 16 decoding steps of a batch is ~150 small kernels (12 GPT-2 layers), each launch
costing microseconds of Python and driver time, so at batch 128 the GPU mostly waits for the CPU. A static
cache gives every step the same tensor shapes and addresses, which is what CUDA graphs need; transformers'
``generate`` then runs the decoding steps through ``model.get_compiled_call`` (its default compile config
is ``reduce-overhead``) when the cache is compileable and the device is CUDA (``_valid_auto_compile_criteria``
in transformers/generation/utils.py). On a CPU the same static cache runs without compiling.

What this module adds to transformers' own ``cache_implementation="static"``:

- the caches are kept, one per *bucket* of rows (1, 2, 4, ... up to the batch size) for each decoding warmed
  up at load (a request's own beams or tokens decode through the dynamic cache), and reset between calls,
  so the compiled graphs (recorded against the caches' fixed addresses) are replayed, not recorded again; a
  batch is padded to its bucket with copies of its first image and the padding's output dropped, so a
  batcher that forms any size from 1 to ``max_items`` meets at most log2(max_items) + 1 shapes;
- beam search keeps captionfleet's shared cross-attention (core/beams.py): beams are reordered in the
  self-attention cache only, in place (transformers' reorder replaces the tensors, which would move them);
- ``warm_up`` runs each bucket once at load, so the compilation and graph capture happen before the first
  request, not during it.

Memory: each kept cache holds rows x beams x (its tokens + the encoder's 197 positions) keys and values per
layer: ~7.9 MB per row and beam for ViT-base + GPT-2 in fp16, ~2 GB for all buckets up to 128 rows greedy.

Captions equal the dynamic cache's, and a batch's equal its images' one by one: tested on CPU, where this
path runs without compiling (tests/unit/test_static_decoding.py); on CUDA with compiling only by
bench/device_check.py and bench/gpu.py, which have not yet run on a GPU. One difference on the CPU: there the
dynamic path attends with an image's beams together (core/beams.py, ``grouped_cross_attention``) and this
one per beam, so beam scores may differ in float32's last bits (tested within 1e-4; tokens equal); on
CUDA both attend per beam.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import EncoderDecoderCache, GenerationConfig, StaticCache

logger = logging.getLogger(__name__)


class SharedCrossStaticCache(EncoderDecoderCache):
    """Static self- and cross-attention caches whose beam reordering moves only the self-attention rows, in
    place (the tensors keep their addresses, which captured CUDA graphs read). Cross-attention rows of one
    image's beams are equal copies, as for core/beams.py's SharedCrossAttentionCache."""

    def __init__(self, decoder_config: Any, max_tokens: int, encoder_positions: int) -> None:
        super().__init__(
            StaticCache(config=decoder_config, max_cache_len=max_tokens),
            StaticCache(config=decoder_config, max_cache_len=encoder_positions),
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.self_attention_cache.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):  # None until the first step
                index = beam_idx.to(keys.device)
                keys.copy_(keys.index_select(0, index))
                values.copy_(values.index_select(0, index))


def buckets(max_rows: int) -> list[int]:
    """The batch shapes kept: powers of two below ``max_rows``, and ``max_rows`` itself."""
    sizes = [1 << k for k in range(max(1, max_rows).bit_length()) if 1 << k < max_rows]
    return [*sizes, max(1, max_rows)]


def bucket_for(rows: int, sizes: list[int]) -> int:
    """The smallest kept shape that holds ``rows``; ``rows`` itself past the largest (a cache not kept)."""
    return next((size for size in sizes if size >= rows), rows)


class StaticDecoding:
    """generate() with kept static caches, batches padded to their bucket. One per loaded model; from one
    thread at a time (the model thread), like the Captioner that holds it."""

    def __init__(self, model: Any, max_rows: int, sizes: Sequence[int] | None = None) -> None:
        self.model = model
        # ``sizes``: the buckets, where not the powers of two (a bench whose batches all have one size).
        self.sizes = sorted(set(sizes)) if sizes else buckets(max_rows)
        self._caches: dict[tuple[int, int, int], SharedCrossStaticCache] = {}
        # The decodings (beams, cache positions) warmed up: only theirs are kept. A request may ask for its
        # own beams and tokens (the HTTP API), and a kept cache per such decoding would grow without bound
        # (up to GBs each on a GPU) and compile on the serving path: those decode with the dynamic cache.
        self._warm: set[tuple[int, int]] = set()
        self.encoder_positions = self._encoder_positions(model)

    @staticmethod
    def _encoder_positions(model: Any) -> int:
        """The encoder's sequence length (the CLS token and the patches for a ViT): the cross cache's length."""
        encoder = model.config.encoder
        image_size, patch_size = getattr(encoder, "image_size", None), getattr(encoder, "patch_size", None)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise ValueError(
                f"the static KV cache needs a fixed-size ViT-style encoder (image_size and patch_size in its config); "
                f"this one is {type(encoder).__name__}: unset WORKER_MODEL__STATIC_CACHE"
            )
        return (image_size // patch_size) ** 2 + 1

    @staticmethod
    def _decoding(config: GenerationConfig) -> tuple[int, int]:
        # One more position than new tokens: the decoder start token is in the cache too.
        return config.num_beams or 1, int(config.max_new_tokens or 0) + 1

    def handles(self, config: GenerationConfig) -> bool:
        """Whether this decoding was warmed up (its caches are kept); others go through the dynamic cache."""
        return self._decoding(config) in self._warm

    def cache(self, rows: int, beams: int, max_new_tokens: int) -> SharedCrossStaticCache:
        """The kept cache for a bucket of ``rows`` images (reset), or a fresh one past the largest bucket."""
        # One more position than new tokens: the decoder start token is in the cache too.
        key = (rows, beams, max_new_tokens + 1)
        cache = self._caches.get(key)
        if cache is None:
            cache = SharedCrossStaticCache(self.model.config.decoder, key[2], self.encoder_positions)
            if rows in self.sizes and (beams, key[2]) in self._warm:
                self._caches[key] = cache
        else:
            with torch.inference_mode():  # its tensors were made under inference mode, where generate runs
                cache.reset()
        return cache

    def generate(self, pixel_values: torch.Tensor, config: GenerationConfig, **kwargs: Any) -> torch.Tensor | Any:
        """``model.generate`` for these pixels, through the kept cache of their bucket; the output has one
        row per image given (the padding's rows are dropped). ``kwargs``: generate's others (logits processors;
        never a cache: this passes its own)."""
        rows = pixel_values.shape[0]
        size = bucket_for(rows, self.sizes)
        if size > rows:  # copies of the first image: real work, whose output is dropped
            padding = pixel_values[:1].expand(size - rows, *pixel_values.shape[1:])
            pixel_values = torch.cat([pixel_values, padding])
        beams = config.num_beams or 1
        cache = self.cache(size, beams, int(config.max_new_tokens or 0))
        output = self.model.generate(pixel_values=pixel_values, generation_config=config, cache=cache, **kwargs)
        return _first_rows(output, rows) if size > rows else output

    def warm_up(
        self, pixel_shape: Iterable[int], dtype: torch.dtype, device: torch.device, configs: list[GenerationConfig]
    ) -> int:
        """Run every bucket once for each decoding config (compiling and capturing on CUDA); returns the runs."""
        runs = 0
        channels, height, width = pixel_shape
        for config in configs:
            self._warm.add(self._decoding(config))
            for size in self.sizes:
                pixels = torch.zeros(size, channels, height, width, dtype=dtype, device=device)
                with torch.inference_mode():
                    self.generate(pixels, config)
                runs += 1
        logger.info(
            "static KV cache: warmed up %d batch shapes %s x %d decodings", len(self.sizes), self.sizes, len(configs)
        )
        return runs


def _first_rows(output: Any, rows: int) -> Any:
    """generate()'s output for the first ``rows`` images: its sequences (and beam indices) cut there. Beam
    indices of the first images' beams point at rows below ``rows * beams``: unchanged by the cut."""
    if isinstance(output, torch.Tensor):
        return output[:rows]
    output.sequences = output.sequences[:rows]
    beam_indices = getattr(output, "beam_indices", None)
    if beam_indices is not None:
        output.beam_indices = beam_indices[:rows]
    return output
