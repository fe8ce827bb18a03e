"""Tiny random checkpoints of every tested model family, built locally (no download) and saved as
safetensors with their processors, as ``save_pretrained`` writes them.

Each is a family's own config classes shrunk to a few thousand weights (hidden sizes 32-64, one or two
layers) with a tokenizer made here from a tiny vocabulary. Random weights tend to emit one token
forever, which would make "a batch equals one by one" hold trivially: the word embeddings and the
output head are scaled up (``_vary``) so that captions differ from image to image, and the tests
check that they do.

``build(family, folder)`` writes one; the ``tiny_family`` fixture (tests/conftest.py) caches them per
session. ``pictures(n)`` are images they caption differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# The video part needs torchvision, which cannot be loaded here: the checkpoints are saved without it.
from captionfleet.core.processors import images_only

# Words the tiny tokenizers know: enough for the default prompts and for captions to differ.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "is",
    "are",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "star",
    "triangle",
    "small",
    "large",
    "two",
    "three",
    "picture",
    "photo",
    "image",
    "describe",
    "this",
    "one",
    "sentence",
    "what",
    "does",
    "show",
    "user",
    "assistant",
    "caption",
    "en",
    "system",
    "you",
    "helpful",
    "left",
    "right",
    "above",
    "below",
    "big",
    "tiny",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "sky",
]
PUNCTUATION = list(".,:?!")
# The vocabulary is padded to a multiple of this (some families want it).
VOCAB_MULTIPLE = 64
# The spread of the tiny models' weights (see _vary).
VARY_STD = 0.2

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER_ASSISTANT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_tokenizer(
    specials: Sequence[str],
    *,
    template: tuple[str, str] | None = None,
    extra: dict[str, str] | None = None,
    **named: str,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``specials`` first (ids 0, 1, ...), then WORDS and filler words.
    ``named``: bos_token="<s>" and the like; ``template``: (single, tokens) for a post-processor that
    adds them (BERT's "[CLS] $A [SEP]"); ``extra``: the family's named extra tokens (image_token, ...)."""
    vocab: dict[str, int] = {}
    for token in [*specials, *WORDS, *PUNCTUATION]:
        vocab.setdefault(token, len(vocab))
    filler = 0
    while len(vocab) % VOCAB_MULTIPLE:
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token=named.get("unk_token", specials[0])))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, punctuation attached
    if template is not None:
        single, tokens = template
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(token, vocab[token]) for token in tokens.split()]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=extra or {}, **named)
    listed = set(named.values()) | set((extra or {}).values())
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [token for token in specials if token not in listed]},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def token_ids(tokenizer: PreTrainedTokenizerFast) -> Callable[[str], int]:
    """The id of one of the tokenizer's tokens."""

    def get(token: str) -> int:
        found = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(found, int)
        return found

    return get


