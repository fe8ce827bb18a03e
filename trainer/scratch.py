"""Build a model from scratch: ViT encoder + GPT-2 decoder (``vision-encoder-decoder``), or GIT.

Used by the trainer (no ``--init-from``; ``--family`` picks which) and by tests that need a real checkpoint
without downloading one. The tokenizer is a byte-level BPE trained on the captions and wrapped so that it
saves and loads as a GPT-2 tokenizer; both families use it, so their captions are the same tokens.

GIT from scratch is sized by the same numbers: ``vit_*`` for its CLIP-style image encoder, ``gpt2_*`` for
its text decoder (which attends to the image tokens in the same self-attention, where GPT-2 cross-attends),
``max_positions`` for its text positions. Its image processor is CLIP's, as in real GIT checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    GPT2Config,
    GPT2Tokenizer,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

from captionfleet.core.family import VED

GIT = "git"

# GPT-2's single special token; it doubles as bos, eos and pad, exactly as in the
# production checkpoint (nlpconnect/vit-gpt2-image-captioning).
SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class ScratchSizes:
    image_size: int = 32  # pixels per side fed to the ViT
    patch_size: int = 8
    vit_hidden: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    gpt2_hidden: int = 64
    gpt2_layers: int = 2
    gpt2_heads: int = 2
    max_positions: int = 64  # longest caption in tokens, special tokens included
    vocab_size: int = 400  # target size for the BPE trainer (it may learn fewer)


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> GPT2Tokenizer:
    """Byte-level BPE, trained on the captions, saved/loaded as a GPT-2 tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return GPT2Tokenizer(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def build_model(
    captions: Iterable[str], sizes: ScratchSizes = ScratchSizes(), seed: int = 0
) -> tuple[VisionEncoderDecoderModel, ViTImageProcessorPil, GPT2Tokenizer]:
    """A randomly initialised model with a tokenizer trained on ``captions``."""
    import torch

    tokenizer = train_tokenizer(captions, sizes.vocab_size)
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL)
    assert isinstance(special_id, int), "a single token maps to a single id"
    encoder = ViTConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vit_hidden,
        num_hidden_layers=sizes.vit_layers,
        num_attention_heads=sizes.vit_heads,
        intermediate_size=4 * sizes.vit_hidden,
    )
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=sizes.max_positions,
        n_embd=sizes.gpt2_hidden,
        n_layer=sizes.gpt2_layers,
        n_head=sizes.gpt2_heads,
        bos_token_id=special_id,
        eos_token_id=special_id,
        add_cross_attention=True,
    )
    decoder.is_decoder = True
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = special_id
    config.pad_token_id = special_id
    config.eos_token_id = special_id
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.decoder_start_token_id = special_id
    model.generation_config.bos_token_id = special_id
    model.generation_config.eos_token_id = special_id
    model.generation_config.pad_token_id = special_id
    processor = scratch_image_processor(VED, sizes)
    return model, processor, tokenizer


def scratch_image_processor(family: str, sizes: ScratchSizes) -> Any:
    """The image processor a new model of ``family`` gets (the data is sized by it before the model exists)."""
    side = sizes.image_size
    if family == GIT:
        # CLIP's, like real GIT checkpoints' (shorter side, then a centre crop; CLIP's mean and std, bicubic):
        # a model made here is then fine-tuned and served exactly like one from the hub.
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return ViTImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_git_model(
    captions: Iterable[str], sizes: ScratchSizes = ScratchSizes(), seed: int = 0
) -> tuple[GitForCausalLM, GitProcessor, GPT2Tokenizer]:
    """A randomly initialised GIT with a tokenizer trained on ``captions`` and CLIP's image processor."""
    import torch

    tokenizer = train_tokenizer(captions, sizes.vocab_size)
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL)
    assert isinstance(special_id, int), "a single token maps to a single id"
    config = GitConfig(
        vision_config={
            "image_size": sizes.image_size,
            "patch_size": sizes.patch_size,
            "hidden_size": sizes.vit_hidden,
            "num_hidden_layers": sizes.vit_layers,
            "num_attention_heads": sizes.vit_heads,
            "intermediate_size": 4 * sizes.vit_hidden,
        },
        vocab_size=len(tokenizer),
        hidden_size=sizes.gpt2_hidden,
        num_hidden_layers=sizes.gpt2_layers,
        num_attention_heads=sizes.gpt2_heads,
        intermediate_size=4 * sizes.gpt2_hidden,
        max_position_embeddings=sizes.max_positions,
        # As in the ViT-GPT2 model: GPT-2's one special token starts, ends and pads every caption.
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    model.generation_config.bos_token_id = special_id
    model.generation_config.eos_token_id = special_id
    model.generation_config.pad_token_id = special_id
    return model, GitProcessor(scratch_image_processor(GIT, sizes), tokenizer), tokenizer
