"""Local folder source: every image file under a root, recursively, with ids = relative paths.

Every odd entry of the folder is accounted for, and none can stop the listing: one whose name says
image (a FIFO named x.jpg, a link loop named x.png) becomes an input whose read fails with its row;
any other (an unreadable sub-folder, a socket named s.sock, a link to outside the folder) is counted
in ``skipped`` and logged by path. Nothing but a regular file is ever opened: reading a FIFO would
wait forever for a writer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from captionfleet.core.failures import ImageError
from captionfleet.core.images import sniff_format

logger = logging.getLogger(__name__)

# A file is an input when its name says image *or* its first bytes do: a photo saved without an
# extension is captioned, and a ".jpg" that holds text gets a failure row instead of vanishing.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
SNIFF_BYTES = 64

# Why an entry was passed over (a key of ``skipped``): its label, singular and plural, for the summary.
SKIP_LABELS: dict[str, tuple[str, str]] = {
    "unreadable_folder": ("unreadable folder", "unreadable folders"),
    "link_outside": ("link outside the folder", "links outside the folder"),
    "link_loop": ("link loop", "link loops"),
    "dangling_link": ("dangling link", "dangling links"),
    "linked_folder": ("link to a folder (not followed)", "links to folders (not followed)"),
    "fifo": ("FIFO", "FIFOs"),
    "socket": ("socket", "sockets"),
    "device": ("device", "devices"),
    "unreadable_entry": ("unreadable entry", "unreadable entries"),
}


def describe_skipped(skipped: Counter[str]) -> str:
    """``2 (1 unreadable folder, 1 link outside the folder)``: the summary's account of ``skipped``."""
    parts = [f"{n} {SKIP_LABELS[reason][n != 1]}" for reason, n in sorted(skipped.items()) if n]
    return f"{sum(skipped.values())} ({', '.join(parts)})"


@dataclass(frozen=True)
class SourceItem:
    id: str
    uri: str
    path: Path
    size: int
    max_bytes: int = 0  # 0 = no limit
    # Listed because its name says image, but never to be opened (a FIFO, a link loop): read() raises it.
    refusal: Exception | None = field(default=None, compare=False)

    def read(self) -> bytes:
        """The file's bytes; a file over ``max_bytes`` (a video named .jpg) is refused, not read whole."""
        if self.refusal is not None:
            raise self.refusal
        if self.max_bytes and self.size > self.max_bytes:
            raise _too_large(self.size, self.max_bytes)
        with _open_regular(self.path) as f:
            data = f.read(self.max_bytes + 1) if self.max_bytes else f.read()
        if self.max_bytes and len(data) > self.max_bytes:  # grown since it was listed
            raise _too_large(len(data), self.max_bytes, at_least=True)
        return data


def _too_large(size: int, limit: int, *, at_least: bool = False) -> ImageError:
    return ImageError(
        "too_large",
        f"{'more than ' if at_least else ''}{size} bytes exceeds the limit of {limit} bytes (WORKER_IMAGES__MAX_BYTES)",
    )


def _special_kind(mode: int) -> str:
    """The skip reason of a file that is neither regular nor a folder."""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"  # character or block device (or a type this platform adds)


def _not_regular(path: Path, mode: int) -> ImageError:
    label = SKIP_LABELS[_special_kind(mode)][0]
    return ImageError(
        "not_an_image",
        f"{path.name} is a {label}, not a regular file: it is never opened; replace it with the image file",
    )


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file. O_NONBLOCK: a FIFO put in a file's
    place since the listing must not make the open wait forever for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with _open_regular(path) as f:
            return sniff_format(f.read(SNIFF_BYTES)) is not None
    except (OSError, ImageError):
        # Unreadable (permissions) or gone since the scan saw it: an input, so that reading it gives
        # its failure row (forbidden, not_found) instead of one file stopping the whole listing.
        return True


