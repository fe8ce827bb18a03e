"""S3 (and S3-compatible stores: SeaweedFS, MinIO, ...) for every part of captionfleet: the one home of
clients, uris, error codes, retries and the GET-with-retry reader.

- ``make_s3_client`` / ``parse_s3_uri``: one client per job; credentials from settings or the AWS chain.
- The error vocabulary: S3's codes by what they mean (``THROTTLE_CODES``, ``NOT_FOUND_CODES``, ...),
  ``error_code``, ``is_retryable`` / ``is_throttling`` / ``is_not_found``, and ``access_error``, which
  turns a job-level failure (no bucket, no access, no endpoint) into an ``S3AccessError`` naming the fix.
- ``RetryPolicy``: jittered exponential backoff; callers pick which errors are worth another attempt.
- ``read_object``: one object's bytes, GET and body read retried together, within a byte limit. The
  stream's fetcher (``worker/fetch.py``) and the bulk job's reader (``worker/connectors/s3_reader.py``)
  both read through it and only map its errors to their own failure kinds.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from captionfleet.core.failures import (
    FETCH_FAILURE,
    FORBIDDEN,
    NOT_FOUND,
    TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    FetchError,
)
from captionfleet.core.settings import S3Settings

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


class ObjectStore(Protocol):
    """The S3 calls captionfleet makes; a boto3 S3 client is one, and tests use in-memory fakes that
    raise the same botocore exceptions (see tests/unit/test_s3_*.py)."""

    def list_objects_v2(self, **kwargs: Any) -> Any: ...
    def get_object(self, **kwargs: Any) -> Any: ...
    def put_object(self, **kwargs: Any) -> Any: ...
    def delete_object(self, **kwargs: Any) -> Any: ...


def as_object_store(client: S3Client) -> ObjectStore:
    # The stubs type each call's keywords exactly; the protocol takes any keywords, so say it here once.
    return cast(ObjectStore, client)


# -- errors ----------------------------------------------------------------------------------------

# Throttling: the store asks us to slow down. Transient: the store (or a proxy) failed this once.
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestLimitExceeded"}
)
TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "BadGateway", "GatewayTimeout"}
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# Not in NOT_FOUND_CODES: for a job's own prefixes a missing bucket is a setup error (``access_error``);
# only a per-object read (the stream's fetcher) counts it as that object not being found.
NO_SUCH_BUCKET = "NoSuchBucket"
FORBIDDEN_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403", "AccountProblem"})
BAD_CREDENTIALS_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
# One object refused to these credentials: the kind ``forbidden`` for a per-object read.
REFUSED_CODES = FORBIDDEN_CODES | BAD_CREDENTIALS_CODES
TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
TIMEOUT_ERRORS = (ReadTimeoutError, ConnectTimeoutError, TimeoutError)
CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ResponseStreamingError,
    IncompleteReadError,  # the body was cut short
    ConnectionError,  # the builtin: resets and broken pipes from the socket layer
    # botocore's two bases of the above, which also cover what a restarting TLS load balancer or a proxy
    # gives (SSLError, ProxyConnectionError): the way to the store failed, not the object.
    HTTPClientError,
    BotoConnectionError,
)
# The credentials could not be fetched (STS or the instance metadata service hiccuping): not the object's
# fault either, and a later read usually has them.
CREDENTIAL_ERRORS = (CredentialRetrievalError, NoCredentialsError)
NETWORK_ERRORS = TIMEOUT_ERRORS + CONNECTION_ERRORS

CREDENTIALS_HINT = (
    "the credentials come from WORKER_S3__ACCESS_KEY_ID / WORKER_S3__SECRET_ACCESS_KEY when both are set, "
    "else from the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity)"
)


def error_code(error: BaseException) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_not_found(error: BaseException) -> bool:
    """The key does not exist (a missing bucket is not this: see ``NO_SUCH_BUCKET``)."""
    return error_code(error) in NOT_FOUND_CODES


def is_throttling(error: BaseException) -> bool:
    return isinstance(error, ClientError) and (error_code(error) in THROTTLE_CODES or http_status(error) == 429)


def is_retryable(error: BaseException) -> bool:
    """Worth another try: throttling, 5xx, and timeouts or broken connections."""
    if isinstance(error, ClientError):
        status = http_status(error)
        return is_throttling(error) or error_code(error) in TRANSIENT_CODES or 500 <= status < 600
    return isinstance(error, NETWORK_ERRORS)


def describe_error(error: BaseException) -> str:
    """A short description without request ids or headers (and so without credentials)."""
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        message = info.get("Message") or ""
        return f"{info.get('Code', '?')}{f' ({message})' if message else ''}"
    return f"{type(error).__name__}: {error}"


def object_failure(error: BaseException, uri: str) -> FetchError | None:
    """One object's read that failed for good (after its retries) as the failure the stream and the bulk jobs
    both report: the same kind for the same store answer. None when the error is not the store's (a bug:
    the caller lets it surface)."""
    if isinstance(error, ObjectTooLarge):
        what = "more than" if error.declared is None else f"{error.declared} bytes exceeds the limit of"
        return FetchError(TOO_LARGE, f"{what} {error.limit} bytes")
    if isinstance(error, ClientError):
        code, status, text = error_code(error), http_status(error), describe_error(error)
        if is_not_found(error) or code == NO_SUCH_BUCKET or status == 404:
            return FetchError(NOT_FOUND, f"{uri} does not exist ({text})")
        if code in REFUSED_CODES or status == 403:
            return FetchError(
                FORBIDDEN, f"the store refused to read {uri} ({text}): grant the worker's credentials read access"
            )
        if code in TIMEOUT_CODES:
            return FetchError(TIMEOUT, f"timed out reading {uri} ({text})")
        if is_retryable(error):
            return FetchError(UNAVAILABLE, f"store busy or failing ({text})")
        return FetchError(FETCH_FAILURE, f"S3 error {text}")
    if isinstance(error, TIMEOUT_ERRORS):
        return FetchError(TIMEOUT, f"timed out: {error}")
    if isinstance(error, CONNECTION_ERRORS):
        return FetchError(UNAVAILABLE, f"connection failed: {error}")
    if isinstance(error, CREDENTIAL_ERRORS):
        return FetchError(UNAVAILABLE, f"no credentials to read {uri} ({error}); {CREDENTIALS_HINT}")
    if isinstance(error, BotoCoreError):
        return FetchError(FETCH_FAILURE, f"{type(error).__name__}: {error}")
    return None


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
    if code == NO_SUCH_BUCKET:
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


# -- retries ---------------------------------------------------------------------------------------

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


# The default for parameters (a frozen instance, so sharing it is safe).
DEFAULT_RETRY = RetryPolicy()


# -- reading one object ----------------------------------------------------------------------------


class ObjectTooLarge(Exception):
    """The object is over the byte limit: ``declared`` is the size the store announced (nothing was
    read), or None when more than ``limit`` bytes arrived (it grew past what its listing said)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        what = f"{declared} bytes" if declared is not None else f"more than {limit} bytes"
        super().__init__(f"{what} exceeds the limit of {limit} bytes")
        self.limit = limit
        self.declared = declared


