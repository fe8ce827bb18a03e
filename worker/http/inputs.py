"""Request bodies -> the images they ask about: ``POST /v1/captions`` as multipart files or JSON.

JSON: ``{"images": [{"id": "a", "uri": "s3://bucket/key"}, {"id": "b", "data": "<base64>"}], "prompt": ...,
"num_beams": 2, "max_new_tokens": 20}``, or one image's fields at the top level. A ``uri`` may be a
``data:`` uri (what OpenAI clients send); any other uri is held to the worker's allow-list, as Kafka
requests are (``worker.fetch``), before anything is read. Multipart: every file part is an image (its file
name is its id unless ``id`` fields give one per file, in order), and the form fields ``prompt``,
``num_beams``, ``max_new_tokens``.

Error messages never quote what was sent: a body is an image, or a token mistakenly pasted into it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from captionfleet.core.failures import MALFORMED, TOO_LARGE
from captionfleet.core.prompt_input import MAX_PROMPT_CHARS, PromptRefused, check_prompt
from captionfleet.core.settings import DecodingSettings, HttpSettings
from captionfleet.worker.requests import MAX_ID_CHARS


class BadRequest(Exception):
    """The request as a whole cannot be answered; ``status`` is its HTTP status, ``kind`` a failure kind."""

    def __init__(self, message: str, *, kind: str = MALFORMED, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status


class ImageIn(BaseModel):
    """One image: a ``uri`` (allow-listed s3://, https://, file://, or a data: uri) or base64 ``data``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(
        default=None, max_length=MAX_ID_CHARS, description="echoed in its answer; default: its index"
    )
    uri: str | None = Field(default=None, description="s3://, http(s)://, file:// (allow-listed) or data: uri")
    data: str | None = Field(default=None, description="the image's bytes, base64")
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="overrides the request's")


class Overrides(BaseModel):
    """Decoding for this request, within WORKER_HTTP__MAX_NUM_BEAMS / WORKER_HTTP__MAX_NEW_TOKENS."""

    num_beams: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)


class CaptionsIn(ImageIn, Overrides):
    """``images``, or one image's fields at the top level."""

    images: list[ImageIn] | None = None


@dataclass(frozen=True)
class Wanted:
    """One image as asked: its bytes when they came with the request, else the uri to read."""

    id: str
    uri: str
    data: bytes | None
    prompt: str | None


@dataclass(frozen=True)
class Asked:
    images: list[Wanted]
    decoding: DecodingSettings | None


def data_uri_bytes(uri: str) -> bytes | None:
    """The bytes of a ``data:...;base64,`` uri; None for any other uri. Raises BadRequest when it is broken."""
    if uri[:5].lower() != "data:":
        return None
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise BadRequest("a data: uri must be base64: data:image/jpeg;base64,<bytes>")
    return _b64(payload, "the data: uri")


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64 (standard alphabet, padded)") from None


def prompt_for(value: str | None, field: str) -> str | None:
    """The prompt as core.prompt_input's one rule takes it (blank: the family's default); BadRequest if refused."""
    try:
        return check_prompt(value, field=field)
    except PromptRefused as refused:
        raise BadRequest(str(refused)) from None


def decoding_for(
    base: DecodingSettings, limits: HttpSettings, num_beams: int | None, max_new_tokens: int | None
) -> DecodingSettings | None:
    """The worker's decoding with the request's overrides, or None when it asks for none."""
    if num_beams is None and max_new_tokens is None:
        return None
    if num_beams is not None and num_beams > limits.max_num_beams:
        raise BadRequest(f"num_beams {num_beams} is above this server's limit of {limits.max_num_beams}")
    if max_new_tokens is not None and max_new_tokens > limits.max_new_tokens:
        raise BadRequest(f"max_new_tokens {max_new_tokens} is above this server's limit of {limits.max_new_tokens}")
    update: dict[str, int] = {}
    if num_beams is not None:
        update["num_beams"] = num_beams
    if max_new_tokens is not None:
        update["max_new_tokens"] = max_new_tokens
    return base.model_copy(update=update)


def check_count(count: int, limits: HttpSettings) -> None:
    if count == 0:
        raise BadRequest("no image in the request: send files (multipart), or JSON with images: [{uri | data}]")
    if count > limits.max_images:
        raise BadRequest(
            f"{count} images in one request; this server takes at most {limits.max_images} "
            "(WORKER_HTTP__MAX_IMAGES): split the request",
            kind=TOO_LARGE,
            status=413,
        )


def validation_message(error: ValidationError) -> str:
    """Pydantic's complaint without the values it quotes (an image's base64, or a token)."""
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_json(body: Any, base: DecodingSettings, limits: HttpSettings) -> Asked:
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object: {images: [{id, uri | data}]}")
    try:
        asked = CaptionsIn.model_validate(body)
    except ValidationError as error:
        raise BadRequest(f"bad request: {validation_message(error)}") from None
    top = ImageIn(id=asked.id, uri=asked.uri, data=asked.data, prompt=None)
    has_top = asked.uri is not None or asked.data is not None
    if asked.images is not None and has_top:
        raise BadRequest("give either images: [...] or one image's uri/data at the top level, not both")
    images = asked.images if asked.images is not None else ([top] if has_top else [])
    check_count(len(images), limits)
    wanted = []
    for index, image in enumerate(images):
        name = image.id if image.id is not None else str(index)
        if (image.uri is None) == (image.data is None):
            raise BadRequest(f"image {name}: give exactly one of uri and data")
        own = prompt_for(image.prompt, f"image {name}'s prompt")
        prompt = own if own is not None else prompt_for(asked.prompt, "prompt")
        if image.data is not None:
            wanted.append(Wanted(name, f"upload:{name}", _b64(image.data, f"image {name}'s data"), prompt))
        else:
            assert image.uri is not None
            inline = data_uri_bytes(image.uri)
            uri = f"upload:{name}" if inline is not None else image.uri
            wanted.append(Wanted(name, uri, inline, prompt))
    return Asked(wanted, decoding_for(base, limits, asked.num_beams, asked.max_new_tokens))


def form_int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"form field {name} must be a whole number") from None
    if number < 1:
        raise BadRequest(f"form field {name} must be at least 1")
    return number


def parse_form(
    files: list[tuple[str, bytes]], fields: dict[str, list[str]], base: DecodingSettings, limits: HttpSettings
) -> Asked:
    """Multipart: ``files`` as (file name, bytes) in the order sent; ``fields`` the text fields."""
    check_count(len(files), limits)
    ids = fields.get("id", [])
    if ids and len(ids) != len(files):
        raise BadRequest(f"{len(ids)} id fields for {len(files)} files: give one id per file, in order, or none")
    prompts = fields.get("prompt", [])
    if len(prompts) > 1:
        raise BadRequest("one prompt field per request")
    prompt = prompt_for(prompts[0] if prompts else None, "form field prompt")
    wanted = []
    for index, (filename, data) in enumerate(files):
        name = ids[index] if ids else (filename or str(index))
        if len(name) > MAX_ID_CHARS:
            raise BadRequest(f"image {index}: id longer than {MAX_ID_CHARS} characters")
        wanted.append(Wanted(name, f"upload:{filename or index}", data, prompt))
    beams = form_int(_one(fields, "num_beams"), "num_beams")
    tokens = form_int(_one(fields, "max_new_tokens"), "max_new_tokens")
    return Asked(wanted, decoding_for(base, limits, beams, tokens))


def _one(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name, [])
    return values[-1] if values else None
