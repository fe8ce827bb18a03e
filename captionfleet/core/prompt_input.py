"""A prompt as a user sends it (a Kafka request's field, ``--prompt``, a manifest cell, the dashboard's box)
-> the prompt a model is given, or why it is refused.

One rule for every way in, so a prompt the stream refuses is refused by the bulk job and the dashboard
too: a string (absent, null, or blank: the model family's default), at most ``MAX_PROMPT_CHARS``
characters, and text only: no control characters but newline and tab (a NUL or an escape sequence would
reach the tokenizer and the logs), no lone surrogates (JSON can carry them; they have no UTF-8 form).
Whether the model takes a prompt at all is the model's to say (``core.captioner.PromptError``).
"""

from __future__ import annotations

import unicodedata

# Long enough for any captioning instruction or a chat turn; short enough that one request cannot make
# a batch's text (padded to its longest prompt) cost more than its images.
MAX_PROMPT_CHARS = 1000
_ALLOWED_CONTROLS = frozenset("\n\t")


class PromptRefused(ValueError):
    """A prompt that is not one (not a string, too long, control characters); the message names the field
    and the fix."""


def check_prompt(value: object, *, field: str = "prompt") -> str | None:
    """``value`` as the prompt to use: None (the family's default) when absent or blank, else the text as
    sent. ``field`` names where it came from in the message (a request field, a flag, a column)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise PromptRefused(
            f"{field} must be a string, not {type(value).__name__}: send text, or leave it out for the model's "
            "default prompt"
        )
    if not value.strip():
        return None
    if len(value) > MAX_PROMPT_CHARS:
        raise PromptRefused(
            f"{field} is {len(value)} characters long, over the limit of {MAX_PROMPT_CHARS}: shorten it"
        )
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if (category == "Cc" and char not in _ALLOWED_CONTROLS) or category == "Cs":
            what = "a control character" if category == "Cc" else "a lone surrogate"
            raise PromptRefused(
                f"{field} holds {what} (U+{ord(char):04X}) at position {position}: send plain text (newlines and "
                "tabs are allowed)"
            )
    return value
