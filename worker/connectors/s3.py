"""S3 (and S3-compatible stores: SeaweedFS, MinIO, ...): clients, listing, fetching, result parts.

- ``make_s3_client`` / ``parse_s3_uri``: one client per job; credentials from settings or the AWS chain.
- ``list_pages``: paginated listing. ``S3Reader`` + ``Prefetcher``: GETs with retries and backoff in
  their own thread pool, ahead of decoding, as pipeline ``Item``s. Per-object errors become the
  exceptions the pipeline turns into failure rows (not_found, forbidden, timeout); job-level errors
  (no bucket, no access, no endpoint) become ``S3AccessError`` with a message naming the fix.
- ``PartStore`` + ``S3ResultSink``: results as whole Parquet/JSONL part objects and a completion marker.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from captionfleet.core.failures import ImageError
from captionfleet.core.settings import S3Settings
from captionfleet.worker.messages import Result

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# Adaptive retries back off on throttling (SlowDown/503) as well as on connection errors; a few
# attempts ride out a store restart without making a dead endpoint take minutes to report.
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Reads of large objects stream; this bounds the wait for each chunk, not the whole object.
DEFAULT_READ_TIMEOUT_S = 60.0


def make_s3_client(
    settings: S3Settings,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    max_pool_connections: int = 32,
) -> S3Client:
    """A boto3 S3 client for ``settings``.

    Explicit keys are used only when both are set; otherwise boto3's standard chain (environment,
    profile, web identity, instance metadata) applies, so deployments can use IAM roles.
    """
    config = Config(
        # s3v4 everywhere: S3-compatible stores reject v2, and presigned URLs need it.
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "adaptive", "max_attempts": max_attempts},
        # Default is 10; fetch threads share one client and would otherwise queue for a connection.
        max_pool_connections=max_pool_connections,
    )
    access_key = settings.access_key_id.get_secret_value() if settings.access_key_id else None
    secret_key = settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
    if bool(access_key) != bool(secret_key):
        # Only one of the pair is set: almost certainly a mistake; say so, but never log the value.
        log.warning(
            "only one of WORKER_S3__ACCESS_KEY_ID / WORKER_S3__SECRET_ACCESS_KEY is set: "
            "ignoring it and using the standard AWS credential chain; set both or neither"
        )
    use_keys = bool(access_key) and bool(secret_key)
    _cap_sdk_logging()
    log.debug(
        "S3 client: endpoint=%s region=%s credentials=%s",
        settings.endpoint_url or "(AWS)",
        settings.region,
        "explicit keys" if use_keys else "AWS default chain",
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url or None,
        region_name=settings.region,
        aws_access_key_id=access_key if use_keys else None,
        aws_secret_access_key=secret_key if use_keys else None,
        config=config,
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/or/prefix`` -> ``(bucket, "key/or/prefix")``; the key may be empty.

    Parsed by hand, not with urllib: object keys may legitimately contain ``?`` and ``#``.
    """
    scheme = "s3://"
    if not uri.startswith(scheme):
        raise ValueError(f"not an S3 uri: {uri!r}; expected s3://bucket/key (e.g. s3://images/cats/1.jpg)")
    bucket, _, key = uri[len(scheme) :].partition("/")
    if not bucket:
        raise ValueError(f"S3 uri {uri!r} has no bucket; expected s3://bucket/key")
    if any(ch.isspace() for ch in bucket) or ":" in bucket or not 3 <= len(bucket) <= 63:
        raise ValueError(
            f"S3 uri {uri!r} has an invalid bucket name {bucket!r}: "
            "use 3-63 characters without spaces or ':', e.g. s3://my-bucket/key"
        )
    return bucket, key


def _cap_sdk_logging() -> None:
    # botocore at DEBUG logs signed request headers (the access key id, signatures, and for some
    # requests the session token): cap it at INFO so credentials never reach our logs, whatever
    # WORKER_LOG_LEVEL says.
    for name in ("botocore", "boto3", "s3transfer"):
        sdk_logger = logging.getLogger(name)
        if sdk_logger.getEffectiveLevel() < logging.INFO:
            sdk_logger.setLevel(logging.INFO)


# -- the subset of the S3 API this module uses -----------------------------------------------------


