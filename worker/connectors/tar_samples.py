"""WebDataset tar shards -> samples, member by member, from a stream (a file or an S3 body), never extracted.

A sample is the run of consecutive members sharing a key, as WebDataset has it: ``dir/0001.jpg`` beside
``dir/0001.json`` and ``dir/0001.txt`` is the sample ``dir/0001`` (the key is the path up to the first dot
of the file name). Memory stays bounded: one sample's members at a time, each at most ``max_bytes``, at
most ``MAX_SAMPLE_MEMBERS`` of them and ``SAMPLE_BYTES_FACTOR * max_bytes`` together (a sample past either
is ``too_large``, the rest of its members passed over unread); global PAX headers, which tarfile keeps
for the rest of the stream, at most ``EXTENDED_HEADER_MAX_BYTES`` together.

Hostile members never stop the shard and are never written anywhere: a name that climbs out (``../x.jpg``)
or is absolute is ``forbidden``; a link, device or FIFO is ``not_an_image``; a member over ``max_bytes`` is
``too_large`` unread; a name that is not UTF-8 is ``malformed``, its bytes written ``\\xNN`` in its key (a
Parquet string column cannot hold them). A tar that ends early gives the sample it cut a ``truncated`` row,
and the shard is reported as cut (``TarReport``); a tar cut exactly between members is noticed by its
missing end block.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any

from captionfleet.core.failures import FORBIDDEN, MALFORMED, FetchError, ImageError
from captionfleet.core.images import sniff_format
from captionfleet.worker.connectors.local import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

# Members that describe a sample rather than being its picture (WebDataset's usual text fields).
SIDECAR_EXTENSIONS = frozenset({"txt", "json", "cls", "cls2", "caption", "text", "meta", "id", "index", "url"})
# Sidecars are carried into the output rows; a larger one is left out there (the image is still captioned).
SIDECAR_MAX_BYTES = 64 * 1024
# GNU long names and PAX headers are read whole by tarfile: a hostile one of gigabytes must not be.
EXTENDED_HEADER_MAX_BYTES = 1 << 20


# A sample is a picture with a few renditions and sidecars: more members than this, or more bytes than this
# many pictures' worth, is not one (a shard giving every member the same key would pile them all up).
MAX_SAMPLE_MEMBERS = 64
SAMPLE_BYTES_FACTOR = 4


# An honest member has at most a few extended headers before it (a long name, a long link, a PAX record, a
# global one). tarfile reads each next one by recursion: a few hundred in a row raise RecursionError.
MAX_EXTENDED_HEADERS_IN_A_ROW = 16


class _BoundedTarFile(tarfile.TarFile):
    members: list[tarfile.TarInfo]  # tarfile's own list of what it read (not in the type stubs)
    global_pax_bytes = 0  # global PAX headers read so far: tarfile merges them into one dict kept to the end
    extended_in_a_row = 0  # extended headers since the last member


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses extended headers (long names, PAX records) larger than any honest one, before tarfile
    reads them into memory, global PAX headers once together they are, and more of them in a row than any
    member needs (tarfile would recurse into each)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in extended and self.size > EXTENDED_HEADER_MAX_BYTES:
            raise tarfile.ReadError(f"an extended header of {self.size} bytes (over {EXTENDED_HEADER_MAX_BYTES})")
        if isinstance(tarfile_, _BoundedTarFile):
            tarfile_.extended_in_a_row = tarfile_.extended_in_a_row + 1 if self.type in extended else 0
            if tarfile_.extended_in_a_row > MAX_EXTENDED_HEADERS_IN_A_ROW:
                raise tarfile.ReadError(
                    f"over {MAX_EXTENDED_HEADERS_IN_A_ROW} extended headers in a row: not a shard to read"
                )
        if self.type == tarfile.XGLTYPE and isinstance(tarfile_, _BoundedTarFile):
            # Each one is added to tarfile's global dict (and copied into every later member's TarInfo):
            # many small ones would grow it without bound.
            tarfile_.global_pax_bytes += self.size
            if tarfile_.global_pax_bytes > EXTENDED_HEADER_MAX_BYTES:
                raise tarfile.ReadError(
                    f"global PAX headers of over {EXTENDED_HEADER_MAX_BYTES} bytes together: not a shard to read"
                )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def split_key(name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if "/" in name else stem  # "/abs.jpg" keeps its slash: refused, never merged
    return key, ext.lower() if dot else ""


def printable(name: str) -> str:
    """A name as text any output can hold: tarfile decodes bytes that are not UTF-8 as lone surrogates
    (surrogateescape), which a Parquet string or an S3 key refuses; each such byte becomes ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def safe_name(name: str) -> bool:
    """A relative name that stays inside the archive (and so inside any folder it were unpacked into)."""
    parts = PurePosixPath(name).parts
    return not (name.startswith(("/", "\\")) or ".." in parts or ".." in name.split("\\") or "\x00" in name)


