"""`captionfleet caption --model DIR` with checkpoints that are not what they claim: the real command in
a subprocess exits 2 with one `error:` line naming the problem, never a traceback, and checkpoint code
never runs, whether a `y` waits on standard input or a terminal is attached."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from captionfleet.core.failures import EXIT_USAGE
from tests.hostile_checkpoints import (
    copy_checkpoint,
    sharded,
    with_a_broken_header,
    with_half_the_weights,
    with_remote_code,
)


def caption(model: Path, tmp_path: Path, stdin: int | None) -> subprocess.CompletedProcess[str]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "one.png")
    command = [sys.executable, "-m", "captionfleet.cli", "caption", str(images), "--out", str(tmp_path / "out.jsonl")]
    return subprocess.run(
        [*command, "--model", str(model), "--no-progress", "--device", "cpu"],
        capture_output=True,
        # A "y" waiting on standard input, unless a terminal is given.
        **({"input": "y\ny\n"} if stdin is None else {"stdin": stdin}),
        text=True,
        timeout=240,
    )


def assert_refused(result: subprocess.CompletedProcess[str], problem: str) -> None:
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and problem in errors[0], result.stderr


@pytest.mark.parametrize("terminal", [False, True], ids=["y-on-stdin", "terminal-answering-y"])
def test_checkpoint_code_never_runs(tiny_checkpoint: Path, tmp_path: Path, terminal: bool) -> None:
    marker = tmp_path / "marker"
    model = with_remote_code(copy_checkpoint(tiny_checkpoint, tmp_path), marker)
    if terminal:
        controller, terminal_end = pty.openpty()
        os.write(controller, b"y\ny\n")  # typed ahead: answers any prompt at once
        try:
            result = caption(model, tmp_path, stdin=terminal_end)
        finally:
            os.close(terminal_end)
            os.close(controller)
    else:
        result = caption(model, tmp_path, stdin=None)
    assert_refused(result, "needs code of its own (auto_map in config.json")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (with_half_the_weights, "of the model's weights (they would be random)"),
        (with_a_broken_header, "is not a readable safetensors file"),
        (lambda ckpt: sharded(ckpt, "pytorch_model-00002.bin"), "names the pickled shard"),
    ],
    ids=["half-the-weights", "broken-header", "index-naming-a-pickle"],
)
def test_a_broken_checkpoint_is_one_line_and_exit_2(
    tiny_checkpoint: Path, tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    assert_refused(caption(make(copy_checkpoint(tiny_checkpoint, tmp_path)), tmp_path, stdin=None), problem)
