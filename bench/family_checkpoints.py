"""Full-size architectures of the benchmarked families with random weights, saved as real checkpoints.

The hub checkpoints cannot be downloaded here, but a model built from its family's config classes at the
published sizes costs what the real one costs, which is all a speed benchmark needs. The sizes are the
values of each hub checkpoint's config.json and preprocessor_config.json, written out below:

  vit-gpt2   nlpconnect/vit-gpt2-image-captioning  ViT-B/16 at 224 px + GPT-2 124M, vocab 50257
             (bench/full_checkpoint.py, the checkpoint bench.compare measures)
  blip       Salesforce/blip-image-captioning-base  ViT-B/16 at 384 px + a 12-layer BERT-base decoder with
             cross-attention, vocab 30524
  git        microsoft/git-base                     CLIP ViT-B/16 at 224 px + a 6-layer BERT-like decoder over
             the image tokens, vocab 30522
  florence2  florence-community/Florence-2-base     DaViT (widths 128-1024, depths 1-1-9-1, 7 px / 3 px
             patches, windows of 12) at 768 px + BART-base (6 + 6 layers, 768 wide); vocab 51289 + <image>,
             padded to 51328 as transformers' conversion does
  smolvlm    HuggingFaceTB/SmolVLM-256M-Instruct    SigLIP-B/16 at 512 px per tile + SmolLM2-135M (30 layers,
             576 wide, 9 heads / 3 kv heads), vocab 49280; an image is resized to 2048 px on its long side
             and cut into 512 px tiles plus one global view, 64 tokens each (model_type idefics3, as its
             config.json says; transformers' smolvlm classes compute the same)

Each tokenizer is a word-level vocabulary of the real size (the output layer's width is a large part of
decoding's cost) with the family's special tokens at their real ids and placeholder words ("w123")
elsewhere, so captions are token soup. The processor is the family's own class around its image
processor class with the published settings (the PIL image processors: torchvision cannot be loaded here).

``shrink`` (tests, ``--tiny`` smoke runs): overrides per part of the sizes, ``{"text": {...}, "vision":
{...}, "top": {...}, "image": {...}}``, to build the same checkpoint in miniature; vocabularies and special
ids stay real (an embedding of 50k rows x 32 is small).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from bench.full_checkpoint import full_config, save_full_checkpoint

Part = dict[str, Any]
Shrink = Mapping[str, Mapping[str, Any]]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BICUBIC, LANCZOS = 3, 1  # PIL's resample codes, as the published processor configs write them


def sized(published: Mapping[str, Any], shrink: Shrink | None, part: str) -> Part:
    """The published values of one part with a test's overrides on top."""
    return {**published, **dict((shrink or {}).get(part, {}))}


def word_level_tokenizer(
    size: int,
    specials: Mapping[str, int],
    named: Mapping[str, str],
    *,
    template: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """``size`` tokens: ``specials`` at their ids, placeholder words elsewhere. ``named``: {"bos_token":
    "<s>", ...}, with an unk_token; ``template``: a post-processor such as BERT's "[CLS] $A [SEP]";
    ``extra``: the family's named extra tokens (image_token, ...)."""
    if any(not 0 <= index < size for index in specials.values()):
        raise ValueError(f"special token ids outside a vocabulary of {size}: {dict(specials)}")
    by_id = {index: token for token, index in specials.items()}
    vocab = {by_id.get(index, f"w{index}"): index for index in range(size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=named["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=template,
            special_tokens=[(token, specials[token]) for token in template.split() if token in specials],
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=dict(extra or {}), **dict(named))
    listed = set(named.values()) | set((extra or {}).values())
    # Special tokens are matched whole before the whitespace split ("<image>" stays one token).
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [token for token in specials if token not in listed]},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


# -- BLIP-base -------------------------------------------------------------------------------------

BLIP_TEXT: Part = {
    "vocab_size": 30524,  # bert-base-uncased's 30522 + [DEC] + [ENC]
    "hidden_size": 768,
    "encoder_hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "bos_token_id": 30522,
    "sep_token_id": 102,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
BLIP_VISION: Part = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": 16,
}
BLIP_TOP: Part = {"projection_dim": 512, "image_text_hidden_size": 256}
BLIP_IMAGE: Part = {"size": {"height": 384, "width": 384}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_NAMED = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def blip_config(shrink: Shrink | None = None) -> PretrainedConfig:
    from transformers import BlipConfig

    return BlipConfig(
        text_config=sized(BLIP_TEXT, shrink, "text"),
        vision_config=sized(BLIP_VISION, shrink, "vision"),
        **sized(BLIP_TOP, shrink, "top"),
    )


def save_blip(folder: Path, shrink: Shrink | None, seed: int) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    config = blip_config(shrink)
    vocab = int(config.text_config.vocab_size)
    tokenizer = word_level_tokenizer(
        vocab,
        {**BERT_SPECIALS, "[DEC]": vocab - 2, "[ENC]": vocab - 1},
        {**BERT_NAMED, "bos_token": "[DEC]"},
        template="[CLS] $A [SEP]",
    )
    image = BlipImageProcessorPil(resample=BICUBIC, **sized(BLIP_IMAGE, shrink, "image"))
    _save(BlipForConditionalGeneration, config, BlipProcessor(image, tokenizer), folder, seed)


# -- GIT-base --------------------------------------------------------------------------------------

GIT_TEXT: Part = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "max_position_embeddings": 1024,
    "bos_token_id": 101,
    "eos_token_id": 102,
    "pad_token_id": 0,
}
GIT_VISION: Part = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
}
GIT_IMAGE: Part = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}