def refusal_for(info: tarfile.TarInfo, max_bytes: int) -> Exception | None:
    """Why a member is never read as a picture, or None."""
    name = printable(info.name)  # messages end up in Parquet rows
    if not safe_name(name):
        return FetchError(FORBIDDEN, f"member name {name[:200]!r} climbs out of the archive or is absolute: refused")
    if info.issym() or info.islnk():
        target = info.linkname[:200]
        return ImageError("not_an_image", f"{name[:200]} is a link to {target!r}: links are never followed")
    if not info.isreg():
        return ImageError("not_an_image", f"{name[:200]} is a device, FIFO or other special member, not a file")
    if max_bytes and info.size > max_bytes:
        return ImageError(
            "too_large", f"{info.size} bytes exceeds the limit of {max_bytes} bytes (WORKER_IMAGES__MAX_BYTES)"
        )
    return None


@dataclass
class Member:
    name: str
    ext: str
    data: bytes | None  # None when refused or not read
    refusal: Exception | None = None


@dataclass
class Sample:
    """One key's members, in tar order; ``image()`` says which one is the picture."""

    key: str
    position: int  # 0-based, in the shard
    members: list[Member] = field(default_factory=list)
    key_escaped: bool = False  # the key's bytes were not UTF-8: ``key`` is printable(), not the name in the tar
    refusal: Exception | None = None  # the whole sample is refused (over MAX_SAMPLE_MEMBERS or its bytes)
    held: int = 0  # bytes of its members' data in memory

    def refuse(self, why: Exception) -> None:
        """Refused as a whole: the data read so far is let go and later members are not read."""
        self.refusal = why
        for member in self.members:
            member.data = None
        self.held = 0

    def image(self) -> Member | None:
        """The picture: the first member named like an image, else the first whose bytes look like one,
        else the first that is not a text sidecar (decoding then says what it is). A refused member counts."""
        candidates = [m for m in self.members if m.ext not in SIDECAR_EXTENSIONS]
        for test in (
            lambda m: "." + m.ext.rsplit(".", 1)[-1] in IMAGE_SUFFIXES,
            lambda m: m.data is not None and sniff_format(m.data[:64]) is not None,
            lambda m: True,
        ):
            for member in candidates:
                if test(member):
                    return member
        return None

    def sidecar_text(self, ext: str) -> str | None:
        for member in self.members:
            if member.ext == ext and member.data is not None and len(member.data) <= SIDECAR_MAX_BYTES:
                return member.data.decode("utf-8", errors="replace")
        return None


@dataclass
class TarReport:
    """What the whole shard looked like: ``broken`` says why it ended early (None when read to its end)."""

    samples: int = 0
    broken: str | None = None


# What one read of the stream asks for. tarfile reads its stream 10 KiB at a time, and each read of an S3 body
# is a call through the retry policy, botocore and urllib3: six of them per 60 KB photo cost more CPU than
# the bytes; one read of this size serves a few photos.
READ_CHUNK = 128 * 1024


class _Counting:
    """The stream as tarfile reads it, through a read-ahead buffer of ``READ_CHUNK`` bytes; keeps the position
    (the bytes handed to tarfile) so a cut can be reported where it happened. A read may return fewer bytes
    than asked for (tarfile reads on until it has them); only an empty one means the stream ended."""

    def __init__(self, raw: IO[bytes], chunk: int = READ_CHUNK) -> None:
        self._raw = raw
        self._chunk = chunk
        self._buffer = b""
        self._offset = 0
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data = self._buffer[self._offset :] + bytes(self._raw.read())
            self._buffer, self._offset = b"", 0
        else:
            if self._offset >= len(self._buffer):
                self._buffer, self._offset = bytes(self._raw.read(max(size, self._chunk))), 0
            data = self._buffer[self._offset : self._offset + size]
            self._offset += len(data)
        self.position += len(data)
        return data


