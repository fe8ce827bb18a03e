"""The local folder job: --overwrite empties old results only once the run can really start."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captionfleet.core.model_store import ModelRefError
from captionfleet.core.settings import WorkerSettings
from captionfleet.worker.bulk import run_caption_job
from captionfleet.worker.connectors import local
from captionfleet.worker.sinks import read_rows
from tests.unit.test_s3_retry import FakeCaptioner


def folder(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buf, "PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
    return root


def caption(root: Path, out: Path, captioner: Any = None, **settings: Any) -> Any:
    config = WorkerSettings(batch={"max_items": 2, "max_wait_ms": 5}, **settings)  # type: ignore[arg-type]
    return run_caption_job(str(root), out, config, overwrite=True, show_progress=False, captioner=captioner)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_overwrite_with_a_bad_source_or_model_keeps_the_old_results(tmp_path: Path, suffix: str) -> None:
    root, out = folder(tmp_path, 3), tmp_path / f"captions{suffix}"
    first = caption(root, out, FakeCaptioner())
    assert first.done == 3
    before = out.read_bytes()

    with pytest.raises(NotADirectoryError):
        caption(tmp_path / "photoz", out, FakeCaptioner())  # a typo in the source
    assert out.read_bytes() == before

    with pytest.raises(ModelRefError):
        caption(root, out, model={"ref": str(tmp_path / "no-such-model")})
    assert out.read_bytes() == before
    assert sorted(r["id"] for r in read_rows(out)) == ["0.png", "1.png", "2.png"]


def test_overwrite_that_can_start_replaces_the_rows(tmp_path: Path) -> None:
    root, out = folder(tmp_path, 2), tmp_path / "captions.jsonl"
    caption(root, out, FakeCaptioner())
    again = caption(root, out, FakeCaptioner())
    assert (again.skipped, again.done) == (0, 2)
    assert len(read_rows(out)) == 2


def test_a_file_over_the_size_limit_gets_a_row_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = folder(tmp_path, 1), tmp_path / "captions.jsonl"
    huge = root / "movie.jpg"
    huge.write_bytes(b"\xff\xd8\xff" + b"\0" * 4096)  # a "JPEG" far over the limit below
    opened: list[Path] = []
    real_open = local._open_regular

    def spy(path: Path) -> Any:
        if path == huge:
            opened.append(path)
        return real_open(path)

    monkeypatch.setattr(local, "_open_regular", spy)
    summary = caption(root, out, FakeCaptioner(), images={"max_bytes": 1024})
    assert summary.done == 1 and summary.failed_by_kind == {"too_large": 1}
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["movie.jpg"]["error_kind"] == "too_large" and "1024" in rows["movie.jpg"]["error_message"]
    assert opened == []  # refused by its listed size: never opened, let alone read whole


def test_a_file_grown_since_it_was_listed_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    from captionfleet.core.failures import ImageError
    from captionfleet.worker.connectors.local import SourceItem

    path = tmp_path / "grew.png"
    path.write_bytes(b"\0" * 5000)
    with pytest.raises(ImageError, match="more than 1001 bytes exceeds the limit of 1000"):
        SourceItem("grew.png", path.as_uri(), path, size=10, max_bytes=1000).read()


def test_a_file_that_cannot_be_sniffed_gets_a_row_and_does_not_stop_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = folder(tmp_path, 2), tmp_path / "captions.jsonl"
    locked = root / "scan-0001"  # no image suffix: the listing opens it to sniff its first bytes
    locked.write_bytes(b"\x89PNG\r\n\x1a\n")
    real_open = local._open_regular

    def deny(path: Path) -> Any:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(local, "_open_regular", deny)  # as for a non-root user and a file mode 000
    summary = caption(root, out, FakeCaptioner())
    assert summary.done == 2 and summary.failed_by_kind == {"forbidden": 1}
    assert {r["id"]: r["error_kind"] for r in read_rows(out)}["scan-0001"] == "forbidden"