def git_config(shrink: Shrink | None = None) -> PretrainedConfig:
    from transformers import GitConfig

    return GitConfig(vision_config=sized(GIT_VISION, shrink, "vision"), **sized(GIT_TEXT, shrink, "text"))


def save_git(folder: Path, shrink: Shrink | None, seed: int) -> None:
    from transformers import CLIPImageProcessorPil, GitForCausalLM, GitProcessor

    config = git_config(shrink)
    tokenizer = word_level_tokenizer(int(config.vocab_size), BERT_SPECIALS, BERT_NAMED, template="[CLS] $A [SEP]")
    image = CLIPImageProcessorPil(resample=BICUBIC, **sized(GIT_IMAGE, shrink, "image"))
    _save(GitForCausalLM, config, GitProcessor(image, tokenizer), folder, seed)


# -- Florence-2-base -------------------------------------------------------------------------------

FLORENCE_TOKENS = 51289  # BART's 50265 + 1000 location tokens + task tokens; <image> comes after them
FLORENCE_TEXT: Part = {
    "vocab_size": padded(FLORENCE_TOKENS + 1, 64),  # transformers' conversion pads the embeddings to 64
    "d_model": 768,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 12,
    "decoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "decoder_ffn_dim": 3072,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    # BART's config forces <s> first and </s> at max_length: both precisions would agree on those
    # tokens trivially, and the work per step is the same without them.
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}
FLORENCE_VISION: Part = {
    "depths": [1, 1, 9, 1],
    "patch_size": [7, 3, 3, 3],
    "patch_stride": [4, 2, 2, 2],
    "patch_padding": [3, 1, 1, 1],
    "patch_prenorm": [False, True, True, True],
    "embed_dim": [128, 256, 512, 1024],
    "num_heads": [4, 8, 16, 32],
    "num_groups": [4, 8, 16, 32],
    "window_size": 12,
    "projection_dim": 768,
    "max_position_embeddings": 50,
    "max_temporal_embeddings": 100,
    "drop_path_rate": 0.0,
}
FLORENCE_IMAGE: Part = {
    "size": {"height": 768, "width": 768},
    "crop_size": {"height": 768, "width": 768},
    "do_center_crop": False,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
}


def florence2_config(shrink: Shrink | None = None) -> PretrainedConfig:
    from transformers import Florence2Config

    return Florence2Config(
        text_config=sized(FLORENCE_TEXT, shrink, "text"),
        vision_config=sized(FLORENCE_VISION, shrink, "vision"),
        image_token_id=FLORENCE_TOKENS,
    )


