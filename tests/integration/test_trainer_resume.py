"""A real training process, killed with SIGKILL right after a checkpoint, resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captionfleet.trainer.checkpoint import STATE_FILE, find_resume

pytestmark = pytest.mark.slow

TINY = [
    "--image-size", "32", "--patch-size", "8", "--vit-hidden", "32", "--vit-layers", "1", "--vit-heads", "2",
    "--gpt2-hidden", "32", "--gpt2-layers", "1", "--gpt2-heads", "2", "--max-positions", "24",
    "--tokenizer-captions", "500", "--batch-size", "8", "--learning-rate", "3e-3", "--min-lr", "3e-4",
    "--warmup-steps", "2", "--eval-batches", "1", "--eval-caption-samples", "0", "--shapes-val-size", "8",
    "--max-val-images", "8", "--threads", "1", "--device", "cpu", "--num-beams", "1", "--no-progress",
]  # fmt: skip


def _command(tmp_path: Path, max_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "captionfleet.trainer", *TINY, "--max-steps", str(max_steps), "--eval-interval", "5",
        "--out-dir", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run"), "--log-interval", "1",
    ]  # fmt: skip


def test_sigkill_after_a_checkpoint_then_rerun_resumes_at_that_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A long run, so it is certainly still training when killed.
    proc = subprocess.Popen(
        _command(tmp_path, 100_000), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    checkpoint = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            checkpoint = find_resume(tmp_path / "run")
            if checkpoint is not None:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    assert checkpoint is not None, f"no checkpoint within the time limit; trainer said:\n{stderr[-3000:]}"
    # Find the checkpoint again: the kill may have landed in the middle of a later one's renames.
    checkpoint = find_resume(tmp_path / "run")
    assert checkpoint is not None
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    step = state["step"]
    assert step > 0 and step % 5 == 0
    assert not (tmp_path / "model").exists()  # nothing published by the killed run

    # The same command with a reachable end: it continues from that step and publishes.
    finish = step + 3
    done = subprocess.run(_command(tmp_path, finish), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"after {finish} steps" in done.stdout
    assert f"resuming from {checkpoint}" in done.stderr or "resuming from" in done.stderr
    info = json.loads((tmp_path / "model" / "captionfleet.json").read_text())
    assert info["steps"] == finish and info["resumed_from"] == step
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_steps = [s for s in logged if s]  # one line per step, evaluation lines repeat a step
    assert sorted(set(train_steps)) == list(range(1, finish + 1))