@dataclass
class _Listing:
    root: Path
    exclude: frozenset[Path]
    max_bytes: int
    skipped: Counter[str]

    def walk(self) -> Iterator[SourceItem]:
        """Depth first with names sorted (the order sorting every path by its parts gave), on a stack
        of entries still to visit rather than by recursion: a folder thousands of levels deep is a legal
        path, and Python's recursion stops near a thousand."""
        stack = self.children(self.root)
        while stack:
            yield from self.entry(stack.pop(), stack)

    def children(self, folder: Path) -> list[Path]:
        """The folder's entries in reverse order of their names (popped from a stack, they come sorted)."""
        try:
            with os.scandir(folder) as entries:
                names = sorted((entry.name for entry in entries), reverse=True)
        except OSError as error:
            self._skip(folder, "unreadable_folder", error.strerror or str(error))
            return []
        return [folder / name for name in names if not name.startswith(".")]  # hidden: not inputs

    def entry(self, path: Path, stack: list[Path]) -> Iterator[SourceItem]:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return  # gone since the folder was read: nothing left to caption
        except OSError as error:
            self._skip(path, "unreadable_entry", error.strerror or str(error))
            return
        if stat.S_ISLNK(mode):
            yield from self.link(path)
        elif path in self.exclude:
            return
        elif stat.S_ISDIR(mode):
            stack.extend(self.children(path))
        elif stat.S_ISREG(mode):
            yield from self.file(path)
        else:
            yield from self.odd(path, _special_kind(mode), _not_regular(path, mode))

    def link(self, path: Path) -> Iterator[SourceItem]:
        try:
            mode = os.stat(path).st_mode  # follows the link; a loop is ELOOP here, not a RuntimeError
        except OSError as error:
            loop = error.errno == errno.ELOOP
            what = "a link loop" if loop else "a link to nothing"
            refusal: OSError = FileNotFoundError(f"{path.name} is {what}: point it at the image file or remove it")
            yield from self.odd(path, "link_loop" if loop else "dangling_link", refusal)
            return
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.root):  # no escape from the folder
            refusal = PermissionError(
                f"{path.name} links to outside the folder, and such links are not followed: "
                "copy the file in or caption the folder it points to"
            )
            yield from self.odd(path, "link_outside", refusal)
        elif real in self.exclude:
            return
        elif stat.S_ISDIR(mode):
            # Its files are listed where they really are (or are hidden there): never twice.
            self._skip(path, "linked_folder")
        elif stat.S_ISREG(mode):
            yield from self.file(path)
        else:
            yield from self.odd(path, _special_kind(mode), _not_regular(path, mode))

    def file(self, path: Path) -> Iterator[SourceItem]:
        if not _looks_like_image(path):
            return
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # gone since the scan saw it: reading it reports not_found
        yield self._item(path, size)

    def odd(self, path: Path, reason: str, refusal: Exception) -> Iterator[SourceItem]:
        """An entry that cannot be read as a file: an input with its failure row when its name says
        image (it was meant to be captioned), else counted as skipped."""
        if path.suffix.lower() in IMAGE_SUFFIXES:
            yield self._item(path, 0, refusal)
        else:
            self._skip(path, reason)

    def _item(self, path: Path, size: int, refusal: Exception | None = None) -> SourceItem:
        relative = path.relative_to(self.root).as_posix()
        return SourceItem(relative, path.as_uri(), path, size, self.max_bytes, refusal)

    def _skip(self, path: Path, reason: str, why: str = "") -> None:
        self.skipped[reason] += 1
        logger.warning("skipped %s: %s%s", path, SKIP_LABELS[reason][0], f" ({why})" if why else "")


def iter_folder(
    root: Path, exclude: frozenset[Path] = frozenset(), max_bytes: int = 0, skipped: Counter[str] | None = None
) -> Iterator[SourceItem]:
    """Image files under root in a stable order; hidden files and ``exclude`` are skipped. Items over
    ``max_bytes`` fail as too_large when read, without being read. Odd entries that are not inputs
    are counted into ``skipped`` (reason -> count, see SKIP_LABELS) as the listing passes them."""
    try:
        root = root.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop on Python 3.11
        raise NotADirectoryError(f"{root} cannot be resolved ({error}): pass a folder of images") from error
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory: pass a folder of images")
    yield from _Listing(root, exclude, max_bytes, Counter() if skipped is None else skipped).walk()
