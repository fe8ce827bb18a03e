"""What the API answers: each image's result with the fields of a Kafka result (or the same failure kinds),
and one error shape for a request refused as a whole, which OpenAI clients read as well."""

from __future__ import annotations

import json
from typing import Any

from captionfleet.core.failures import FORBIDDEN, MALFORMED, NOT_FOUND, TIMEOUT, TOO_LARGE, UNAVAILABLE
from captionfleet.worker.messages import Result, encode_json

JSON = "application/json"

# A failure kind as the status of a request refused as a whole (the chat API answers one image's failure
# that way; /v1/captions answers failures per image with 200). Kinds not listed: the image is unusable, 422.
STATUS_OF_KIND = {
    MALFORMED: 400,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    TOO_LARGE: 413,
    UNAVAILABLE: 503,
    TIMEOUT: 504,
    "inference": 500,
}


def status_of(kind: str) -> int:
    return STATUS_OF_KIND.get(kind, 422)


def result_row(result: Result, *, worker: str, prompt: str | None, end_to_end_ms: float) -> dict[str, Any]:
    """An image's answer: the Kafka result's fields (caption, model_version, sizes, timings, worker,
    end_to_end_ms), plus ok, the failure kind and message when it failed, and the prompt asked with it."""
    row = result.to_row()
    row.pop("metadata")  # Kafka requests pass metadata through; API requests have none
    row.update(ok=result.ok, worker=worker, prompt=prompt, end_to_end_ms=round(end_to_end_ms, 3))
    return row


def error_body(kind: str, message: str) -> dict[str, Any]:
    """``{"error": {"kind", "message", "type", "code"}}``: kind is ours, type and code what OpenAI clients read."""
    return {"error": {"kind": kind, "message": message, "type": kind, "code": kind}}


def encode(body: Any) -> bytes:
    return encode_json(body)


def error_bytes(kind: str, message: str) -> bytes:
    return json.dumps(error_body(kind, message)).encode()
