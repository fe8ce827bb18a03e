"""Every failure kind, failure error type and exit status of captionfleet: the one place to look them up.

A failure kind is the stable word a failure row, a dead letter and the ``captionfleet_failures_total``
metric carry (``error_kind``): operators filter and alert on them, and bulk runs take them in
``--retry-failed``, so a new kind is added here and nowhere else. Exit statuses are what Kubernetes
(k8s/base/bulk-job.yaml's podFailurePolicy), shell scripts and the README act on.

This module imports nothing but the standard library: the decoder, the fetcher, the metrics and the
command lines all import it, and none of them should pay for botocore or torch to learn a word.
"""

from __future__ import annotations

import sys
from typing import Final, Literal, Protocol, get_args

# -- failure kinds ----------------------------------------------------------------------------------

# The image decoder's kinds (captionfleet.core.images): the bytes arrived but are not a usable image.
ImageFailureKind = Literal["empty", "not_an_image", "unsupported", "truncated", "too_large", "decode"]

# The fetcher's kinds (captionfleet.worker.fetch): the bytes could not be read. ``too_large`` is shared
# with the decoder (a declared size over the limit is refused unread) and ``malformed`` with a Kafka
# message that is not a request (also the fetcher's kind for a uri it cannot parse).
FORBIDDEN: Final = "forbidden"  # refused by the allow-list policy, or by the store (403, EACCES)
NOT_FOUND: Final = "not_found"
TIMEOUT: Final = "timeout"
UNAVAILABLE: Final = "unavailable"  # throttled or 5xx on every attempt: worth replaying later
TOO_LARGE: Final = "too_large"
MALFORMED: Final = "malformed"
FETCH_FAILURE: Final = "fetch"  # any other fetch error
# The host asked dataset tools not to use the image (X-Robots-Tag: noai / noimageai): honoured, never read.
OPTED_OUT: Final = "opted_out"

# The model itself failed on the item.
INFERENCE_FAILURE: Final = "inference"
# The model ran but generated nothing to read (only whitespace or special tokens): not a caption. Its own
# kind, so that `--retry-failed empty_caption` can redo those items after a model change.
EMPTY_CAPTION: Final = "empty_caption"

# Every kind a failure row or dead letter can carry; the metrics create each one's series at 0.
FAILURE_KINDS: Final = frozenset(get_args(ImageFailureKind)) | {
    FORBIDDEN,
    NOT_FOUND,
    TIMEOUT,
    UNAVAILABLE,
    TOO_LARGE,
    MALFORMED,
    FETCH_FAILURE,
    OPTED_OUT,
    INFERENCE_FAILURE,
    EMPTY_CAPTION,
}


# -- failure error types: an exception that carries its failure kind ------------------------------


class ImageError(Exception):
    """One item could not be turned into an image; ``kind`` is stable, ``message`` is for humans."""

    def __init__(self, kind: ImageFailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: ImageFailureKind = kind
        self.message = message

    def __reduce__(self) -> tuple[type[ImageError], tuple[ImageFailureKind, str]]:
        # The default reduce replays self.args (message only), which breaks crossing a process pool.
        return (ImageError, (self.kind, self.message))


class FetchError(Exception):
    """The uri could not be read; ``kind`` is stable (a failure kind), ``message`` names the fix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class TransientFetchError(FetchError):
    """An attempt failed in a way another attempt may fix (a timeout, a 5xx, a dropped connection): the
    fetcher retries it, and reports its kind when the attempts run out."""


# -- exit statuses ----------------------------------------------------------------------------------

EXIT_OK: Final = 0
# The command failed: the stream worker hit a fatal error (the broker stopped acknowledging results,
# the model thread died; uncommitted work is redone by whoever takes the partitions), or training,
# the registry or the demo did.
EXIT_FAILED: Final = 1
# Bad arguments, settings or model reference: every retry would fail the same way (a bulk Job's
# podFailurePolicy fails the Job on it).
EXIT_USAGE: Final = 2
EXIT_SOME_FAILED: Final = 3  # a bulk run completed, but some images have failure rows
# A publish (``captionfleet train --publish-to``, ``captionfleet models import``) stored its version, but
# the quality gate did not make it LATEST: it scored worse than LATEST, or the gate could not judge it and
# no promotion was asked for. Not worth a retry: the same run ends the same way; read the version's
# reason (captionfleet models show), then promote it by hand or change the model.
EXIT_REJECTED: Final = 4
# LATEST names a version that cannot be loaded (files missing or broken): ``--init-from latest`` trains
# nothing, and a publish stores its version with its own scores but cannot compare it, so LATEST stays.
# Not worth a retry either: an operator fixes LATEST first (captionfleet models rollback / promote).
EXIT_LATEST_UNUSABLE: Final = 5
# sysexits' EX_TEMPFAIL, for the bulk runs: the object store was unreachable or failing; running again
# resumes from the parts written (the bulk Job retries the index).
EXIT_TEMPFAIL: Final = 75
# The stream worker: SIGTERM's grace period ran out with requests still in flight. They were not
# committed, so their partitions' next owner redoes them: nothing is lost, but the operator should
# know. The same number as EXIT_TEMPFAIL, as it has always been: a temporary condition, run again.
EXIT_GRACE_EXCEEDED: Final = 75
EXIT_INTERRUPTED: Final = 130  # Ctrl-C or SIGTERM stopped a bulk run or training; what was written is kept


class _MayBeRetried(Protocol):
    """What :func:`exit_for_access_error` needs of an object-store error (core.s3's S3AccessError)."""

    @property
    def retryable(self) -> bool: ...


def exit_for_access_error(error: _MayBeRetried) -> int:
    """EX_TEMPFAIL when the store failed (a retry resumes from the parts written), else a usage error."""
    if error.retryable:
        print("the parts written so far are kept: run the same command again to resume", file=sys.stderr)
        return EXIT_TEMPFAIL
    return EXIT_USAGE