@dataclass(frozen=True)
class Fetched:
    data: bytes
    etag: str  # of the bytes actually read ("" when the store sent none): it may differ from the listing's
    seconds: float  # the GET itself, retries included
    attempts: int


def read_object(
    client: ObjectStore,
    bucket: str,
    key: str,
    *,
    retry: RetryPolicy,
    what: str,
    max_bytes: int = 0,
    refuse_declared: bool = False,
) -> Fetched:
    """The object's bytes; the final error of the last attempt (a botocore one) is raised as it is,
    for the caller to map to its own failure kinds, or ``ObjectTooLarge``.

    The body is read inside the retried call, so a timeout mid-stream is retried too. ``max_bytes``
    (0 = no limit): at most one byte over it is read, so an object grown since it was listed is not
    downloaded whole. ``refuse_declared``: an announced length over the limit is refused unread.
    """

    def once() -> tuple[bytes, str]:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            if refuse_declared and max_bytes:
                declared = int(response.get("ContentLength") or 0)
                if declared > max_bytes:
                    raise ObjectTooLarge(max_bytes, declared)
            data = bytes(body.read(max_bytes + 1) if max_bytes else body.read())
        finally:
            # Hands the connection back to the pool even when the body was not read to its end.
            # Test doubles' bodies may have no close().
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if max_bytes and len(data) > max_bytes:
            raise ObjectTooLarge(max_bytes)
        return data, str(response.get("ETag") or "")

    start = time.perf_counter()
    (data, etag), attempts = retry.call(once, what=what)
    return Fetched(data, etag, time.perf_counter() - start, attempts)


def is_storage_error(error: BaseException) -> bool:
    """Whether a load failed on object storage or the network rather than on the checkpoint.

    The rule: a botocore error (ClientError: throttling, 5xx, a missing or changed object;
    BotoCoreError: timeouts, refused or dropped connections) raised by the load or anywhere in its
    chain of causes. ``resolve_model_ref`` wraps those in ModelRefError ``from`` the botocore error,
    while what it finds wrong with a checkpoint (pickled weights, missing files) and a refused hot swap
    (another input size) are ModelRefErrors with no botocore cause. Storage errors are usually gone by
    the next poll (or the next run), so they must not block a version (the hot swap) nor be reported as
    nothing to retry (the trainer's exit status); a broken checkpoint stays broken until a new version is
    published.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (ClientError, BotoCoreError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False
