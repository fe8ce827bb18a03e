"""S3 (and S3-compatible stores: SeaweedFS, MinIO, ...): client construction and ``s3://`` uris."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from worker.settings import S3Settings

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
