"""The input files of an archive job (tar shards, manifests, Parquet datasets): one path, a brace range
(``shards/{00000..09999}.tar``) or a folder, local or on S3, resolved with one listing; and reading one.

Resolving 10,000 shards on S3 lists the range's folder once (paginated), never one request per shard:
every worker of an Indexed Job plans the same way with no coordinator, then keeps its own files.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.s3 import NETWORK_ERRORS, ObjectStore, RetryPolicy, S3AccessError, describe_error, parse_s3_uri
from captionfleet.worker.connectors.s3_listing import list_pages

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_EXPANDED = 1_000_000
_COPY_CHUNK = 1 << 20


class InputError(Exception):
    """The source names no usable input; the message names the fix."""


class InputReadError(Exception):
    """An input file could not be read to its end (the store or the network failed after retries): the
    file is unfinished, not broken, and a rerun resumes it. Not an OSError, so that no reader of the
    stream takes it for a damaged file."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # s3://bucket/key, or a local path
    name: str  # relative to the source's base folder: it names the outputs and decides the file's shard
    size: int
    etag: str  # S3's ETag; locally size and mtime, so a file rewritten since is a new input

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def unsafe_name(name: str) -> str | None:
    """Why an input's name cannot name its outputs, or None. Outputs are written at ``<out>/<name>.*``: an S3
    key such as ``shards/../../x.tar`` (S3 takes ``..`` literally) would put them, and ``--overwrite``'s
    deletions, outside ``--out``."""
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return "its name is absolute or has a backslash or NUL, so its outputs could land outside --out"
    if ".." in name.split("/"):
        return "its name has a '..' segment, so its outputs would land outside --out"
    return None


def expand_braces(pattern: str) -> list[str]:
    """Bash-style: ``{00000..00009}`` (zero padding kept) and ``{a,b}``; several groups multiply."""
    groups: list[list[str]] = []
    for match in _BRACE.finditer(pattern):
        body = match.group(1)
        numbers = _RANGE.match(body)
        if numbers:
            low, high = int(numbers.group(1)), int(numbers.group(2))
            width = len(numbers.group(1)) if numbers.group(1).lstrip("-").startswith("0") else 0
            step = 1 if high >= low else -1
            groups.append([str(n).zfill(width) for n in range(low, high + step, step)])
        elif "," in body:
            groups.append(body.split(","))
        else:
            raise InputError(f"{pattern!r}: {{{body}}} is not a range or a list: write {{00000..00099}} or {{a,b}}")
    total = 1
    for group in groups:
        total *= len(group)
    if total > MAX_EXPANDED:
        raise InputError(f"{pattern!r} names {total} files (over {MAX_EXPANDED}): split the job, or name a folder")
    pieces = _BRACE.split(pattern)[::2]  # the literal text around the groups
    names = []
    for choice in itertools.product(*groups):
        names.append("".join(piece + (choice[i] if i < len(choice) else "") for i, piece in enumerate(pieces)))
    return names


def _base_folder(path: str) -> str:
    """The folder part of the text before the first brace, with its slash ("" for none)."""
    literal = path.split("{", 1)[0]
    return literal[: literal.rfind("/") + 1]


def has_braces(source: str) -> bool:
    return _BRACE.search(source) is not None


def resolve_local(source: str, suffixes: tuple[str, ...], exclude: Path | None = None) -> list[InputFile]:
    """A file, a brace range of files, or the files under a folder (by suffix, sorted). ``exclude``: a folder
    left out of a folder's listing (the job's own output, when it is inside the source)."""
    if has_braces(source):
        base = _base_folder(source)
        paths = [Path(path) for path in expand_braces(source)]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} of the {len(paths)} files named by {source} do not exist (first: {missing[0]}): "
                "fix the range; nothing was written"
            )
        return [_local_file(path, str(path)[len(base) :]) for path in paths]
    path = Path(source)
    if path.is_file():
        return [_local_file(path, path.name)]
    if path.is_dir():
        skip = Path(os.path.abspath(exclude)) if exclude is not None else None
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(suffixes)
            and not _hidden(p, path)
            and not (skip is not None and Path(os.path.abspath(p)).is_relative_to(skip))
        )
        if not found:
            raise InputError(f"no {'/'.join(suffixes)} files under {path}: check the folder or --input-format")
        return [_local_file(p, p.relative_to(path).as_posix()) for p in found]
    raise InputError(
        f"{source} does not exist: pass a file, a brace range such as shards/{{0000..0099}}.tar, or a folder"
    )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _local_file(path: Path, name: str) -> InputFile:
    info = path.stat()
    return InputFile(str(path), name, info.st_size, f"{info.st_size}-{info.st_mtime_ns}")