class ObjectStore(Protocol):
    """The S3 calls the bulk job makes; a boto3 S3 client is one, and tests use in-memory fakes that
    raise the same botocore exceptions (see tests/unit/test_s3_*.py)."""

    def list_objects_v2(self, **kwargs: Any) -> Any: ...
    def get_object(self, **kwargs: Any) -> Any: ...
    def put_object(self, **kwargs: Any) -> Any: ...
    def delete_object(self, **kwargs: Any) -> Any: ...


def as_object_store(client: S3Client) -> ObjectStore:
    # The stubs type each call's keywords exactly; the protocol takes any keywords, so say it here once.
    return cast(ObjectStore, client)


@dataclass(frozen=True)
class S3Object:
    """One listed object. ``etag`` is as S3 sends it (quoted); it changes whenever the content does."""

    bucket: str
    key: str
    etag: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# -- errors and retries -------------------------------------------------------------------------------

# Throttling: the store asks us to slow down. Transient: the store (or a proxy) failed this once.
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestLimitExceeded"}
)
TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "BadGateway", "GatewayTimeout"}
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403", "AccountProblem"})
BAD_CREDENTIALS_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
_NETWORK_ERRORS = (
    ReadTimeoutError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,
    TimeoutError,
    ConnectionError,  # the builtin: resets and broken pipes from the socket layer
)

CREDENTIALS_HINT = (
    "the credentials come from WORKER_S3__ACCESS_KEY_ID / WORKER_S3__SECRET_ACCESS_KEY when both are set, "
    "else from the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity)"
)


def error_code(error: BaseException) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def _http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_throttling(error: BaseException) -> bool:
    return isinstance(error, ClientError) and (error_code(error) in THROTTLE_CODES or _http_status(error) == 429)


def is_retryable(error: BaseException) -> bool:
    """Worth another try: throttling, 5xx, and timeouts or broken connections."""
    if isinstance(error, ClientError):
        status = _http_status(error)
        return is_throttling(error) or error_code(error) in TRANSIENT_CODES or 500 <= status < 600
    return isinstance(error, _NETWORK_ERRORS)


def describe_error(error: BaseException) -> str:
    """A short description without request ids or headers (and so without credentials)."""
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        message = info.get("Message") or ""
        return f"{info.get('Code', '?')}{f' ({message})' if message else ''}"
    return f"{type(error).__name__}: {error}"


class S3AccessError(Exception):
    """The job cannot use a bucket or endpoint at all (not one object's problem); the message names the fix.

    ``retryable``: the store failed (unreachable, throttling, 5xx after our retries) rather than refused
    (no such bucket, access denied, bad credentials), so running the job again may succeed; the CLI exits
    with EX_TEMPFAIL (75) for those, which a Kubernetes Job retries, and with 2 (fail the Job) otherwise.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def access_error(error: BaseException, action: str, uri: str, endpoint: str | None) -> S3AccessError:
    """Turn an error from listing, reading or writing the job's prefixes into a message that names the fix."""
    where = endpoint or "AWS S3"
    code = error_code(error)
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError):
        return S3AccessError(
            f"cannot reach the S3 endpoint {where} to {action} {uri} ({describe_error(error)}): check "
            "WORKER_S3__ENDPOINT_URL (leave it unset for AWS itself) and that the store is running",
            retryable=True,
        )
    if isinstance(error, NoCredentialsError):
        return S3AccessError(f"no S3 credentials found to {action} {uri}: {CREDENTIALS_HINT}; set one of them")
    if code == "NoSuchBucket":
        return S3AccessError(
            f"cannot {action} {uri}: bucket does not exist at {where}; fix the bucket name (or "
            "WORKER_S3__ENDPOINT_URL), or create the bucket"
        )
    if code in FORBIDDEN_CODES:
        return S3AccessError(
            f"access denied to {action} {uri} at {where}: grant these credentials that permission, or use "
            f"credentials that have it ({CREDENTIALS_HINT})"
        )
    if code in BAD_CREDENTIALS_CODES:
        return S3AccessError(
            f"the S3 store at {where} rejected the credentials ({code}) when trying to {action} {uri}: "
            f"check them ({CREDENTIALS_HINT})"
        )
    return S3AccessError(
        f"cannot {action} {uri}: {describe_error(error)}; check the uri, WORKER_S3__ENDPOINT_URL ({where}) and "
        "the credentials",
        retryable=True,  # a failing store (InternalError, SlowDown, timeouts), not a refusal
    )


