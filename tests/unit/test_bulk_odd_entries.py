"""The local folder job with odd entries in the folder: each gets its failure row (its name says
image) or is counted as skipped in the summary, and the run goes on (issue 16, item 4)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captionfleet.core.failures import ImageError
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.bulk import BulkSummary, run_caption_job
from captionfleet.worker.connectors import local
from captionfleet.worker.connectors.local import SourceItem, describe_skipped, iter_folder
from captionfleet.worker.sinks import read_rows
from tests.unit.test_s3_retry import FakeCaptioner

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# Odd entries named like images: each is an input whose row says what it is.
EXPECTED_ROWS = {
    "loop-a.jpg": ("not_found", "link loop"),
    "loop-b.jpg": ("not_found", "link loop"),
    "dangling.png": ("not_found", "link to nothing"),
    "x.jpg": ("not_an_image", "a FIFO, not a regular file"),
    "s.png": ("not_an_image", "a socket, not a regular file"),
    "escape.png": ("forbidden", "outside the folder"),
}
# Odd entries whose names do not say image: counted, not rows.
EXPECTED_SKIPPED = {"link_loop": 1, "fifo": 1, "link_outside": 1, "linked_folder": 1}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def odd_folder(tmp_path: Path) -> Iterator[Path]:
    """Good images (one behind a link inside the folder) among every kind of odd entry."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png(10))
    (root / "sub" / "b.png").write_bytes(png(20))
    (root / "z.png").write_bytes(png(30))
    os.symlink("a.png", root / "alias.png")  # a link inside the folder: captioned, as today
    os.symlink("loop-b.jpg", root / "loop-a.jpg")  # a -> b -> a
    os.symlink("loop-a.jpg", root / "loop-b.jpg")
    os.symlink("itself", root / "itself")  # a link to itself, not named like an image
    os.symlink("nothing.png", root / "dangling.png")
    os.mkfifo(root / "x.jpg")
    os.mkfifo(root / "pipe")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(40))
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "escape-folder")
    os.symlink("sub", root / "sub-again")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(root / "s.png"))
    try:
        yield root
    finally:
        server.close()


def caption(root: Path, out: Path, *, overwrite: bool = False) -> BulkSummary:
    config = WorkerSettings(batch={"max_items": 2, "max_wait_ms": 5})  # type: ignore[arg-type]
    return run_caption_job(str(root), out, config, overwrite=overwrite, show_progress=False, captioner=FakeCaptioner())


def test_odd_entries_get_rows_or_are_counted_and_the_run_goes_on(
    odd_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "captions.jsonl"
    with caplog.at_level(logging.WARNING, logger=local.__name__):
        summary = caption(odd_folder, out)
    good = {"a.png", "alias.png", "sub/b.png", "z.png"}
    assert summary.done == len(good)
    assert summary.failed_by_kind == Counter(kind for kind, _ in EXPECTED_ROWS.values())
    rows = {row["id"]: row for row in read_rows(out)}
    assert set(rows) == good | set(EXPECTED_ROWS)
    assert all(isinstance(rows[name]["caption"], str) for name in good)
    for name, (kind, words) in EXPECTED_ROWS.items():
        assert rows[name]["error_kind"] == kind and words in rows[name]["error_message"], rows[name]
    assert summary.passed_over == EXPECTED_SKIPPED
    assert "skipped: 4 (1 FIFO, 1 link loop, 1 link outside the folder, 1 link to a folder (not followed))" in (
        "\n".join(summary.lines())
    )
    for name in ("itself", "pipe", "escape-folder", "sub-again"):  # each skipped entry is named in the log
        assert any(name in record.getMessage() for record in caplog.records), name

    again = caption(odd_folder, out)  # a rerun resumes: nothing left to do, nothing fails
    assert (again.total, again.skipped, again.done, again.failed) == (len(rows), len(rows), 0, 0)
    assert len(read_rows(out)) == len(rows)


def test_special_files_are_never_opened(odd_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = local._open_regular

    def spy(path: Path) -> Any:
        opened.append(path.name)
        return real_open(path)

    monkeypatch.setattr(local, "_open_regular", spy)
    items = list(iter_folder(odd_folder))
    for item in items:
        with contextlib.suppress(OSError, ImageError):
            item.read()
    assert not {"x.jpg", "pipe", "s.png", "loop-a.jpg", "escape.png"} & set(opened)


def test_a_file_turned_into_a_fifo_since_the_listing_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "late.jpg"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    with pytest.raises(ImageError, match="FIFO, not a regular file") as error:
        SourceItem("late.jpg", fifo.as_uri(), fifo, size=100).read()
    assert error.value.kind == "not_an_image"


@pytest.mark.skipif(AS_ROOT, reason="root reads a folder of mode 000 anyway")
def test_an_unreadable_sub_folder_is_counted_and_the_rest_is_captioned(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "in.png").write_bytes(png(1))
    (root / "ok.png").write_bytes(png(2))
    os.chmod(root / "locked", 0)
    try:
        summary = caption(root, tmp_path / "captions.jsonl")
    finally:
        os.chmod(root / "locked", 0o755)
    assert (summary.done, summary.failed) == (1, 0)
    assert summary.passed_over == {"unreadable_folder": 1}
    assert "skipped: 1 (1 unreadable folder)" in "\n".join(summary.lines())


def test_a_sub_folder_that_refuses_listing_is_counted_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chmod 000 case above as root sees it too: the folder's listing is refused (EACCES)."""
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "in.png").write_bytes(png(1))
    (root / "ok.png").write_bytes(png(2))
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = caption(root, tmp_path / "captions.jsonl")
    assert (summary.done, summary.failed) == (1, 0)
    assert summary.passed_over == {"unreadable_folder": 1}


def test_a_looping_source_is_a_usage_error_not_a_crash(tmp_path: Path) -> None:
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(NotADirectoryError, match="pass a folder of images"):
        list(iter_folder(tmp_path / "loop"))


def test_the_summary_line_appears_only_when_something_was_skipped() -> None:
    assert not any(line.startswith("skipped") for line in BulkSummary(total=1, skipped=0, done=1).lines())
    assert describe_skipped(Counter({"socket": 2, "device": 1})) == "3 (1 device, 2 sockets)"


def test_a_folder_a_thousand_levels_deep_is_listed(tmp_path: Path) -> None:
    # A legal path (under 4096 bytes), deeper than Python's recursion goes: the listing walks on a stack.
    levels = [tmp_path / "deep"]
    for _ in range(1200):
        levels.append(levels[-1] / "d")
    try:
        for folder in levels:
            folder.mkdir()  # one level at a time: mkdir(parents=True) recurses
        (levels[-1] / "x.png").write_bytes(b"\x89PNG")
        assert [item.id for item in iter_folder(levels[0])] == ["d/" * 1200 + "x.png"]
    finally:  # removed bottom up here: pytest's recursive clean-up of tmp_path would stop at such depth
        with contextlib.suppress(FileNotFoundError):
            (levels[-1] / "x.png").unlink()
        for folder in reversed(levels):
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()
