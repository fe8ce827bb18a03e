"""The dashboard's model: a `.../LATEST` ref is re-read as often as the workers poll it, so uploads
move to a newly published version with the workers instead of keeping the first one for good."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from captionfleet.core.settings import WorkerSettings
from captionfleet.dashboard import model as data

ROOT = "s3://models/captioner"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """LATEST's content and the versions loaded, with S3 and the checkpoint loading faked."""
    state: dict[str, object] = {"latest": "v1", "loaded": []}
    monkeypatch.setattr(data, "_LATEST_READER", data.LatestReader())
    monkeypatch.setattr(data, "make_s3_client", lambda settings, **_: object())
    monkeypatch.setattr(data, "read_latest", lambda client, root: state["latest"])

    def load_version(root: str, version: str, settings: WorkerSettings) -> object:
        assert root == ROOT
        state["loaded"].append(version)  # type: ignore[attr-defined]
        return SimpleNamespace(version=version)

    monkeypatch.setattr(data, "load_version", load_version)
    data._load_model.clear()
    yield state
    data._load_model.clear()


def settings(poll_interval_s: float) -> WorkerSettings:
    return WorkerSettings(model={"ref": f"{ROOT}/LATEST", "poll_interval_s": poll_interval_s})  # type: ignore[arg-type]


def test_a_new_latest_is_picked_up_after_the_poll_interval(store: dict[str, object]) -> None:
    config = settings(poll_interval_s=30)
    assert data.load_model(config, now=100.0).version == "v1"
    store["latest"] = "v2"
    assert data.load_model(config, now=120.0).version == "v1"  # not re-read yet: no S3 call per click
    assert data.load_model(config, now=131.0).version == "v2"
    assert data.load_model(config, now=140.0).version == "v2"
    assert store["loaded"] == ["v1", "v2"]  # each version loaded once


def test_an_unreadable_latest_keeps_the_version_in_use(
    store: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import EndpointConnectionError

    config = settings(poll_interval_s=30)
    assert data.load_model(config, now=100.0).version == "v1"

    def unreachable(client: object, root: str) -> str:
        raise EndpointConnectionError(endpoint_url="http://s3.test")

    monkeypatch.setattr(data, "read_latest", unreachable)
    assert data.load_model(config, now=200.0).version == "v1"


def test_no_latest_and_no_version_yet_names_the_fix(store: dict[str, object]) -> None:
    from captionfleet.core.model_store import ModelRefError

    store["latest"] = None
    with pytest.raises(ModelRefError, match="publish a version first"):
        data.load_model(settings(poll_interval_s=30), now=100.0)


def test_polling_off_reads_latest_once(store: dict[str, object]) -> None:
    config = settings(poll_interval_s=0)
    assert data.load_model(config, now=100.0).version == "v1"
    store["latest"] = "v2"
    assert data.load_model(config, now=10_000.0).version == "v1"