def item_error(error: BaseException, uri: str) -> Exception:
    """Turn the final error of one object's GET into the exception kind the pipeline maps to a failure
    row: FileNotFoundError -> not_found, PermissionError -> forbidden, TimeoutError -> timeout."""
    code = error_code(error)
    detail = describe_error(error)
    if code in NOT_FOUND_CODES:
        return FileNotFoundError(f"{uri}: {detail} (deleted since it was listed?)")
    if code in FORBIDDEN_CODES or code in BAD_CREDENTIALS_CODES:
        return PermissionError(f"{uri}: {detail}")
    if code in TIMEOUT_CODES or isinstance(error, ReadTimeoutError | ConnectTimeoutError | TimeoutError):
        return TimeoutError(f"{uri}: {detail} (still timing out after retries)")
    if is_throttling(error):
        return OSError(f"{uri}: {detail} (still throttled after retries; lower WORKER_BULK__FETCH_CONCURRENCY)")
    return OSError(f"{uri}: {detail}")


T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (each wait is uniform in [0, min(max_s, base_s * 2**n)]),
    so many workers throttled at once do not retry in lockstep."""

    attempts: int = 5  # first try included
    base_s: float = 0.2
    max_s: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = random.random
    # Which errors another attempt may fix (default: S3's throttling, 5xx, timeouts, broken connections).
    retryable: Callable[[BaseException], bool] = is_retryable
    describe: Callable[[BaseException], str] = describe_error

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 = the first retry)."""
        return self.random() * min(self.max_s, self.base_s * 2 ** (retry - 1))

    def call(self, fn: Callable[[], T], what: str) -> tuple[T, int]:
        """``fn()`` and the number of attempts it took; the last error is raised when retries run out
        or the error is not worth retrying."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(), attempt
            except Exception as error:
                if attempt >= self.attempts or not self.retryable(error):
                    raise
                wait = self.backoff(attempt)
                log.info(
                    "%s: %s; retry %d of %d in %.2fs", what, self.describe(error), attempt, self.attempts - 1, wait
                )
                self.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")


# -- listing -----------------------------------------------------------------------------------------


def list_pages(
    client: ObjectStore, bucket: str, prefix: str, *, page_size: int = 1000, retry: RetryPolicy = RetryPolicy()
) -> Iterator[list[S3Object]]:
    """Every object under ``prefix``, one list per page of ``list_objects_v2`` (in key order).

    Lazy: the first page comes back before the rest is listed, so work can start at once.
    """
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page, _ = retry.call(partial(client.list_objects_v2, **kwargs), what=f"list s3://{bucket}/{prefix}")
        yield [
            S3Object(bucket, str(obj["Key"]), str(obj.get("ETag", "")), int(obj.get("Size", 0)))
            for obj in page.get("Contents", [])
        ]
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")
        if not token:
            raise S3AccessError(f"listing s3://{bucket}/{prefix} was cut short without a continuation token: retry")


# -- reading objects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    data: bytes
    etag: str  # of the bytes actually read: the object may have changed since it was listed
    seconds: float
    attempts: int


class S3Reader:
    """GETs one object with retries; failures come out as the exceptions the pipeline maps to kinds."""

    def __init__(self, client: ObjectStore, *, retry: RetryPolicy = RetryPolicy(), max_bytes: int = 0) -> None:
        self.client = client
        self.retry = retry
        self.max_bytes = max_bytes  # 0 = no limit

    def get(self, obj: S3Object) -> Fetched:
        if self.max_bytes and obj.size > self.max_bytes:
            # Refused from the listing: a huge object is never downloaded just to be rejected.
            raise ImageError(
                "too_large", f"{obj.size} bytes exceeds the limit of {self.max_bytes} bytes (WORKER_IMAGES__MAX_BYTES)"
            )
        if obj.size == 0:
            return Fetched(b"", obj.etag, 0.0, 0)  # nothing to fetch; decoding reports it as empty

        def once() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=obj.bucket, Key=obj.key)
            # The body is read inside the retried call: a timeout mid-stream is retried too. At most one
            # byte over the limit: an object grown since it was listed is not downloaded whole.
            body = response["Body"].read(self.max_bytes + 1) if self.max_bytes else response["Body"].read()
            return body, str(response.get("ETag") or obj.etag)

        start = time.perf_counter()
        try:
            (data, etag), attempts = self.retry.call(once, what=obj.uri)
        except Exception as error:
            raise item_error(error, obj.uri) from error
        if self.max_bytes and len(data) > self.max_bytes:
            raise ImageError(
                "too_large",
                f"more than {self.max_bytes} bytes (grown since it was listed at {obj.size}): exceeds the limit "
                "(WORKER_IMAGES__MAX_BYTES)",
            )
        return Fetched(data, etag, time.perf_counter() - start, attempts)


class S3Item:
    """An ``Item`` for the pipeline whose bytes are being fetched in the background."""

    __slots__ = ("_future", "attempts", "etag", "fetch_ms", "obj", "size")

    def __init__(self, obj: S3Object, future: Future[Fetched]) -> None:
        self.obj = obj
        self._future: Future[Fetched] | None = future
        self.etag = obj.etag
        self.size = obj.size
        self.fetch_ms: float | None = None
        self.attempts = 0

    @property
    def id(self) -> str:
        return self.obj.key

    @property
    def uri(self) -> str:
        return self.obj.uri

    def read(self) -> bytes:
        future, self._future = self._future, None  # drop our reference: the bytes go once decoded
        if future is None:
            raise RuntimeError(f"{self.uri} was already read")
        fetched = future.result()
        self.etag, self.size = fetched.etag, len(fetched.data)
        self.fetch_ms, self.attempts = round(fetched.seconds * 1000, 3), fetched.attempts
        return fetched.data


class Prefetcher:
    """Fetches objects in its own thread pool ahead of the pipeline, in order, within bounds.

    The pipeline's decode threads are CPU work; GETs are latency. Keeping them apart lets many GETs be
    in flight (``concurrency``) while decoding uses the cores, so the model never waits on I/O. At most
    ``2 * concurrency`` objects and about ``ahead_bytes`` (by listed sizes) are fetched ahead of what
    the pipeline has taken.
    """

    def __init__(self, reader: S3Reader, *, concurrency: int = 16, ahead_bytes: int = 256 << 20) -> None:
        self.reader = reader
        self.concurrency = concurrency
        self.ahead_bytes = ahead_bytes
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="s3-fetch")
        self._window: deque[S3Item] = deque()  # fetched or fetching, not yet handed out

    def items(self, objects: Iterable[S3Object], on_item: Callable[[S3Item], None] | None = None) -> Iterator[S3Item]:
        """The objects as items, in order; one iteration at a time per Prefetcher."""
        window = self._window
        window_bytes = 0
        source = iter(objects)
        while True:
            try:
                obj = next(source)
            except StopIteration:
                break
            except Exception:
                # The listing failed: what is already fetched still gets its rows, then the error goes on.
                while window:
                    yield window.popleft()
                raise
            # Make room first: an object bigger than the budget still goes, alone.
            while window and (len(window) >= 2 * self.concurrency or window_bytes + obj.size > self.ahead_bytes):
                item = window.popleft()
                window_bytes -= item.obj.size
                yield item
            item = S3Item(obj, self._pool.submit(self.reader.get, obj))
            if on_item is not None:
                on_item(item)
            window.append(item)
            window_bytes += obj.size
        while window:
            yield window.popleft()

    def close(self) -> None:
        # Fetches never handed out are not needed any more (the run stopped early); items already
        # handed out still complete, so whoever holds them can read them.
        for item in self._window:
            if item._future is not None:
                item._future.cancel()
        self._window.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- results: whole part files and a completion marker per shard -------------------------------------

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("model_version", pa.string()),
        ("caption", pa.string()),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("fetch_ms", pa.float64()),  # the GET itself, retries included
        ("fetch_attempts", pa.int64()),
        ("wait_ms", pa.float64()),  # how long decoding waited for the bytes (0 when fetched ahead)
        ("decode_ms", pa.float64()),
        ("queue_ms", pa.float64()),
        ("inference_ms", pa.float64()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("run_id", pa.string()),
    ]
)
FORMATS = ("parquet", "jsonl")
MARKER_NAME = "_COMPLETE.json"
_PART_RE = re.compile(r"^part-(\d{6,})-([0-9A-Za-z]+)\.(parquet|jsonl)$")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class PartRef:
    name: str  # part-000012-<run id>.parquet
    seq: int
    fmt: str

    @property
    def order(self) -> tuple[int, str]:
        """Parts are ordered by sequence number; the name breaks ties between two writers."""
        return (self.seq, self.name)

    @classmethod
    def parse(cls, name: str) -> PartRef | None:
        match = _PART_RE.match(name)
        return cls(name, int(match.group(1)), match.group(3)) if match else None


def result_row(result: Result, item: S3Item | None, run_id: str, finished_at: datetime) -> dict[str, Any]:
    """One output row. ``item`` carries what the listing and the GET know (ETag, size, fetch timing)."""
    return {
        "key": result.id,
        "uri": result.uri,
        "etag": item.etag if item else None,
        "size": item.size if item else result.bytes,
        "model_version": result.model_version,
        "caption": result.caption,
        "error_kind": result.error_kind,
        "error_message": result.error_message,
        "width": result.width,
        "height": result.height,
        "fetch_ms": item.fetch_ms if item else None,
        "fetch_attempts": item.attempts if item else None,
        "wait_ms": result.fetch_ms,
        "decode_ms": result.decode_ms,
        "queue_ms": result.queue_ms,
        "inference_ms": result.inference_ms,
        "finished_at": finished_at,
        "run_id": run_id,
    }


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def encode_part(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), buf, compression="zstd")
        return buf.getvalue()
    lines = (json.dumps(row, ensure_ascii=False, default=_json_default) for row in rows)
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_part(data: bytes, fmt: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data), columns=columns).to_pylist()
    rows = [json.loads(line) for line in _jsonl_lines(data)]
    return [{name: row.get(name) for name in columns} for row in rows] if columns else rows


def _jsonl_lines(data: bytes) -> list[str]:
    # "\n" only: str.splitlines() also breaks at U+2028/U+2029/U+0085, which json.dumps(ensure_ascii=False)
    # leaves unescaped inside strings, so a key containing one would read back as two broken lines.
    return [line for line in data.decode("utf-8").split("\n") if line.strip()]


def _drop_rows(data: bytes, fmt: str, drop: set[int]) -> tuple[bytes, int]:
    """The part without the rows at ``drop`` (positions), and how many rows are left."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        keep = pa.array([i not in drop for i in range(table.num_rows)])
        kept = table.filter(keep)
        buf = io.BytesIO()
        pq.write_table(kept, buf, compression="zstd")
        return buf.getvalue(), kept.num_rows
    lines = _jsonl_lines(data)
    kept_lines = [line for i, line in enumerate(lines) if i not in drop]
    return ("".join(line + "\n" for line in kept_lines)).encode("utf-8"), len(kept_lines)


