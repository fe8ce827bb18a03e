"""What the trainer knows of model families (a config.json ``model_type``), until the model layer owns it.

Issue 17 moves family knowledge into the model layer (which families load, and each one's default
prompt). Until that lands, this is the one place the lifecycle reads it from: the registry records a
version's default prompt from here, and the gate asks it whether a checkpoint that did not load is
broken or only of a family this captionfleet cannot load yet. When the model layer has its own table,
make these two functions read it and delete the tables below.
"""

from __future__ import annotations

# Families the model layer loads today (core/checkpoint_load.py loads VisionEncoderDecoderModel): a
# checkpoint of one of these that does not load is broken, not new.
LOADED_FAMILIES = frozenset({"vision-encoder-decoder"})

# The prompt a family is captioned with when a request brings none (issue 17, item 2); None: the family
# captions from the image alone. Families missing here are recorded with None.
DEFAULT_PROMPTS: dict[str, str | None] = {
    "vision-encoder-decoder": None,
    "git": None,
    "blip": "a photography of",  # BLIP's conditional captioning prefix, as its model card uses it
    "florence2": "<CAPTION>",  # Florence-2's task token for a short caption
    "paligemma": "caption en",  # PaliGemma's task prefix
    # Chat VLMs: one user turn (the model layer wraps it in the family's chat template).
    "smolvlm": "Describe this image in one sentence.",
    "idefics3": "Describe this image in one sentence.",
    "qwen2_vl": "Describe this image in one sentence.",
    "qwen2_5_vl": "Describe this image in one sentence.",
    "qwen3_vl": "Describe this image in one sentence.",
    "llava": "Describe this image in one sentence.",
}


def default_prompt(family: str) -> str | None:
    """The prompt recorded for a version of ``family`` (None: no prompt, or a family not known here)."""
    return DEFAULT_PROMPTS.get(family)


def loaded_here(family: str) -> bool:
    """Whether this captionfleet's model layer loads ``family`` (so a load failure means a broken checkpoint)."""
    return family in LOADED_FAMILIES
