"""The one rule for a prompt from any way in (Kafka, --prompt, a manifest column, the dashboard): text of
bounded length without control characters; absent or blank is the model family's default."""

from __future__ import annotations

import pytest

from captionfleet.core.family import takes_prompt
from captionfleet.core.prompt_input import MAX_PROMPT_CHARS, PromptRefused, check_prompt


@pytest.mark.parametrize("value", [None, "", "   ", "\n\t"])
def test_absent_or_blank_is_the_family_default(value: object) -> None:
    assert check_prompt(value) is None


def test_text_passes_as_sent_with_newlines_and_tabs() -> None:
    for text in ("a photo of", "  <CAPTION> ", "line one\nline two\ttabbed", "ünïcödé 写真", "x" * MAX_PROMPT_CHARS):
        assert check_prompt(text) == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "my_field must be a string, not int"),
        (["a"], "my_field must be a string, not list"),
        ("x" * (MAX_PROMPT_CHARS + 1), f"my_field is {MAX_PROMPT_CHARS + 1} characters long, over the limit of"),
        ("a\x00b", r"my_field holds a control character \(U\+0000\) at position 1"),
        ("esc\x1b[31m", r"a control character \(U\+001B\) at position 3"),
        ("cr\r", r"\(U\+000D\)"),
        ("bad \ud800", r"my_field holds a lone surrogate \(U\+D800\) at position 4"),
    ],
)
def test_what_is_not_a_prompt_is_refused_naming_the_field(value: object, expected: str) -> None:
    with pytest.raises(PromptRefused, match=expected):
        check_prompt(value, field="my_field")


def test_which_families_take_a_prompt() -> None:
    assert not takes_prompt("vision-encoder-decoder")
    assert takes_prompt("blip") and takes_prompt("florence2") and takes_prompt("qwen2_vl")
    assert takes_prompt("kosmos-2")  # not listed: the generic rule takes one
