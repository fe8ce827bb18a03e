"""What flows between the parts: one result row per input image, a caption or a failure.

A failure's ``error_kind`` is one of captionfleet.core.failures.FAILURE_KINDS."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    id: str
    uri: str
    model_version: str
    caption: str | None = None
    # The caption's confidence (captionfleet.core.generation): the mean log-probability of its generated
    # tokens, the end token included, and how many tokens it has (the end token not counted).
    mean_logprob: float | None = None
    tokens: int | None = None
    # The prompt of the caption: the request's (or the job's), else the model family's default; None when
    # the model took none (ViT-GPT2, and BLIP/GIT without one). On a failure row, the prompt as asked.
    prompt: str | None = None
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


# Fields a result or dead letter passes through from the request, largest first to give way.
PASSED_THROUGH = ("request", "metadata")
PREVIEW_CHARS = 1000


def encode_json(value: Any) -> bytes:
    """A result or dead letter as the bytes of its Kafka message."""
    # default=str: metadata passed through may hold anything JSON had; nothing else reaches here.
    # backslashreplace: a lone surrogate ("\ud800" is valid JSON, so an id or key may hold one) has no UTF-8
    # form; written as its escape, \ud800 inside a JSON string, it reads back as the same character.
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.encode("utf-8", errors="backslashreplace")


def encode_key(key: str) -> bytes:
    """A message key's bytes: an id with a lone surrogate gets its escape instead of failing the send."""
    return key.encode("utf-8", errors="backslashreplace")


# What encoding a request's passed-through fields can raise: nesting past the recursion limit (JSON
# parses nesting that, one level deeper and further down the call stack, no longer encodes), or a
# circular reference.
UNENCODABLE = (RecursionError, ValueError, TypeError)


def encoding_problem(value: Any) -> str | None:
    """Why ``value`` cannot be encoded as a message; None when it can."""
    try:
        encode_json(value)
    except UNENCODABLE as error:
        return f"{type(error).__name__}: {error}"
    return None


def _size(value: Any) -> int | None:
    """Its encoded size; None when it cannot be encoded."""
    try:
        return len(encode_json(value))
    except UNENCODABLE:
        return None


def fit_value(value: dict[str, Any], limit: int) -> dict[str, Any]:
    """``value``, or a copy whose passed-through fields are summaries, so that its encoding fits in
    ``limit`` bytes (and exists at all: a field that cannot be encoded is summarised too).

    Why: a request near the broker's size limit comes back larger (its dead letter carries it whole,
    undecodable bytes escaped, and its metadata again); a send over the limit fails, and a worker that
    cannot answer a message fails on it again after every restart. The summary keeps what is needed to
    find the original (size, sha256, a preview; the message's topic/partition/offset are in ``source``).
    """
    size = _size(value)
    if size is not None and size <= limit:
        return value
    fitted = dict(value)
    for name in PASSED_THROUGH:
        if fitted.get(name):
            fitted[name] = _summary_of(fitted[name])
            size = _size(fitted)
            if size is not None and size <= limit:
                return fitted
    # Still too large: the remaining text fields (a huge uri or error message) are cut to a preview.
    for name, field_value in fitted.items():
        if isinstance(field_value, str) and len(field_value) > PREVIEW_CHARS:
            fitted[name] = field_value[:PREVIEW_CHARS] + "...[truncated]"
    return fitted


def _summary_of(field_value: Any) -> dict[str, Any]:
    try:
        return _summary(encode_json(field_value))
    except UNENCODABLE as error:
        return {"truncated": True, "unencodable": f"{type(error).__name__}: {error}"}


def _summary(raw: bytes) -> dict[str, Any]:
    return {
        "truncated": True,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "preview": raw[:PREVIEW_CHARS].decode("utf-8", errors="replace"),
    }
