"""Where an archive job writes beside the data: a local folder or an S3 prefix, behind one small interface.

Every file is written whole: locally to a temporary name of its own then renamed (with fsync), on S3 as one
PUT (a multipart upload over SINGLE_PUT_MAX_BYTES), so a reader or a restarted run sees a file complete or
not at all. ``names()`` is one listing of everything under the output, which is all a run needs to plan
(markers, checkpoint parts).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from captionfleet.core.s3 import ObjectStore, RetryPolicy, is_not_found, parse_s3_uri
from captionfleet.worker.connectors.s3_listing import list_pages


class UnsafeOutputName(Exception):
    """A name that would write outside the output folder. Planning leaves such inputs out, so this is a
    last guard (a bug if it is ever raised), never a usage error."""


def _checked(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts:
        raise UnsafeOutputName(f"output name {name[:200]!r} is outside the output folder: refused")
    return name


class Outputs(Protocol):
    def uri(self, name: str = "") -> str: ...
    def names(self) -> set[str]: ...
    def put_file(self, name: str, path: Path) -> None: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def get_bytes(self, name: str) -> bytes | None: ...
    def delete(self, name: str) -> None: ...


class LocalOutputs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def uri(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root) + os.sep

    def names(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}

    def _path(self, name: str) -> Path:
        """The name's path, which must stay under the root once normalised (no '..', no absolute name)."""
        target = self.root / _checked(name)
        if not Path(os.path.abspath(target)).is_relative_to(os.path.abspath(self.root)):
            raise UnsafeOutputName(f"output name {name[:200]!r} is outside {self.root}: refused")
        return target

    def _target(self, name: str) -> Path:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def put_file(self, name: str, path: Path) -> None:
        with path.open("rb") as src:
            self._write(name, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))

    def put_bytes(self, name: str, data: bytes) -> None:
        self._write(name, lambda dst: dst.write(data))

    def _write(self, name: str, fill: Callable[[BinaryIO], object]) -> None:
        """Written to a temporary name of its own, then renamed: readers only ever see the whole file, and two
        writers of one name (two runs of a shard) never write into each other's temporary file."""
        target = self._target(name)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        # 0o666 less the umask, as open() would make it (mkstemp's 0o600 would hide outputs from readers).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as dst:
                fill(dst)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def get_bytes(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# One PUT takes at most 5 GiB; above this a file goes up in parts of PART_BYTES (at most 10,000 of them).
SINGLE_PUT_MAX_BYTES = 4 << 30
PART_BYTES = 256 << 20


class S3Outputs:
    def __init__(self, client: ObjectStore, uri: str, retry: RetryPolicy) -> None:
        self.client = client
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.retry = retry

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def _key(self, name: str) -> str:
        # S3 takes '..' literally, but a store or proxy that normalises paths would not: refused alike.
        return self.prefix + _checked(name)

    def names(self) -> set[str]:
        found: set[str] = set()
        for page in list_pages(self.client, self.bucket, self.prefix, retry=self.retry):
            found.update(obj.key[len(self.prefix) :] for obj in page)
        return found

    def put_file(self, name: str, path: Path) -> None:
        key = self._key(name)
        if path.stat().st_size > SINGLE_PUT_MAX_BYTES:
            self.retry.call(lambda: self._put_in_parts(key, path), f"write {self.uri(name)}")
            return

        def put() -> None:
            with path.open("rb") as body:  # one PUT: the object appears whole or not at all
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

        self.retry.call(put, f"write {self.uri(name)}")

    def _put_in_parts(self, key: str, path: Path) -> None:
        """A file over one PUT's 5 GiB (a webdataset shard of large pictures) as a multipart upload, which
        the store also shows whole or not at all: boto3's managed transfer (completed, or aborted)."""
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=SINGLE_PUT_MAX_BYTES, multipart_chunksize=PART_BYTES)
        upload = self.client.upload_file  # type: ignore[attr-defined]  # a boto3 client's, not in ObjectStore
        try:
            upload(str(path), self.bucket, key, Config=config)
        except S3UploadFailedError as error:
            if isinstance(error.__cause__, (ClientError, BotoCoreError)):
                raise error.__cause__ from error  # classified and retried like any other call's error
            raise

    def put_bytes(self, name: str, data: bytes) -> None:
        put = partial(self.client.put_object, Bucket=self.bucket, Key=self._key(name), Body=data)
        self.retry.call(put, f"write {self.uri(name)}")

    def get_bytes(self, name: str) -> bytes | None:
        def get() -> bytes:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read())

        try:
            return self.retry.call(get, f"read {self.uri(name)}")[0]
        except ClientError as error:
            if is_not_found(error):
                return None
            raise

    def delete(self, name: str) -> None:
        self.retry.call(
            partial(self.client.delete_object, Bucket=self.bucket, Key=self._key(name)), f"delete {self.uri(name)}"
        )