def save_florence2(folder: Path, shrink: Shrink | None, seed: int) -> None:
    from transformers import CLIPImageProcessorPil, Florence2ForConditionalGeneration, Florence2Processor

    config = florence2_config(shrink)
    tokenizer = word_level_tokenizer(
        FLORENCE_TOKENS + 1,
        {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<image>": FLORENCE_TOKENS},
        {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        extra={"image_token": "<image>"},
    )
    settings = sized(FLORENCE_IMAGE, shrink, "image")
    image = CLIPImageProcessorPil(resample=BICUBIC, **settings)
    # The DaViT's strides (4 x 2 x 2 x 2) leave one token per 32 px, plus one pooled token: 577 at 768 px.
    stride = 1
    for step in config.vision_config.patch_stride:
        stride *= int(step)
    image.image_seq_length = (int(settings["size"]["height"]) // stride) ** 2 + 1  # type: ignore[attr-defined]
    _save(Florence2ForConditionalGeneration, config, Florence2Processor(image, tokenizer), folder, seed)


# -- SmolVLM-256M-Instruct -------------------------------------------------------------------------

SMOLVLM_TEXT: Part = {
    "model_type": "llama",
    "vocab_size": 49280,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "bos_token_id": 1,
    "eos_token_id": 49279,  # <end_of_utterance>: where an answer ends
    "pad_token_id": 2,
}
SMOLVLM_VISION: Part = {
    "model_type": "idefics3_vision",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
}
SMOLVLM_TOP: Part = {"scale_factor": 4, "image_token_id": 49190, "tie_word_embeddings": False}
SMOLVLM_IMAGE: Part = {
    "size": {"longest_edge": 2048},
    "max_image_size": {"longest_edge": 512},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
SMOLVLM_SPECIALS: dict[str, int] = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<global-img>": 49152,
    **{f"<row_{row}_col_{col}>": 49153 + 6 * (row - 1) + (col - 1) for row in range(1, 7) for col in range(1, 7)},
    "<fake_token_around_image>": 49189,
    "<image>": 49190,
    "<end_of_utterance>": 49279,
}
# SmolVLM's chat template: "<|im_start|>User:<image>Describe ...<end_of_utterance>\nAssistant:".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def smolvlm_config(shrink: Shrink | None = None) -> PretrainedConfig:
    from transformers import Idefics3Config

    return Idefics3Config(
        text_config=sized(SMOLVLM_TEXT, shrink, "text"),
        vision_config=sized(SMOLVLM_VISION, shrink, "vision"),
        **sized(SMOLVLM_TOP, shrink, "top"),
    )


def save_smolvlm(folder: Path, shrink: Shrink | None, seed: int) -> None:
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    config = smolvlm_config(shrink)
    tokenizer = word_level_tokenizer(
        int(config.text_config.vocab_size),
        SMOLVLM_SPECIALS,
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<end_of_utterance>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
        },
        extra={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image = Idefics3ImageProcessorPil(resample=LANCZOS, **sized(SMOLVLM_IMAGE, shrink, "image"))
    vision = config.vision_config
    # Tokens per tile: the tile's patches after the pixel shuffle (scale_factor squared of them in one).
    per_tile = (int(vision.image_size) // int(vision.patch_size)) ** 2 // int(config.scale_factor) ** 2
    processor = Idefics3Processor(image, tokenizer, image_seq_len=per_tile, chat_template=SMOLVLM_TEMPLATE)
    _save(Idefics3ForConditionalGeneration, config, processor, folder, seed)


# -- ViT-GPT2 --------------------------------------------------------------------------------------


def save_vit_gpt2(folder: Path, shrink: Shrink | None, seed: int) -> None:
    save_full_checkpoint(folder, seed, vit=sized({}, shrink, "vision"), gpt2=sized({}, shrink, "text"))


# -- the registry ----------------------------------------------------------------------------------


def _save(model_class: Any, config: PretrainedConfig, processor: Any, folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_class(config)  # transformers' own initialisation: random, at the real scale
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


@dataclass(frozen=True)
class FamilySpec:
    key: str
    name: str  # the row's name in the report
    hub_id: str  # whose published sizes these are
    model_type: str
    config: Callable[[Shrink | None], PretrainedConfig]
    save: Callable[[Path, Shrink | None, int], None]


SPECS: dict[str, FamilySpec] = {
    spec.key: spec
    for spec in (
        FamilySpec(
            "vit-gpt2",
            "ViT-GPT2",
            "nlpconnect/vit-gpt2-image-captioning",
            "vision-encoder-decoder",
            lambda shrink: full_config(sized({}, shrink, "vision"), sized({}, shrink, "text")),
            save_vit_gpt2,
        ),
        FamilySpec("blip", "BLIP-base", "Salesforce/blip-image-captioning-base", "blip", blip_config, save_blip),
        FamilySpec("git", "GIT-base", "microsoft/git-base", "git", git_config, save_git),
        FamilySpec(
            "florence2",
            "Florence-2-base",
            "florence-community/Florence-2-base",
            "florence2",
            florence2_config,
            save_florence2,
        ),
        FamilySpec(
            "smolvlm", "SmolVLM-256M", "HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3", smolvlm_config, save_smolvlm
        ),
    )
}

# Miniatures of every family (tests and --tiny smoke runs): a few thousand weights besides the embeddings.
TINY: dict[str, Shrink] = {
    "vit-gpt2": {
        "vision": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        "text": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64},
    },
    "blip": {
        "text": {
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "top": {"projection_dim": 32, "image_text_hidden_size": 32},
        "image": {"size": {"height": 32, "width": 32}},
    },
    "git": {
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "image": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    },
    "florence2": {
        "text": {
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 128,
        },
        "vision": {
            "depths": [1, 1, 1, 1],
            "embed_dim": [16, 16, 32, 32],
            "num_heads": [1, 1, 2, 2],
            "num_groups": [1, 1, 2, 2],
            "window_size": 2,
            "projection_dim": 32,
        },
        "image": {"size": {"height": 64, "width": 64}, "crop_size": {"height": 64, "width": 64}},
    },
    "smolvlm": {
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
        },
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "top": {"scale_factor": 2},
        "image": {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}},
    },
}


def save_checkpoint(key: str, folder: Path, *, shrink: Shrink | None = None, seed: int = 0) -> Path:
    """The family's checkpoint in ``folder`` (made once: a folder holding one is kept)."""
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    SPECS[key].save(folder, shrink, seed)
    json.loads((folder / "config.json").read_text())  # written whole
    return folder