def iter_samples(
    stream: IO[bytes], *, max_bytes: int, report: TarReport, sidecar_max_bytes: int = SIDECAR_MAX_BYTES
) -> Iterator[Sample]:
    """The shard's samples in order. A broken tar ends the iteration (``report.broken`` says why) after
    the sample it cut, whose unreadable member carries its ``truncated`` refusal. Sidecars over
    ``sidecar_max_bytes`` are passed over unread (``data`` None).

    Errors of the stream itself that are not the tar's (the store or network failing half-way) are not
    caught here: the file is then unfinished, not broken."""
    counting = _Counting(stream)
    try:
        # Closed by the `with` below; opening is apart so that a non-tar is told from a cut tar.
        opened = _BoundedTarFile.open(fileobj=counting, mode="r|*", tarinfo=_BoundedTarInfo)  # type: ignore[call-overload]
    except (tarfile.TarError, EOFError, OSError) as error:
        report.broken = f"not a readable tar: {error}"
        return
    tar: _BoundedTarFile = opened  # TarFile.open returns an instance of the class it is called on
    with tar:
        yield from _samples(tar, counting, max_bytes, sidecar_max_bytes, report)


def _samples(
    tar: _BoundedTarFile, counting: _Counting, max_bytes: int, sidecar_max_bytes: int, report: TarReport
) -> Iterator[Sample]:
    current: Sample | None = None
    sample_max = SAMPLE_BYTES_FACTOR * max_bytes
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, OSError) as error:
            report.broken = f"cut or corrupt after byte {counting.position}: {error}"
            break
        if info is None:
            break
        tar.members.clear()  # a stream's TarFile keeps every TarInfo it read: a shard of many is not held
        if info.isdir():
            continue
        name = printable(info.name)
        key, ext = split_key(name)
        if current is not None and current.key != key:
            report.samples += 1
            yield current
            current = None
        if current is None:
            current = Sample(key, report.samples, key_escaped=split_key(info.name)[0] != key)
        if current.refusal is not None:
            continue  # passed over unread (tarfile skips its data)
        room = sample_max - current.held if max_bytes else None
        if len(current.members) >= MAX_SAMPLE_MEMBERS or (
            room is not None and _would_read(info, ext, sidecar_max_bytes, max_bytes) > room
        ):
            current.refuse(
                ImageError(
                    "too_large",
                    f"sample {key[:200]!r} has over {MAX_SAMPLE_MEMBERS} members or {sample_max} bytes "
                    f"({SAMPLE_BYTES_FACTOR} x WORKER_IMAGES__MAX_BYTES): its members are not read",
                )
            )
            continue
        member = _read_member(tar, info, name, ext, max_bytes, sidecar_max_bytes)
        current.members.append(member)
        current.held += len(member.data or b"")
        if isinstance(member.refusal, ImageError) and member.refusal.kind == "truncated":
            report.broken = f"cut inside member {name[:200]!r}: the shard ends early"
            break
    if report.broken is None and not _ended_with_end_block(tar):
        report.broken = "no end-of-archive block after the last whole member: the shard ends early"
    if current is not None:
        report.samples += 1
        yield current


def _would_read(info: tarfile.TarInfo, ext: str, sidecar_max: int, max_bytes: int) -> int:
    """How many bytes ``_read_member`` would hold for this member (0 for one it refuses or passes over)."""
    if not info.isreg() or info.size > max_bytes or (ext in SIDECAR_EXTENSIONS and info.size > sidecar_max):
        return 0
    return info.size


def _read_member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, ext: str, max_bytes: int, sidecar_max: int
) -> Member:
    """``name``: the member's name as printable() made it (what rows and messages carry)."""
    refusal = refusal_for(info, max_bytes)
    if refusal is None and name != info.name:
        # Refused, not guessed at: which encoding the writer meant is unknown, and the escaped name is not
        # the member's, so nothing downstream could find it again by it.
        refusal = FetchError(MALFORMED, f"member name {name[:200]!r} is not UTF-8: refused (rename it in the shard)")
    if refusal is not None:
        return Member(name, ext, None, refusal)
    if ext in SIDECAR_EXTENSIONS and info.size > sidecar_max:
        return Member(name, ext, None)  # skipped unread: too big to carry into a row
    try:
        extracted = tar.extractfile(info)
        data = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError) as error:
        return Member(name, ext, None, ImageError("truncated", f"{name[:200]}: the tar ends early ({error})"))
    return Member(name, ext, data)


def _ended_with_end_block(tar: tarfile.TarFile) -> bool:
    """tarfile stops at the first all-zero block; a stream that simply ran out reads none of it. The
    positions are tarfile's own (``offset`` is where the next header would start, ``fileobj.pos`` how far
    it read), so this holds for compressed shards too."""
    read_to = getattr(tar.fileobj, "pos", None)
    if not isinstance(read_to, int):
        return True  # a tarfile without the stream's position: nothing to tell
    return read_to - tar.offset >= tarfile.BLOCKSIZE