def resolve_s3(
    source: str, suffixes: tuple[str, ...], client: ObjectStore, retry: RetryPolicy, exclude: str | None = None
) -> list[InputFile]:
    """An object, a brace range of objects, or the objects under a prefix (by suffix): one listing of
    the folder they are in, whatever their number. ``exclude``: a key prefix to leave out (the job's output)."""
    bucket, key = parse_s3_uri(source)
    base = _base_folder(key)
    if has_braces(key):
        wanted = expand_braces(key)
        listed = _listing(client, bucket, _common_prefix(wanted), retry)
        missing = [name for name in wanted if name not in listed]
        if missing:
            raise InputError(
                f"{len(missing)} of the {len(wanted)} objects named by {source} do not exist "
                f"(first: s3://{bucket}/{missing[0]}): fix the range; nothing was written"
            )
        return [_s3_file(bucket, name, base, listed[name]) for name in wanted]
    if key and not key.endswith("/"):
        listed = _listing(client, bucket, key, retry)
        if key in listed:
            return [_s3_file(bucket, key, base, listed[key])]
        key += "/"  # s3://b/shards means the folder shards/, as for the other S3 sources
    listed = _listing(client, bucket, key, retry)
    keys = sorted(
        name
        for name in listed
        if name.lower().endswith(suffixes) and not (exclude and name.startswith(exclude)) and not name.endswith("/")
    )
    if not keys:
        raise InputError(
            f"no {'/'.join(suffixes)} objects under s3://{bucket}/{key}: check the bucket, the prefix and "
            "--input-format; nothing was written"
        )
    return [_s3_file(bucket, name, key, listed[name]) for name in keys]


def _common_prefix(names: list[str]) -> str:
    """The longest text every name starts with (not a path: "shards/000" lists 00000..00099 alone)."""
    return os.path.commonprefix(names) if names else ""  # noqa: RUF071 - a key prefix, not path parts


def _listing(client: ObjectStore, bucket: str, prefix: str, retry: RetryPolicy) -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    for page in list_pages(client, bucket, prefix, retry=retry):
        found.update({obj.key: (obj.size, obj.etag) for obj in page})
    return found


def _s3_file(bucket: str, key: str, base: str, listed: tuple[int, str]) -> InputFile:
    size, etag = listed
    return InputFile(f"s3://{bucket}/{key}", key[len(base) :], size, etag)


# -- reading --------------------------------------------------------------------------------------------


class InputReader:
    """Opens input files: local ones directly, S3 ones through the job's client (the GET retried; a body
    that breaks half-way is the caller's to report, as the file is not finished)."""

    def __init__(self, client: ObjectStore | None, retry: RetryPolicy) -> None:
        self.client = client
        self.retry = retry

    def open(self, inp: InputFile) -> IO[bytes]:
        """A stream of the file's bytes, read as it is consumed (bounded memory). A local file is the one
        listed or an InputReadError: its size and mtime are its ETag (S3's GETs say IfMatch)."""
        if not inp.is_s3:
            return _open_unchanged(inp)
        if self.client is None:
            raise S3AccessError(f"no S3 client to read {inp.uri}")
        return _ResumingBody(self.client, inp, self.retry)  # type: ignore[return-value]

    def check_unchanged(self, inp: InputFile) -> None:
        """A local file is still the one listed (read twice, a manifest must be the same both times)."""
        if not inp.is_s3:
            _open_unchanged(inp).close()

    def to_local(self, inp: InputFile, folder: Path) -> Path:
        """The file on local disk (S3 objects are copied into ``folder`` chunk by chunk): Parquet needs to
        seek, and a manifest is read twice (items, then the output beside it)."""
        if not inp.is_s3:
            self.check_unchanged(inp)
            return Path(inp.uri)
        target = folder / Path(inp.name).name

        def copy() -> Path:
            with self.open(inp) as body, target.open("wb") as out:
                shutil.copyfileobj(body, out, _COPY_CHUNK)
            return target

        return self.retry.call(copy, f"download {inp.uri}")[0]


def _open_unchanged(inp: InputFile) -> IO[bytes]:
    try:
        file = open(inp.uri, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError as error:
        raise InputReadError(f"{inp.uri}: gone since it was listed; run again") from error
    info = os.fstat(file.fileno())  # of what was opened: no gap for a swap between a stat and the open
    if f"{info.st_size}-{info.st_mtime_ns}" != inp.etag:
        file.close()
        raise InputReadError(f"{inp.uri}: rewritten since it was listed (size or mtime differ); run again")
    return file


class _ResumingBody:
    """An S3 object's body that survives a connection dropped half-way: the read goes on from where it
    stopped with a ranged GET of the same version (``IfMatch`` its ETag), under the job's retry policy.
    What still fails is an ``InputReadError``."""

    def __init__(self, client: ObjectStore, inp: InputFile, retry: RetryPolicy) -> None:
        self.client = client
        self.inp = inp
        self.bucket, self.key = parse_s3_uri(inp.uri)
        self.retry = retry
        self.position = 0
        self._body: Any = None

    def _get(self) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
        if self.inp.etag:
            kwargs["IfMatch"] = self.inp.etag  # a file rewritten since the listing is not spliced
        return self.client.get_object(**kwargs)["Body"]

    def read(self, size: int = -1) -> bytes:
        def once() -> bytes:
            if self._body is None:
                self._body = self._get()
            try:
                return bytes(self._body.read(size) if size >= 0 else self._body.read())
            except Exception:
                self._drop()
                raise

        try:
            data, _ = self.retry.call(once, f"read {self.inp.uri} from byte {self.position}")
        except (BotoCoreError, ClientError, *NETWORK_ERRORS) as error:
            where = f"{self.inp.uri}: reading stopped at byte {self.position}"
            raise InputReadError(f"{where}: {describe_error(error)}; run again to resume") from error
        self.position += len(data)
        return data

    def _drop(self) -> None:
        body, self._body = self._body, None
        close = getattr(body, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> _ResumingBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