def _vary(model: torch.nn.Module, seed: int, std: float = VARY_STD) -> None:
    """Every matrix drawn again with a larger spread than transformers' initialisation (0.02), so that
    what the image holds reaches the words and greedy decoding does not settle on one token at once.
    Norms and biases keep their values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _save(model: Any, processor: Any, folder: Path) -> Path:
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


# -- the families ------------------------------------------------------------------------------------


def _bert_specials() -> dict[str, Any]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    return {
        "specials": specials,
        "template": ("[CLS] $A [SEP]", "[CLS] [SEP]"),
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }


def build_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    spec = _bert_specials()
    tokenizer = tiny_tokenizer(spec.pop("specials"), template=spec.pop("template"), bos_token="[DEC]", **spec)
    ids = token_ids(tokenizer)
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": ids("[DEC]"),
            "sep_token_id": ids("[SEP]"),
            "eos_token_id": ids("[SEP]"),
            "pad_token_id": ids("[PAD]"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return _save(model, BlipProcessor(image_processor, tokenizer), folder)


def build_git(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    spec = _bert_specials()
    tokenizer = tiny_tokenizer(spec.pop("specials"), template=spec.pop("template"), **spec)
    ids = token_ids(tokenizer)
    config = GitConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=ids("[CLS]"),
        eos_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    _vary(model, seed)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(model, GitProcessor(image_processor, tokenizer), folder)


def _llama_text(vocab: int, **ids: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        **ids,
    }


def build_florence2(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tokenizer = tiny_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"],
        extra={"image_token": "<image>"},
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    ids = token_ids(tokenizer)
    config = Florence2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
            "bos_token_id": ids("<s>"),
            "pad_token_id": ids("<pad>"),
            "eos_token_id": ids("</s>"),
            "decoder_start_token_id": ids("</s>"),
            "forced_eos_token_id": None,
            "forced_bos_token_id": None,
        },
        vision_config={
            "depths": [1, 1],
            "patch_size": [7, 3],
            "patch_stride": [4, 2],
            "patch_padding": [3, 1],
            "patch_prenorm": [False, True],
            "embed_dim": [32, 64],
            "num_heads": [2, 2],
            "num_groups": [2, 2],
            "window_size": 2,
            "drop_path_rate": 0.0,
            "projection_dim": 32,
            "max_position_embeddings": 8,
            "max_temporal_embeddings": 2,
        },
        image_token_id=ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = CLIPImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False
    )
    cast(Any, image_processor).image_seq_length = 17  # (32 / 8)^2 patches + 1 pooled
    return _save(model, Florence2Processor(image_processor, tokenizer), folder)


def build_paligemma(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = tiny_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        extra={"image_token": "<image>"},
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    ids = token_ids(tokenizer)
    vocab = len(tokenizer)
    config = PaliGemmaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "gemma",
            **_llama_text(vocab),
            "bos_token_id": ids("<bos>"),
            "eos_token_id": ids("<eos>"),
            "pad_token_id": ids("<pad>"),
        },
        image_token_index=ids("<image>"),
        vocab_size=vocab,
        projection_dim=32,
        hidden_size=32,
        tie_word_embeddings=False,
    )
    cast(Any, config.text_config).num_image_tokens = 16
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    cast(Any, image_processor).image_seq_length = 16
    return _save(model, PaliGemmaProcessor(image_processor, tokenizer), folder)


def _idefics_tokenizer() -> PreTrainedTokenizerFast:
    grid = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    return tiny_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<end_of_utterance>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            *grid,
            "User",
            "Assistant",
        ],
        extra={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
    )


def _idefics_config(config_class: Any, vision_type: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    ids = token_ids(tokenizer)
    return config_class(
        text_config={
            "model_type": "llama",
            **_llama_text(len(tokenizer)),
            "bos_token_id": ids("<|im_start|>"),
            "eos_token_id": ids("<end_of_utterance>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "model_type": vision_type,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=ids("<image>"),
    )


def build_smolvlm(folder: Path, seed: int = 0) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor

    tokenizer = _idefics_tokenizer()
    config = _idefics_config(SmolVLMConfig, "smolvlm_vision", tokenizer)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = images_only(SmolVLMProcessor)(
        image_processor, tokenizer, video_processor=None, image_seq_len=4, chat_template=USER_ASSISTANT_TEMPLATE
    )
    return _save(model, processor, folder)


def build_idefics3(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = _idefics_tokenizer()
    config = _idefics_config(Idefics3Config, "idefics3_vision", tokenizer)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=USER_ASSISTANT_TEMPLATE)
    return _save(model, processor, folder)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "system",
            "assistant",
        ],
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )


def _build_qwen(folder: Path, seed: int, family: str) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    tokenizer = _qwen_tokenizer()
    ids = token_ids(tokenizer)
    text = {
        **_llama_text(len(tokenizer)),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    vision: dict[str, Any] = {
        "depth": 1,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_vl":
        vision |= {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}
    elif family == "qwen2_5_vl":
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 32,
            "window_size": 32,
            "fullatt_block_indexes": [0],
        }
    else:  # qwen3_vl
        text["rope_parameters"] |= {"mrope_interleaved": True}
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        }
    config = AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    _vary(model, seed)
    # 16 px per merged token: from 2x2 to 4x4 visual tokens, depending on each image's size.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    processor = images_only(Qwen2VLProcessor)(
        image_processor, tokenizer, video_processor=None, chat_template=CHATML_TEMPLATE
    )
    return _save(model, processor, folder)


def build_llava(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>", "USER", "ASSISTANT"],
        extra={"image_token": "<image>"},
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    ids = token_ids(tokenizer)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            **_llama_text(len(tokenizer)),
            "bos_token_id": ids("<s>"),
            "eos_token_id": ids("</s>"),
            "pad_token_id": ids("<pad>"),
        },
        image_token_index=ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _vary(model, seed)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops again
        chat_template=LLAVA_TEMPLATE,
    )
    return _save(model, processor, folder)


BUILDERS: dict[str, Callable[[Path, int], Path]] = {
    "blip": build_blip,
    "git": build_git,
    "florence2": build_florence2,
    "paligemma": build_paligemma,
    "smolvlm": build_smolvlm,
    "idefics3": build_idefics3,
    "qwen2_vl": lambda folder, seed: _build_qwen(folder, seed, "qwen2_vl"),
    "qwen2_5_vl": lambda folder, seed: _build_qwen(folder, seed, "qwen2_5_vl"),
    "qwen3_vl": lambda folder, seed: _build_qwen(folder, seed, "qwen3_vl"),
    "llava": build_llava,
}


def pictures(count: int) -> list[Image.Image]:
    """Images that differ in colour, pattern and size (captions of random models follow them; noise
    images would all look alike to them)."""
    sizes = [(40, 30), (64, 64), (20, 50), (90, 40), (33, 33), (70, 20), (48, 96), (25, 25)]
    colours = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0), (0, 0, 0), (255, 255, 255), (0, 128, 128)]
    images = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        rows, columns = np.mgrid[0:height, 0:width]
        ramp = ((columns * (index + 1) + rows * (5 + index)) % 64 / 64.0)[..., None]
        base = np.array(colours[index % len(colours)], dtype=np.float32)
        images.append(Image.fromarray(np.clip(base * (0.5 + ramp), 0, 255).astype(np.uint8)))
    return images


def build(family: str, folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = BUILDERS[family](folder, seed)
    json.loads((path / "config.json").read_text())  # written whole
    return path
