"""The dashboard's "Generate caption" through the fleet: Streamlit's AppTest drives the page, the captions come
from a real caption API server (the tiny model) over real HTTP, and the page says who answered."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.hostile_images import jpeg_bytes
from tests.integration.http_support import TOKEN, RunningApi, api_settings, running_api, tiny_model
from tests.services.kafka import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def fleet(tiny_checkpoint: Path) -> Iterator[RunningApi]:
    with running_api(api_settings(http={"tokens": TOKEN}), tiny_model(tiny_checkpoint)) as api:
        yield api


def page(monkeypatch: pytest.MonkeyPatch, **env: str) -> AppTest:
    for name in ("DASHBOARD_PROMETHEUS__URL", "DASHBOARD_SCRAPE__URLS", "WORKER_MODEL__REF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, files: list[tuple[str, bytes, str]]) -> AppTest:
    at.file_uploader(key="uploads").set_value(files)
    at.run()
    next(b for b in at.button if b.label == "Generate caption").click().run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return "\n".join([c.value for c in at.caption] + [e.value for e in at.error] + [m.value for m in at.markdown])


def test_uploads_are_captioned_by_the_fleet_and_the_page_says_which_worker(
    fleet: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = page(monkeypatch, DASHBOARD_FLEET__API_URL=fleet.url, DASHBOARD_FLEET__API_TOKEN=TOKEN)
    assert f"Captions come from the fleet: the workers' caption API at {fleet.url}" in texts(at)
    generate(at, [("cat.jpg", jpeg_bytes(), "image/jpeg"), ("notes.txt", b"not a picture", "text/plain")])
    version = fleet.worker.model.version
    lines = [c.value for c in at.caption if c.value.startswith("model ")]
    assert len(lines) == 1 and re.fullmatch(rf"model {re.escape(version)} · \d+ ms · worker test-worker", lines[0])
    (problem,) = at.error
    assert problem.value.startswith("notes.txt is not an image")
    # The fleet captioned both: the dashboard's own model was never loaded.
    assert fleet.sample("captionfleet_http_requests_total", route="captions", code="200") == 1


def test_a_fleet_that_does_not_answer_or_refuses_the_token_is_said_in_words(
    fleet: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    at = generate(page(monkeypatch, DASHBOARD_FLEET__API_URL=nobody), [("cat.jpg", jpeg_bytes(), "image/jpeg")])
    (error,) = at.error
    assert "could not be reached" in error.value and "DASHBOARD_FLEET__API_URL" in error.value
    assert not re.search(r"\b[A-Z][a-z]+(Error|Exception)\b", error.value), error.value  # no Python class names

    at = page(monkeypatch, DASHBOARD_FLEET__API_URL=fleet.url, DASHBOARD_FLEET__API_TOKEN="wrong")
    generate(at, [("cat.jpg", jpeg_bytes(), "image/jpeg")])
    (error,) = at.error
    assert "DASHBOARD_FLEET__API_TOKEN" in error.value and "wrong" not in error.value


def test_without_a_fleet_url_the_page_says_it_uses_its_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHBOARD_FLEET__API_URL", raising=False)
    at = page(monkeypatch)
    assert "Captions come from this dashboard's own model, `builtin`" in texts(at)
