"""Exit statuses of the captioning jobs (`captionfleet caption`, the bulk worker), which Kubernetes
Jobs act on (k8s/base/bulk-job.yaml's podFailurePolicy): 2 fails the Job, others retry the index."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from captionfleet.core.s3 import S3AccessError

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments, settings or model reference: every retry would fail the same way
EXIT_SOME_FAILED = 3  # the run completed, but some images have failure rows
EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: the object store was unreachable or failing; running again resumes
EXIT_INTERRUPTED = 130


def exit_for_access_error(error: S3AccessError) -> int:
    """EX_TEMPFAIL when the store failed (a retry resumes from the parts written), else a usage error."""
    if error.retryable:
        print("the parts written so far are kept: run the same command again to resume", file=sys.stderr)
        return EXIT_TEMPFAIL
    return EXIT_USAGE
