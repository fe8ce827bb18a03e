"""`captionfleet caption` end to end: a real folder, the real CLI in a subprocess, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captionfleet.core.images import sniff_format
from captionfleet.worker.connectors.local import IMAGE_SUFFIXES
from captionfleet.worker.sinks import read_rows
from tests.hostile_images import hostile_corpus

GOOD_IMAGES = 40


def make_folder(root: Path) -> dict[str, str | None]:
    """~50 files: good JPEG/PNG images in nested folders plus the hostile corpus.

    Returns the expected outcome per id: None for a caption, else the failure kind.
    """
    rng = np.random.default_rng(1)
    expected: dict[str, str | None] = {}
    for i in range(GOOD_IMAGES):
        folder = root / f"set{i % 3}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(20, 300)), int(rng.integers(20, 300)))
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        name = f"img{i:03d}." + ("jpg" if i % 2 else "png")
        Image.fromarray(pixels).save(folder / name)
        expected[(folder / name).relative_to(root).as_posix()] = None
    odd = root / "odd"
    odd.mkdir()
    for case in hostile_corpus():
        (odd / case.name).write_bytes(case.data)
        # The folder source takes files named like images or starting like one (see local.py).
        if Path(case.name).suffix.lower() in IMAGE_SUFFIXES or sniff_format(case.data):
            expected[f"odd/{case.name}"] = case.expect_kind
    # Not inputs at all: a text file with a text name, and hidden files.
    (root / "README.txt").write_text("not an image, and not named like one")
    (root / ".hidden.jpg").write_bytes(b"\xff\xd8\xff")
    return expected


def run_cli(*args: str | Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "captionfleet.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("archive")
    return root, make_folder(root)


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_every_input_gets_one_right_row_and_rerun_resumes(
    archive: tuple[Path, dict[str, str | None]], tiny_checkpoint: Path, tmp_path: Path, suffix: str
) -> None:
    root, expected = archive
    out = tmp_path / f"captions.{suffix}"
    first = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--batch-size", "4", "--no-progress")
    failures = Counter(kind for kind in expected.values() if kind)
    assert first.returncode == 3, first.stderr  # completed, some images failed
    good = list(expected.values()).count(None)
    assert (
        f"inputs: {len(expected)}  already done: 0  captioned: {good}  failed: {len(expected) - good}" in first.stdout
    )
    for kind, count in failures.items():
        assert f"{kind}={count}" in first.stdout

    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(expected)  # exactly one row per input
    for row in rows:
        want = expected[row["id"]]
        assert row["error_kind"] == want, (row["id"], row["error_message"])
        if want is None:
            assert isinstance(row["caption"], str)
            assert row["model_version"].startswith("sha256-")
            assert row["width"] > 0 and row["inference_ms"] > 0
        else:
            assert row["caption"] is None and row["error_message"]

    second = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert f"already done: {len(expected)}  captioned: 0  failed: 0" in second.stdout
    assert len(read_rows(out)) == len(rows)


def test_new_files_are_picked_up_and_overwrite_starts_over(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        Image.new("RGB", (50, 40), (i * 40, 0, 0)).save(root / f"{i}.png")
    out = tmp_path / "out.jsonl"
    assert run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress").returncode == 0
    for i in range(5, 8):
        Image.new("RGB", (50, 40), (0, i * 20, 0)).save(root / f"{i}.jpg")
    again = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress")
    assert "already done: 5  captioned: 3" in again.stdout
    assert len(read_rows(out)) == 8
    fresh = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--overwrite", "--no-progress")
    assert "already done: 0  captioned: 8" in fresh.stdout
    assert len(read_rows(out)) == 8


def test_torn_jsonl_tail_from_a_crash_is_repaired(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (0, 0, i * 80)).save(root / f"{i}.png")
    out = tmp_path / "out.jsonl"
    assert run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress").returncode == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # the crash cut the last line in half
    again = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "already done: 2  captioned: 1" in again.stdout
    assert sorted(r["id"] for r in read_rows(out)) == ["0.png", "1.png", "2.png"]


def test_unloadable_model_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    result = run_cli("caption", tmp_path, "--out", tmp_path / "o.jsonl", "--model", tmp_path / "nope")
    assert result.returncode == 2
    assert "--model" in result.stderr


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    result = run_cli("caption", tmp_path, "--out", tmp_path / "o.jsonl", env_extra={"WORKER_BATCH__MAX_ITEMS": "lots"})
    assert result.returncode == 2
    assert "WORKER_BATCH__MAX_ITEMS" in result.stderr


def test_bad_output_name_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("caption", tmp_path, "--out", tmp_path / "o.csv", "--model", tiny_checkpoint)
    assert result.returncode == 2
    assert ".parquet or .jsonl" in result.stderr


def test_default_model_unreachable_offline_names_model_flag(tmp_path: Path) -> None:
    """The default is the hub's reference model; with no hub and no cache the CLI says what to do."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    result = run_cli(
        "caption",
        tmp_path,
        "--out",
        tmp_path / "o.jsonl",
        env_extra={"HF_HUB_OFFLINE": "1", "WORKER_MODEL__CACHE_DIR": str(tmp_path / "empty-cache")},
    )
    assert result.returncode == 2
    assert "nlpconnect/vit-gpt2-image-captioning" in result.stderr
    assert "--model" in result.stderr


def test_odd_entries_in_the_folder_do_not_stop_the_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A link loop, a FIFO and a socket named like images get failure rows (exit 3, not a traceback);
    a link loop and a FIFO with other names are counted in the summary."""
    import socket

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 80, 0, 0)).save(root / f"{i}.png")
    os.symlink("b.jpg", root / "a.jpg")
    os.symlink("a.jpg", root / "b.jpg")
    os.symlink("itself", root / "itself")
    os.mkfifo(root / "x.jpg")
    os.mkfifo(root / "pipe")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(root / "s.png"))
    out = tmp_path / "out.jsonl"
    try:
        first = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress")
        again = run_cli("caption", root, "--out", out, "--model", tiny_checkpoint, "--no-progress")
    finally:
        server.close()
    assert first.returncode == 3, first.stderr
    assert "captioned: 3  failed: 4" in first.stdout
    assert "skipped: 2 (1 FIFO, 1 link loop)" in first.stdout
    kinds = {r["id"]: r["error_kind"] for r in read_rows(out)}
    assert kinds == {
        "0.png": None,
        "1.png": None,
        "2.png": None,
        "a.jpg": "not_found",
        "b.jpg": "not_found",
        "s.png": "not_an_image",
        "x.jpg": "not_an_image",
    }
    assert again.returncode == 0, again.stderr
    assert "already done: 7  captioned: 0  failed: 0" in again.stdout
