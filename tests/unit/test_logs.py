"""The worker's text log: one physical line per record, whatever the logged values hold."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from captionfleet.core.logs import JsonFormatter, TextFormatter, configure_logging

FORGED = "a\nFAKE 2026-01-01 ERROR forged"


def record(*args: object, exc_info: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.LogRecord("captionfleet.worker", logging.WARNING, __file__, 1, "item %s failed", args, info)


def test_a_newline_in_a_logged_value_does_not_forge_a_line() -> None:
    line = TextFormatter().format(record(FORGED))
    assert "\n" not in line
    assert line.endswith(" WARNING captionfleet.worker: item a\\nFAKE 2026-01-01 ERROR forged failed")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("a\rb", "a\\rb"),
        ("a\tb", "a\\tb"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),  # a terminal escape sequence
        ("a\x85b", "a\\x85b"),  # NEL, a C1 control
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("plain é ✓", "plain é ✓"),
    ],
)
def test_control_characters_are_escaped(value: str, written: str) -> None:
    assert TextFormatter().format(record(value)).endswith(f"item {written} failed")


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_record() -> None:
    try:
        raise ValueError(FORGED)
    except ValueError:
        text = TextFormatter().format(record("x", exc_info=True))
    first, *rest = text.split("\n")
    assert first.endswith("item x failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert "  ValueError: a" in rest and "  FAKE 2026-01-01 ERROR forged" in rest


def test_the_text_format_is_the_worker_s(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "text")
        logging.getLogger("captionfleet.worker").warning("item %s failed", FORGED)
    finally:  # the other tests' logging (pytest's capture handlers) as it was
        root.handlers[:] = handlers
        root.setLevel(level)
    assert stream.getvalue().count("\n") == 1


def test_json_lines_already_escape() -> None:
    line = JsonFormatter().format(record(FORGED))
    assert "\n" not in line and json.loads(line)["message"] == f"item {FORGED} failed"
