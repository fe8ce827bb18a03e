"""What flows between the parts: one result row per input image, a caption or a failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, get_args

from worker.images import FailureKind

# Failure kinds beyond the image decoder's: the model itself failed on the item, or fetching it did.
INFERENCE_FAILURE = "inference"
FETCH_FAILURE = "fetch"

# Every kind a failure row can carry: the decoder's, the fetcher's, the model's.
FAILURE_KINDS = frozenset(get_args(FailureKind)) | {
    FETCH_FAILURE,
    INFERENCE_FAILURE,
    "not_found",
    "forbidden",
    "timeout",
}


@dataclass
class Result:
    id: str
    uri: str
    model_version: str
    caption: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    fetch_ms: float | None = None
    decode_ms: float | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    # Request metadata passed through untouched (streaming requests carry it).
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)
