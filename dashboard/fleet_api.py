"""Captioning uploads with the fleet: the files go to the workers' caption API (``POST /v1/captions``, the
``DASHBOARD_FLEET__API_URL`` Service), a request per batch, and each answer says which worker and model
version captioned it. The page keeps a local thumbnail of each file, decoded with the workers' limits.

What goes wrong is said in words an operator acts on (the setting to check, the status the fleet answered),
never as a Python exception's class name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from captionfleet.core.failures import ImageError
from captionfleet.core.images import ImageLimits, decode_image
from captionfleet.core.settings import DecodingSettings
from captionfleet.dashboard.settings import FleetSettings
from captionfleet.dashboard.uploads import THUMBNAIL_SIDE, UploadResult, thumbnail


class FleetUnavailable(Exception):
    """The fleet did not answer a request at all; the message says what to check."""


def _thumbnail(result: UploadResult, data: bytes, limits: ImageLimits) -> None:
    try:
        result.image = thumbnail(decode_image(data, limits=limits), THUMBNAIL_SIDE)
    except ImageError:
        result.image = None  # the fleet's answer says what is wrong with it


def _post(
    client: httpx.Client,
    settings: FleetSettings,
    files: Sequence[tuple[str, bytes]],
    decoding: DecodingSettings,
    prompt: str | None,
) -> httpx.Response:
    headers = {}
    if settings.api_token is not None:  # never logged, never shown
        headers["authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
    try:
        return client.post(
            f"{settings.api_url.rstrip('/')}/v1/captions",
            files=[("files", (name, data)) for name, data in files],
            data={
                "num_beams": str(decoding.num_beams),
                "max_new_tokens": str(decoding.max_new_tokens),
                **({"prompt": prompt} if prompt is not None else {}),
            },
            headers=headers,
            timeout=settings.api_timeout_s,
        )
    except httpx.TimeoutException:
        raise FleetUnavailable(
            f"the fleet at {settings.api_url} did not answer within {settings.api_timeout_s:g} s "
            "(DASHBOARD_FLEET__API_TIMEOUT_S): the workers may be saturated; try again"
        ) from None
    except httpx.HTTPError as error:
        raise FleetUnavailable(
            f"the fleet at {settings.api_url} could not be reached ({error}): check DASHBOARD_FLEET__API_URL "
            "and that the workers serve the caption API (WORKER_HTTP__ENABLED)"
        ) from None


def _refusal(response: httpx.Response, settings: FleetSettings) -> str:
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code == 401:
        return (
            "the fleet refused the token: set DASHBOARD_FLEET__API_TOKEN to one of the workers' "
            f"WORKER_HTTP__TOKENS ({message})"
        )
    return f"the fleet answered {response.status_code}: {message}"


def caption_with_fleet(
    files: Sequence[tuple[str, bytes]],
    decoding: DecodingSettings,
    limits: ImageLimits,
    settings: FleetSettings,
    batch_size: int,
    prompt: str | None = None,
) -> list[UploadResult]:
    """One result per (name, bytes) upload, in order: the fleet's caption with the worker and version that
    answered, or the failure it named (``prompt``: sent with every file; None: the family's default). Raises
    FleetUnavailable when the fleet does not answer at all."""
    results = [UploadResult(name) for name, _ in files]
    with httpx.Client() as client:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            began = time.perf_counter()
            response = _post(client, settings, batch, decoding, prompt)
            seconds = time.perf_counter() - began
            if response.status_code != 200:
                problem = _refusal(response, settings)
                for result in results[start : start + len(batch)]:
                    result.kind, result.message = "fleet", problem
                continue
            rows = response.json()["results"]
            for result, (_, data), row in zip(results[start:], batch, rows, strict=False):
                _thumbnail(result, data, limits)
                result.worker = str(row.get("worker") or "")
                result.prompt = row.get("prompt")
                if row.get("ok"):
                    result.caption, result.model_version = row["caption"], row["model_version"]
                    result.seconds, result.batch = seconds, len(batch)
                else:
                    result.kind, result.message = row.get("error_kind"), str(row.get("error_message") or "")
    return results