class PartStore:
    """One shard's output folder: ``<prefix>part-<seq>-<run>.<fmt>`` objects and ``_COMPLETE.json``.

    Every part is one PUT of a complete file, so a reader (or a restarted run) sees a part whole or
    not at all; a run killed mid-part leaves nothing of it behind.
    """

    def __init__(
        self,
        client: ObjectStore,
        bucket: str,
        prefix: str,
        *,
        fmt: str = "parquet",
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown result format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        self.fmt = fmt
        self.retry = retry
        self._next_seq: int | None = None

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return self.retry.call(fn, what)[0]

    def _names(self) -> list[str]:
        names: list[str] = []
        for page in list_pages(self.client, self.bucket, self.prefix, retry=self.retry):
            names.extend(obj.key[len(self.prefix) :] for obj in page)
        return names

    def list_parts(self) -> list[PartRef]:
        parts = [part for name in self._names() if (part := PartRef.parse(name)) is not None]
        parts.sort(key=lambda part: part.order)
        self._next_seq = parts[-1].seq + 1 if parts else 0
        return parts

    def read(self, part: PartRef, columns: list[str] | None = None) -> list[dict[str, Any]]:
        return decode_part(self._get(part.name), part.fmt, columns)

    def _get(self, name: str) -> bytes:
        def once() -> bytes:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read())

        return self._call(once, self.uri(name))

    def _put(self, name: str, body: bytes, content_type: str) -> None:
        self._call(
            partial(
                self.client.put_object, Bucket=self.bucket, Key=self.prefix + name, Body=body, ContentType=content_type
            ),
            self.uri(name),
        )

    def _delete(self, name: str) -> None:
        self._call(partial(self.client.delete_object, Bucket=self.bucket, Key=self.prefix + name), self.uri(name))

    def write_part(self, rows: list[dict[str, Any]], run_id: str) -> PartRef:
        if self._next_seq is None:
            self.list_parts()
        assert self._next_seq is not None
        part = PartRef(f"part-{self._next_seq:06d}-{run_id}.{self.fmt}", self._next_seq, self.fmt)
        content_type = "application/vnd.apache.parquet" if self.fmt == "parquet" else "application/x-ndjson"
        self._put(part.name, encode_part(rows, self.fmt), content_type)
        self._next_seq += 1
        return part

    def drop_rows(self, part: PartRef, drop: set[int]) -> int:
        """Rewrite ``part`` without the rows at positions ``drop`` (one PUT: readers see old or new);
        delete it when nothing is left. Returns the rows left."""
        body, left = _drop_rows(self._get(part.name), part.fmt, drop)
        if left:
            self._put(part.name, body, "application/octet-stream")
        else:
            self._delete(part.name)
        return left

    def read_marker(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._get(MARKER_NAME)))
        except ClientError as error:
            if error_code(error) in NOT_FOUND_CODES:
                return None
            raise

    def write_marker(self, content: dict[str, Any]) -> None:
        body = json.dumps(content, indent=2, sort_keys=True, default=_json_default).encode("utf-8")
        self._put(MARKER_NAME, body, "application/json")

    def delete_marker(self) -> None:
        self._delete(MARKER_NAME)  # deleting a missing key is not an error in S3

    def delete_all(self) -> int:
        names = self._names()
        for name in names:
            self._delete(name)
        self._next_seq = 0
        return len(names)


