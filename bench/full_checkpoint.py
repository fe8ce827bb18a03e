"""The reference production architecture with random weights, saved as a real checkpoint.

`nlpconnect/vit-gpt2-image-captioning` is ViT-base/16 at 224 px + GPT-2 124M with GPT-2's 50,257
token vocabulary. Weights cannot be downloaded here, but random weights have the same compute
cost, so benchmarks use this. The tokenizer has the right vocabulary *size* (the lm_head is a
large part of the decoder's cost) with placeholder tokens, so captions are meaningless strings.

``vit`` / ``gpt2``: overrides of the two configs (a test builds the same checkpoint in miniature).

    python -m bench.full_checkpoint OUT_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2Tokenizer,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

GPT2_VOCAB = 50257
EOS = "<|endoftext|>"


def placeholder_tokenizer() -> GPT2Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    for i in range(len(vocab), GPT2_VOCAB - 1):
        vocab[f"w{i}"] = i
    vocab[EOS] = GPT2_VOCAB - 1  # GPT-2's eos id is 50256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return GPT2Tokenizer(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def full_config(
    vit: Mapping[str, Any] | None = None, gpt2: Mapping[str, Any] | None = None
) -> VisionEncoderDecoderConfig:
    """ViT-base/16-224 (ViTConfig's defaults) + GPT-2 124M (GPT2Config's) with cross-attention."""
    decoder = GPT2Config(
        add_cross_attention=True, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1, **dict(gpt2 or {})
    )
    decoder.is_decoder = True
    config = cast(
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(**dict(vit or {})), decoder),
    )
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = GPT2_VOCAB - 1
    return config


def save_full_checkpoint(
    path: Path, seed: int = 0, *, vit: Mapping[str, Any] | None = None, gpt2: Mapping[str, Any] | None = None
) -> Path:
    config = full_config(vit, gpt2)
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    side = int(getattr(config.encoder, "image_size", 224))
    ViTImageProcessorPil(
        size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(path)
    placeholder_tokenizer().save_pretrained(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.full_checkpoint OUT_DIR")
    print(save_full_checkpoint(Path(sys.argv[1])))
