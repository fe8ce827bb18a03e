"""The layout's rules that neither ruff nor the import contracts can see (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE = ["captionfleet/core", "worker", "trainer", "dashboard", "bench", "ops", "tests"]


def _python_files() -> list[Path]:
    return sorted(path for folder in CODE for path in (REPO / folder).rglob("*.py"))


def test_no_model_wrapper_copies_the_state_of_the_model_it_wraps() -> None:
    # A wrapper delegates (core.captioner.ModelWrapper); a copy of __dict__ goes stale at the next hot swap.
    copies = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in _python_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr == "update"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "__dict__"
    ]
    assert not copies, f"__dict__ copied (subclass ModelWrapper instead): {copies}"


def test_commands_and_docs_name_the_installed_modules() -> None:
    # A bare part name after -m runs a second copy of the code from the checkout (or nothing, installed).
    bare = re.compile(r"""python -m (worker|trainer|dashboard)\b|["']-m["'],\s*["'](worker|trainer|dashboard)["']""")
    files = [
        *_python_files(),
        *REPO.glob("*.md"),
        *(REPO / "docs").glob("*.md"),
        REPO / "Makefile",
        REPO / "Dockerfile",
    ]
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert not found, f"use python -m captionfleet.<part>: {found}"
