"""The model registry's layout in object storage: names and reading, the one home of both.

Under one root, ``s3://bucket/models/<name>``::

    versions/<version>/...      the checkpoint files (captionfleet.json uploaded last)
    records/<version>.json      status (candidate, promoted, rejected, unjudged, rolled_back), gate scores,
                                reason, what the model is (family, processor, default prompt, precision),
                                parent, dates; written once the files are all up, so a version without
                                a record is an incomplete upload and can never become LATEST
    LATEST                      one line: the version workers serve
    history/<ns>-<action>.json  every LATEST change: version, previous, action, reason, when
    eval/                       the fixed evaluation set of the quality gate (trainer/publish.py)

Workers, the dashboard and the trainer read it through this module; only the trainer writes it
(``captionfleet.trainer.registry.Registry``). Workers know only ``versions/`` and ``LATEST``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from captionfleet.core.model_store import ModelRefError
from captionfleet.core.s3 import is_not_found, parse_s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LATEST = "LATEST"
VERSIONS = "versions"
RECORDS = "records"
HISTORY = "history"
EVAL = "eval"
# The fixed evaluation set: eval/info.json names the folder eval/<digest>/ holding manifest.jsonl and images/.
EVAL_INFO = "info.json"
EVAL_MANIFEST = "manifest.jsonl"
EVAL_IMAGES = "images"
# What the trainer records in every checkpoint it writes (version, name, parent, ...); uploaded last.
METADATA_FILE = "captionfleet.json"

# Versions become object keys and label values: keep them to one safe path segment.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def latest_root(ref: str) -> str | None:
    """``s3://b/models/x`` for a ref ``s3://b/models/x/LATEST``; None for any other ref."""
    ref = ref.strip()
    if ref.startswith("s3://") and ref.rstrip("/").endswith("/" + LATEST):
        return ref.rstrip("/")[: -len(LATEST) - 1]
    return None


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ModelRefError(
            f"model version {version!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(at most 128), e.g. captioner-3f2a9c01b7de"
        )
    return version


def version_uri(root: str, version: str) -> str:
    return f"{root.rstrip('/')}/{VERSIONS}/{check_version(version)}"


def read_latest(client: S3Client, root: str) -> str | None:
    """The version LATEST names; None when there is no LATEST yet. S3 errors propagate."""
    bucket, prefix = parse_s3_uri(root.rstrip("/"))
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{LATEST}")["Body"].read()
    except ClientError as error:
        if is_not_found(error):
            return None
        raise
    return parse_latest(body)


def parse_latest(body: bytes) -> str | None:
    """The version a LATEST object's content names; None when it is empty."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    return check_version(text.splitlines()[0].strip())
