"""The OpenAI-compatible subset: ``POST /v1/chat/completions``, non-streaming, one user message whose
``image_url`` parts (data: uris, or uris the allow-list admits) are captioned and whose text parts are the
prompt. Several images are answered in one message, one caption per line, in order.

What OpenAI clients send beyond that (temperature, top_p, ...) is accepted and ignored; ``max_tokens`` (or
``max_completion_tokens``) caps the caption's length within WORKER_HTTP__MAX_NEW_TOKENS; ``stream`` and
``n`` > 1 are refused with a message saying so.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from captionfleet.core.settings import DecodingSettings, HttpSettings
from captionfleet.worker.http.inputs import (
    Asked,
    BadRequest,
    Wanted,
    check_count,
    data_uri_bytes,
    decoding_for,
    prompt_for,
)


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest("a message's content must be text or a list of parts ({type: image_url | text})")
    if not all(isinstance(part, dict) for part in content):
        raise BadRequest("every content part must be an object: {type: image_url, image_url: {url}}")
    return content


def _image_url(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise BadRequest("an image_url part needs image_url: {url: 'data:image/jpeg;base64,...' or an allowed uri}")
    return url


def _tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("max_tokens must be a whole number of at least 1")
    return value


def parse_chat(body: Any, base: DecodingSettings, limits: HttpSettings) -> Asked:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with messages")
    if body.get("stream"):
        raise BadRequest("stream is not supported here: send stream=false (the answer is one caption per image)")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: one caption per image")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list; the last user message holds the image_url parts")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("no user message: put the image_url parts in a message with role user")
    texts: list[str] = []
    urls: list[str] = []
    for part in _parts(users[-1].get("content")):
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            urls.append(_image_url(part))
        else:
            raise BadRequest(f"unsupported content part type {str(part.get('type'))[:40]!r}: use image_url or text")
    check_count(len(urls), limits)
    prompt = prompt_for(" ".join(text.strip() for text in texts if text.strip()) or None, "the message's text")
    wanted = []
    for index, url in enumerate(urls):
        inline = data_uri_bytes(url)
        name = f"image-{index}"
        wanted.append(Wanted(name, f"upload:{name}" if inline is not None else url, inline, prompt))
    return Asked(wanted, decoding_for(base, limits, None, _tokens(body)))


def chat_answer(captions: list[str], tokens: int, model_version: str, worker: str) -> dict[str, Any]:
    """A ``chat.completion`` holding the captions, one line each; ``usage`` counts the captions' generated
    tokens (the prompt's are not counted: images have no token price here)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "\n".join(captions)},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
        "worker": worker,
    }
