"""What one request may ask of a model: its prompt's length and text, counted before the model sees it,
and how many pixels of its image a dynamic-resolution family processes (``InputLimits``).

A prompt reaches the model as tokens, and a batch is padded to its longest row: a 100 KB prompt would
make every row of its batch 100 KB of tokens long (the process was killed for memory). So a prompt is
refused (``PromptError``: the item fails alone, as ``malformed``) when it is longer than
``max_prompt_chars`` characters, counted first and cheaply, or than ``max_prompt_tokens`` tokens.

A prompt is the user's text, never the model's control tokens: in a chat model ``<|im_end|>`` or
``<|im_start|>`` would end the user's turn and start another, and an image token would ask for an image
that is not there. The prompt is tokenized alone, as the processor would tokenize it inside its
template; a prompt that yields any of the tokenizer's special tokens, or holds one of the processor's
own token strings (``<image>``, ``<|image_pad|>``, ...), is refused, naming the token. The unknown-word
token is not a control token (it is what an emoji becomes in a BERT vocabulary): it is let through.

The prompt's tokens count in the input's cost (``ModelInput.cost``, which the batcher's
``WORKER_BATCH__MAX_PIXELS`` bounds), each as the pixels of one visual token (``TOKEN_PIXELS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captionfleet.core.captioner import PromptError

if TYPE_CHECKING:
    from captionfleet.core.settings import ModelSettings

# What one prompt token costs in the batcher's unit (pixels): one Qwen-VL visual token covers 28x28
# pixels (14-pixel patches merged 2x2), the densest of the tested families, so a text token counts as
# much as the image token that costs the most pixels. A 256-token prompt then costs as a 448x448 image.
TOKEN_PIXELS = 28 * 28


@dataclass(frozen=True)
class InputLimits:
    """The bounds on one request's input (``WORKER_MODEL__MAX_PROMPT_CHARS``, ``..._MAX_PROMPT_TOKENS``,
    ``..._MAX_VISUAL_PIXELS``: the most pixels a dynamic-resolution family resizes one image to, see
    core/families/prompts.py's ``cap_visual_pixels``)."""

    max_prompt_chars: int = 1000
    max_prompt_tokens: int = 256
    max_visual_pixels: int = 1024 * 1024

    @classmethod
    def from_settings(cls, model: ModelSettings) -> InputLimits:
        return cls(
            max_prompt_chars=model.max_prompt_chars,
            max_prompt_tokens=model.max_prompt_tokens,
            max_visual_pixels=model.max_visual_pixels,
        )


class PromptRules:
    """A loaded processor's rules for prompts; ``tokens`` is safe to call from the decode threads (its
    tokenizer is called without padding or truncation, as core/families/prompts.py explains)."""

    def __init__(self, family: str, processor: Any, limits: InputLimits) -> None:
        self.family = family
        self.limits = limits
        self.tokenizer = processor.tokenizer
        tokenizer = self.tokenizer
        special = set(tokenizer.all_special_ids) | {
            int(index) for index, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        special.discard(tokenizer.unk_token_id)
        self.special_ids = frozenset(special)
        # The processor's own markers (image, video, image boundaries): refused even where its tokenizer
        # does not list them as special, since the processor expands them in the text it is given.
        self.marker_strings = processor_markers(processor)

    def tokens(self, prompt: str) -> int:
        """The prompt's number of tokens; PromptError when it is too long or holds a control token."""
        limits = self.limits
        if len(prompt) > limits.max_prompt_chars:
            raise PromptError(
                f"the prompt is {len(prompt)} characters, more than the {limits.max_prompt_chars} this worker "
                "takes (WORKER_MODEL__MAX_PROMPT_CHARS); send a shorter prompt"
            )
        for marker in self.marker_strings:
            if marker in prompt:
                raise PromptError(self._control_message(marker))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        control = [index for index in ids if index in self.special_ids]
        if control:
            raise PromptError(self._control_message(str(self.tokenizer.convert_ids_to_tokens(control[0]))))
        if len(ids) > limits.max_prompt_tokens:
            raise PromptError(
                f"the prompt is {len(ids)} tokens for this {self.family} model, more than the "
                f"{limits.max_prompt_tokens} this worker takes (WORKER_MODEL__MAX_PROMPT_TOKENS); send a shorter prompt"
            )
        return len(ids)

    def _control_message(self, token: str) -> str:
        return (
            f"the prompt holds {token!r}, a control token of this {self.family} model (it would act as one: end "
            "the user's turn, ask for an image); send the prompt without it"
        )


def processor_markers(processor: Any) -> tuple[str, ...]:
    """The token strings a processor names itself (``image_token``, ``video_token``, ``fake_image_token``, ...)."""
    markers = set()
    for name in dir(processor):
        if name.endswith("_token") and not name.startswith("_"):
            try:
                value = getattr(processor, name)
            except Exception:  # a property of a part that is not loaded (the video processor's)
                continue
            if isinstance(value, str) and value:
                markers.add(value)
    return tuple(sorted(markers))
