"""The model families captionfleet serves, by ``model_type``: the one place their differences are written.

A family says how a request's prompt reaches the model (``prompt_style``), the prompt used when the
request has none (``default_prompt``), and where a batch's shorter prompts are padded (``padding_side``:
left for every decoder-only family, so each row's last token is where generation continues; right for a
text encoder's input). A ``model_type`` transformers maps to ``AutoModelForImageTextToText`` but not
listed here is served with the generic rule (``family_for``): a chat turn when the processor has a chat
template, else no prompt. The listed ones are tested (tests/unit/test_families.py) with tiny checkpoints.

This module imports nothing heavy: core/model_store.py reads ``NATIVE_CONVERSIONS`` to name the native
alternative of a checkpoint it refuses for needing its own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# How a prompt becomes model input:
# - "none": the model takes no prompt (ViT-GPT2);
# - "task": the prompt is a Florence-2 task token (<CAPTION>, <DETAILED_CAPTION>, ...) or text, which the
#   processor turns into the encoder's question;
# - "decoder_prefix": the prompt starts the caption itself (BLIP's "a picture of", GIT's prefix); the
#   generated continuation is the caption (the prefix is not repeated);
# - "text": the processor takes the prompt as it is (PaliGemma's "caption en");
# - "chat": the prompt is the user's turn of the processor's chat template, after the image.
PromptStyle = Literal["none", "task", "decoder_prefix", "text", "chat"]

CHAT_PROMPT = "Describe this image in one sentence."
VED = "vision-encoder-decoder"


@dataclass(frozen=True)
class Family:
    model_type: str
    prompt_style: PromptStyle
    default_prompt: str | None
    padding_side: Literal["left", "right"] = "left"
    tested: bool = True


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(VED, "none", None),
        Family("blip", "decoder_prefix", None),
        Family("git", "decoder_prefix", None),
        # The prompt goes to a bidirectional text encoder: padded after it, positions stay those of one by one.
        Family("florence2", "task", "<CAPTION>", padding_side="right"),
        Family("paligemma", "text", "caption en"),
        Family("smolvlm", "chat", CHAT_PROMPT),
        Family("idefics3", "chat", CHAT_PROMPT),
        Family("llava", "chat", CHAT_PROMPT),
        Family("qwen2_vl", "chat", CHAT_PROMPT),
        Family("qwen2_5_vl", "chat", CHAT_PROMPT),
        Family("qwen3_vl", "chat", CHAT_PROMPT),
    )
}

# Checkpoints that need code of their own (an ``auto_map`` in their config), by the model_type they
# declare, and the conversion transformers ships natively, which captionfleet loads instead.
NATIVE_CONVERSIONS: dict[str, str] = {
    "florence2": "florence-community/Florence-2-base or florence-community/Florence-2-large (model_type florence2, "
    "transformers' own)",
    "internvl_chat": "OpenGVLab/InternVL3-1B-hf (and the other -hf conversions, model_type internvl)",
    "multi_modality": "deepseek-community/deepseek-vl-1.3b-chat (model_type deepseek_vl)",
}


def takes_prompt(model_type: str) -> bool:
    """Whether a model of this type takes a prompt: every family but those whose style is "none" (ViT-GPT2).
    A type not listed is served with the generic rule, which always takes one."""
    known = FAMILIES.get(model_type)
    return known is None or known.prompt_style != "none"


def caption_bounds(model_type: str, config: Any) -> tuple[int, int]:
    """The token a ``decoder_prefix`` family's caption follows and the token that ends it, from the model's
    config: BLIP's text decoder starts at its bos ([DEC]) and stops at [SEP]; GIT starts at its bos and stops
    at its eos. Serving (core/families/prompts.py) starts captions here and the trainer
    (trainer/family_batches.py) teaches them to end here: one rule for both, so a trained model stops where
    the served one expects it to."""
    if model_type == "blip":
        text = config.text_config
        return int(text.bos_token_id), int(text.sep_token_id)
    if model_type == "git":
        return int(config.bos_token_id), int(config.eos_token_id)
    raise ValueError(f"{model_type} is not a decoder_prefix family with a known caption start and end (blip, git)")


def family_for(model_type: str, *, has_chat_template: bool, is_encoder_decoder: bool) -> Family:
    """The registered family, or the generic rule for another image-text-to-text model type."""
    known = FAMILIES.get(model_type)
    if known is not None:
        return known
    if has_chat_template:
        return Family(model_type, "chat", CHAT_PROMPT, tested=False)
    return Family(model_type, "text", None, padding_side="right" if is_encoder_decoder else "left", tested=False)
