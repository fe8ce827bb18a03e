"""What the trainer's lifecycle asks of model families; the answers come from the model layer's table
(``captionfleet.core.family``), the one place family differences are written.

The registry records a version's default prompt from here, and the gate asks whether a checkpoint that
did not load is broken (a family the model layer serves) or only of a family it cannot load.
"""

from __future__ import annotations

from captionfleet.core.family import FAMILIES


def default_prompt(family: str) -> str | None:
    """The prompt recorded for a version of ``family`` (None: the family captions from the image alone, or
    one the model layer does not list)."""
    known = FAMILIES.get(family)
    return known.default_prompt if known is not None else None


def loaded_here(family: str) -> bool:
    """Whether this captionfleet's model layer serves ``family`` (so a load failure means a broken checkpoint)."""
    return family in FAMILIES
