"""The OpenAI-compatible subset, with the official ``openai`` client pointed at the real server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.hostile_images import jpeg_bytes
from tests.integration.http_support import TOKEN, RunningApi, api_settings, running_api, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def api(tiny_checkpoint: Path) -> Iterator[RunningApi]:
    with running_api(api_settings(http={"tokens": TOKEN}), tiny_model(tiny_checkpoint)) as running:
        yield running


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def test_chat_completions_caption_image_url_parts(api: RunningApi) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0)
    version = api.worker.model.version
    assert [m.id for m in client.models.list()] == [version]
    answer = client.chat.completions.create(
        model=version,
        max_tokens=4,
        messages=[
            {
                "role": "user",
                "content": [  # no text part: the tiny checkpoint's family takes no prompt (tested below)
                    {"type": "image_url", "image_url": {"url": data_uri(jpeg_bytes())}},
                    {"type": "image_url", "image_url": {"url": data_uri(jpeg_bytes((320, 240)))}},
                ],
            }
        ],
    )
    assert answer.object == "chat.completion" and answer.model == version
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    lines = (choice.message.content or "").split("\n")
    assert len(lines) == 2 and all(lines)  # one caption per image, in order
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert api.sample("captionfleet_http_requests_total", route="chat", code="200") == 1


def test_chat_failures_are_openai_errors(api: RunningApi) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0)

    def ask(url: str) -> None:
        client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        )

    with pytest.raises(openai.PermissionDeniedError, match="WORKER_FETCH__ALLOWED_BUCKETS"):
        ask("s3://not-allowed/cat.jpg")  # the allow-list holds for the chat API too
    with pytest.raises(openai.UnprocessableEntityError, match=r"not_an_image|not a recognised image"):
        ask("data:image/jpeg;base64," + base64.b64encode(b"plain text, not a picture").decode())
    with pytest.raises(openai.BadRequestError, match="takes no prompt"):  # its text part is the prompt
        client.chat.completions.create(
            model="any",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe the picture."},
                        {"type": "image_url", "image_url": {"url": data_uri(jpeg_bytes())}},
                    ],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="stream is not supported"):
        client.chat.completions.create(
            model="any",
            stream=True,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(b"x")}}]}],
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0).models.list()
