"""Local folder source: every image file under a root, recursively, with ids = relative paths."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from captionfleet.core.failures import ImageError
from captionfleet.core.images import sniff_format

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
    max_bytes: int = 0  # 0 = no limit

    def read(self) -> bytes:
        """The file's bytes; a file over ``max_bytes`` (a video named .jpg) is refused, not read whole."""
        if self.max_bytes and self.size > self.max_bytes:
            raise _too_large(self.size, self.max_bytes)
        with self.path.open("rb") as f:
            data = f.read(self.max_bytes + 1) if self.max_bytes else f.read()
        if self.max_bytes and len(data) > self.max_bytes:  # grown since it was listed
            raise _too_large(len(data), self.max_bytes, at_least=True)
        return data


def _too_large(size: int, limit: int, *, at_least: bool = False) -> ImageError:
    return ImageError(
        "too_large",
        f"{'more than ' if at_least else ''}{size} bytes exceeds the limit of {limit} bytes (WORKER_IMAGES__MAX_BYTES)",
    )


def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return sniff_format(f.read(SNIFF_BYTES)) is not None
    except OSError:
        # Unreadable (permissions) or gone since the scan saw it: an input, so that reading it gives
        # its failure row (forbidden, not_found) instead of one file stopping the whole listing.
        return True


def iter_folder(root: Path, exclude: frozenset[Path] = frozenset(), max_bytes: int = 0) -> Iterator[SourceItem]:
    """Image files under root in a stable order; hidden files and ``exclude`` are skipped. Items over
    ``max_bytes`` fail as too_large when read, without being read."""
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
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # gone since the scan saw it: reading it reports not_found
        yield SourceItem(id=relative.as_posix(), uri=path.as_uri(), path=path, size=size, max_bytes=max_bytes)
