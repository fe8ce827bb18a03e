"""Local folder source: every image file under a root, recursively, with ids = relative paths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.images import sniff_format

# A file is an input when its name says image *or* its first bytes do: a photo saved without an
# extension is captioned, and a ".jpg" that holds text gets a failure row instead of vanishing.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
SNIFF_BYTES = 64


@dataclass(frozen=True)
class SourceItem:
    id: str
    uri: str
    path: Path
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    with path.open("rb") as f:
        return sniff_format(f.read(SNIFF_BYTES)) is not None


def iter_folder(root: Path, exclude: frozenset[Path] = frozenset()) -> Iterator[SourceItem]:
    """Image files under root in a stable order; hidden files and ``exclude`` are skipped."""
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory: pass a folder of images")
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.resolve() in exclude:
            continue
        # Symlinks are followed only when they stay inside the root: no escape from the folder.
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            continue
        if not path.is_file() or not _looks_like_image(path):
            continue
        yield SourceItem(id=relative.as_posix(), uri=path.as_uri(), path=path, size=path.stat().st_size)
