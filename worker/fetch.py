"""Image uris -> bytes, under an allow-list policy decided before any I/O.

Where images may come from is configured, not open (``WORKER_FETCH__*``):

- ``s3://bucket/key``: only buckets in ``allowed_buckets``;
- ``file:///path``: only inside ``file_root``; ``..`` is refused outright and symlinks are resolved
  before the check, so neither can escape it; the final open does not follow a symlink swapped in
  after the check, and what it opened is checked again (a folder on the way may have been swapped);
- ``http(s)://``: refused unless the host and port are in ``allowed_hosts`` (a bare host: its scheme's
  default port only; every redirect is held to the same rule), and each attempt has an overall deadline
  (connect + read timeout), not only a per-receive one: worker/http_client.py, shared with the archive job;
- S3 keys with ``.``/``..`` segments are refused: a path-normalising store could read another bucket.

A refused uri fails with kind ``forbidden`` and is never fetched: requests come from other teams'
producers, and an open fetcher inside the cluster would read whatever the worker's role can (SSRF).

S3 reads retry with jittered exponential backoff on throttling (503 SlowDown), other 5xx and timeouts;
botocore's own retries are off so the attempts and waits are the ones configured here.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from captionfleet.core.failures import (
    FETCH_FAILURE,
    FORBIDDEN,
    MALFORMED,
    NOT_FOUND,
    TOO_LARGE,
    FetchError,
    TransientFetchError,
)
from captionfleet.core.s3 import (
    ObjectTooLarge,
    RetryPolicy,
    as_object_store,
    is_retryable,
    make_s3_client,
    object_failure,
    parse_s3_uri,
    read_object,
)
from captionfleet.core.settings import FetchSettings, S3Settings, split_host_port
from captionfleet.worker.http_client import HttpFetcher
from captionfleet.worker.http_hosts import address, host_allowed

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Target:
    bucket: str
    key: str


@dataclass(frozen=True)
class FileTarget:
    path: Path


@dataclass(frozen=True)
class HttpTarget:
    url: str


Target = S3Target | FileTarget | HttpTarget


class Fetcher:
    """Thread-safe: fetch threads share one instance (and one S3 client, whose pool is sized for them)."""

    def __init__(
        self,
        settings: FetchSettings,
        *,
        s3: S3Settings,
        max_bytes: int,
        s3_client: S3Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self.allowed_buckets = frozenset(settings.allowed_buckets)
        self.allowed_hosts = frozenset(split_host_port(host) for host in settings.allowed_hosts)
        self.file_root = Path(os.path.realpath(settings.file_root)) if settings.file_root else None
        self._s3_settings = s3
        self._s3_client = s3_client
        self._client_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.concurrency)
        # Full jitter: retries from many threads spread out instead of hitting the store together.
        self._retry = RetryPolicy(
            attempts=settings.max_attempts,
            base_s=settings.backoff_initial_ms / 1000,
            max_s=settings.backoff_max_ms / 1000,
            sleep=sleep,
            random=jitter,
            retryable=lambda error: isinstance(error, TransientFetchError),
            describe=str,
        )
        # http(s) goes through the shared httpx client (worker/http_client.py), with the same backoff.
        self._http = HttpFetcher(settings, max_bytes=max_bytes, retry=self._retry, outer_slots=self._slots)
        if self.file_root is not None and not self.file_root.is_dir():
            raise ValueError(
                f"WORKER_FETCH__FILE_ROOT={settings.file_root} is not a folder: point it at the folder "
                "file:// uris may read, or unset it to refuse file:// uris"
            )

    # -- policy (no I/O) -----------------------------------------------------------------------------

    def check(self, uri: str) -> Target:
        """Where ``uri`` points, if the policy allows it; raises FetchError (forbidden/malformed) otherwise."""
        try:
            return self._check(uri)
        except ValueError as error:  # urlsplit on a broken uri ("file://[/x", a bad port)
            raise FetchError(MALFORMED, f"{uri[:200]!r} is not a valid uri ({error})") from error

    def _check(self, uri: str) -> Target:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme == "s3":
            return self._check_s3(uri)
        if scheme == "file":
            return self._check_file(uri)
        if scheme in ("http", "https"):
            return self._check_http(uri)
        raise FetchError(
            MALFORMED, f"unsupported uri {uri[:200]!r}: use s3://bucket/key (or file:// / https:// where enabled)"
        )

    def _check_s3(self, uri: str) -> S3Target:
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as error:
            raise FetchError(MALFORMED, str(error)) from error
        if not key or key.endswith("/"):
            raise FetchError(MALFORMED, f"{uri!r} names no object: expected s3://bucket/key")
        if any(segment in (".", "..") for segment in key.split("/")):
            # A store or proxy that normalises the request path would read ".."'s target, which can be
            # another bucket than the one the allow-list checked.
            raise FetchError(FORBIDDEN, f"{uri[:200]!r} has a '.' or '..' segment in its key: refused")
        if bucket not in self.allowed_buckets:
            allowed = ", ".join(sorted(self.allowed_buckets)) or "none"
            raise FetchError(
                FORBIDDEN,
                f"bucket {bucket!r} is not allowed (allowed: {allowed}); add it to WORKER_FETCH__ALLOWED_BUCKETS "
                "if this worker should read it",
            )
        return S3Target(bucket, key)

    def _check_file(self, uri: str) -> FileTarget:
        if self.file_root is None:
            raise FetchError(
                FORBIDDEN, "file:// uris are refused: set WORKER_FETCH__FILE_ROOT to the one folder they may read"
            )
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(FORBIDDEN, f"file:// uri with a host ({parts.netloc!r}): only local files are read")
        raw = unquote(parts.path)
        if "\x00" in raw or not raw.startswith("/"):
            raise FetchError(MALFORMED, f"{uri[:200]!r} is not an absolute file:///path")
        if ".." in PurePosixPath(raw).parts:
            raise FetchError(FORBIDDEN, f"{uri[:200]!r} contains '..': give the path inside the root as it is")
        # realpath follows every symlink on the way, so a link pointing out of the root is caught here.
        resolved = Path(os.path.realpath(raw))
        if not resolved.is_relative_to(self.file_root):
            raise FetchError(FORBIDDEN, f"{uri[:200]!r} is outside WORKER_FETCH__FILE_ROOT ({self.file_root})")
        return FileTarget(resolved)

    def _check_http(self, uri: str) -> HttpTarget:
        if not self.allowed_hosts:
            raise FetchError(FORBIDDEN, "http(s) uris are refused: set WORKER_FETCH__ALLOWED_HOSTS to allow hosts")
        if not host_allowed(uri, self.allowed_hosts):
            raise FetchError(
                FORBIDDEN,
                f"{address(uri)!r} is not allowed; add it to WORKER_FETCH__ALLOWED_HOSTS (host:port, or the bare "
                "host for its scheme's default port) if it should be read",
            )
        return HttpTarget(uri)

    # -- fetching ------------------------------------------------------------------------------------

    def fetch(self, uri: str) -> bytes:
        """The object's bytes; raises FetchError. Refused uris fail before any I/O."""
        target = self.check(uri)
        if isinstance(target, FileTarget):
            return self._read_file(target.path, uri)
        if isinstance(target, HttpTarget):
            return self._http.fetch(target.url)  # takes a slot of ours once its host's is free
        with self._slots:  # bounded concurrency, whichever threads call us
            return self._get_s3(target, uri)

    def _gave_up(self, failure: TransientFetchError) -> FetchError:
        """The failure of the last attempt, when every attempt failed in a way another might have fixed."""
        return FetchError(failure.kind, f"{failure.message} (gave up after {self.settings.max_attempts} attempts)")

    def _client(self) -> S3Client:
        with self._client_lock:
            if self._s3_client is None:
                self._s3_client = make_s3_client(
                    self._s3_settings,
                    connect_timeout=self.settings.connect_timeout_s,
                    read_timeout=self.settings.read_timeout_s,
                    max_attempts=1,  # retries are ours (above), so attempts do not multiply
                    max_pool_connections=self.settings.concurrency,
                )
            return self._s3_client

    def _get_s3(self, target: S3Target, uri: str) -> bytes:
        # core.s3.read_object raises botocore's own errors: the same backoff as for http, with what is
        # worth another attempt decided by what those errors mean here.
        retry = replace(
            self._retry,
            retryable=lambda error: isinstance(_s3_failure(error, uri), TransientFetchError),
            describe=lambda error: str(_s3_failure(error, uri)),
        )
        try:
            fetched = read_object(
                as_object_store(self._client()),
                target.bucket,
                target.key,
                retry=retry,
                what=f"fetch {uri}",
                max_bytes=self.max_bytes,
                refuse_declared=True,
            )
        except Exception as error:
            failure = _s3_failure(error, uri)
            if isinstance(failure, TransientFetchError):
                raise self._gave_up(failure) from error
            if failure is error:
                raise
            raise failure from error
        return fetched.data

    def _read_file(self, path: Path, uri: str) -> bytes:
        # O_NOFOLLOW: the checked path is already resolved, so a symlink here was swapped in since.
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (fstat then refuses it).
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as error:
            raise FetchError(NOT_FOUND, f"{uri} does not exist") from error
        except (PermissionError, OSError) as error:
            if isinstance(error, PermissionError) or error.errno == errno.ELOOP:  # a symlink appeared
                raise FetchError(FORBIDDEN, f"{uri}: not readable ({error.strerror})") from error
            raise FetchError(FETCH_FAILURE, f"{uri}: {error}") from error
        try:
            self._check_opened_inside_root(fd, uri)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FetchError(NOT_FOUND, f"{uri} is not a file")
            if info.st_size > self.max_bytes:
                raise FetchError(TOO_LARGE, f"{info.st_size} bytes exceeds the limit of {self.max_bytes} bytes")
            with os.fdopen(fd, "rb", closefd=False) as file:
                return file.read(self.max_bytes + 1)
        finally:
            os.close(fd)

    def _check_opened_inside_root(self, fd: int, uri: str) -> None:
        """O_NOFOLLOW guards only the last path component: a folder on the way swapped for a symlink
        after the check would be followed. What was really opened is what /proc says the fd is."""
        assert self.file_root is not None
        try:
            opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return  # no /proc (not Linux): the check before the open is what there is
        if not opened.is_relative_to(self.file_root):
            raise FetchError(FORBIDDEN, f"{uri[:200]!r} led outside WORKER_FETCH__FILE_ROOT ({self.file_root})")


def _s3_failure(error: BaseException, uri: str) -> BaseException:
    """An S3 read's error as ``fetch`` takes it: a ``TransientFetchError`` when another attempt may fix it (throttling,
    5xx, timeouts, broken connections), else a FetchError (``core.s3.object_failure``: the kinds the bulk
    jobs name too), or the error itself when it is not the store's (a bug)."""
    failure = object_failure(error, uri)
    if failure is None:
        return error
    if not isinstance(error, ObjectTooLarge) and is_retryable(error):
        return TransientFetchError(failure.kind, failure.message)
    return failure