class S3ResultSink:
    """The pipeline's ``Sink`` for the S3 job: rows buffered, then uploaded as whole parts.

    ``flush()`` returns once the part is stored (or raises), as the sink contract requires. The first
    part of a run removes the shard's completion marker first: a marker only ever describes parts
    that are all there.
    """

    def __init__(
        self,
        store: PartStore,
        *,
        run_id: str,
        rows_per_part: int = 1000,
        on_part: Callable[[PartRef, list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.on_part = on_part
        self.parts_written: list[PartRef] = []
        self._pending: list[dict[str, Any]] = []
        self._items: dict[str, S3Item] = {}
        self._marker_cleared = False

    def track(self, item: S3Item) -> None:
        """Remember what the listing and the GET know about an item until its row is written."""
        self._items[item.id] = item

    def done_ids(self) -> set[str]:
        return {str(row["key"]) for part in self.store.list_parts() for row in self.store.read(part, ["key"])}

    def write(self, results: list[Result]) -> None:
        now = datetime.now(UTC)
        for result in results:
            self._pending.append(result_row(result, self._items.pop(result.id, None), self.run_id, now))
        while len(self._pending) >= self.rows_per_part:
            self._upload(self._pending[: self.rows_per_part])
            self._pending = self._pending[self.rows_per_part :]

    def flush(self) -> None:
        if self._pending:
            self._upload(self._pending)
            self._pending = []

    def _upload(self, rows: list[dict[str, Any]]) -> None:
        if not self._marker_cleared:
            self.store.delete_marker()
            self._marker_cleared = True
        part = self.store.write_part(rows, self.run_id)
        log.debug("wrote %s (%d rows)", self.store.uri(part.name), len(rows))
        self.parts_written.append(part)
        if self.on_part is not None:
            self.on_part(part, rows)

    def close(self) -> None:
        self.flush()
